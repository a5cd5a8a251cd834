import numpy as np
import torch
from PIL import Image

from pipeline.demo_models import demo_models_dir, ensure_demo_models


def test_demo_models_build_once_and_are_reused(tmp_path):
    paths = ensure_demo_models(tmp_path)
    stamps = {p: (p / "model.safetensors").stat().st_mtime_ns for p in (paths.caption, paths.clip, paths.music)}
    again = ensure_demo_models(tmp_path)
    assert again == paths
    assert stamps == {p: (p / "model.safetensors").stat().st_mtime_ns for p in stamps}
    assert paths.caption.parent == demo_models_dir(tmp_path)
    assert not [p for p in paths.caption.parent.iterdir() if p.name.startswith(".")], "no half-built folders left"


def test_demo_checkpoints_load_with_the_real_classes_and_tokenizers(demo_paths):
    from transformers import (AutoProcessor, BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor,
                              MusicgenForConditionalGeneration)

    image = Image.fromarray((np.random.default_rng(0).random((80, 60, 3)) * 255).astype("uint8"))
    blip = BlipForConditionalGeneration.from_pretrained(demo_paths.caption)
    processor = BlipProcessor.from_pretrained(demo_paths.caption)
    out = blip.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=5)
    assert isinstance(processor.decode(out[0], skip_special_tokens=True), str)

    clip = CLIPModel.from_pretrained(demo_paths.clip)
    clip_processor = CLIPProcessor.from_pretrained(demo_paths.clip)
    tokens = clip_processor(text=["a calm photo", "an energetic photo"], return_tensors="pt", padding=True)
    assert tokens["input_ids"].shape[0] == 2
    assert clip.config.projection_dim == 512

    music = MusicgenForConditionalGeneration.from_pretrained(demo_paths.music)
    music_processor = AutoProcessor.from_pretrained(demo_paths.music)
    ids = music_processor(text=["calm piano track, 90 BPM"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
    assert music.config.decoder.num_codebooks == 4
    assert music.audio_encoder.quantizer.get_num_quantizers_for_bandwidth(1.2) == 4
    assert music.config.audio_encoder.frame_rate == 50 and music.config.audio_encoder.sampling_rate == 32000


def test_demo_codec_codebooks_are_not_degenerate(demo_paths):
    """Different codes must decode to different audio, or streamed/seeded tests would prove nothing."""
    from transformers import MusicgenForConditionalGeneration

    codec = MusicgenForConditionalGeneration.from_pretrained(demo_paths.music).audio_encoder
    a = torch.zeros(1, 1, 4, 20, dtype=torch.long)
    b = torch.full((1, 1, 4, 20), 7, dtype=torch.long)
    with torch.no_grad():
        assert not torch.allclose(codec.decode(a, [None]).audio_values, codec.decode(b, [None]).audio_values)
