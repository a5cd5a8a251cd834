"""Tiny random-weight BLIP, CLIP and MusicGen checkpoints, built from transformers configs with working tokenizers.

They let the whole app run with no network (`python app.py --demo`) and give the test suite real models of the
same classes, loaded through the same `from_pretrained` code as the Hub checkpoints. Captions and music from
them are noise by design. Built once per version into the cache folder; building takes about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEMO_VERSION = 4
_SEED = 20240607

# Words the tiny tokenizers know as whole tokens, so demo captions and prompts read as words, not letters.
_WORDS = """a an the of in on with and at by to for from is are photo picture image view scene close up
man woman person people child children girl boy dog cat bird horse animals flowers flower tree trees forest
sky clouds sun sunset sunrise night moon stars city street road car building house room table window beach sea
ocean water river lake mountain mountains snow rain field grass garden park bridge boat light dark red blue green
yellow orange purple white black pink colorful bright calm quiet happy sad energetic peaceful dramatic warm cold
music track song beat tempo bpm major minor key piano guitar drums bass synth strings violin cello flute saxophone
trumpet choir pads ambient electronic pop rock jazz classical folk lofi hip hop dance cinematic orchestral acoustic
slow fast upbeat mellow dreamy melancholic joyful uplifting gentle soft loud deep inspired by mood sitting standing
walking playing looking holding""".split()


@dataclass(frozen=True)
class DemoModelPaths:
    caption: Path
    clip: Path
    music: Path


def demo_models_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "demo-models" / f"v{DEMO_VERSION}"


def ensure_demo_models(cache_dir: str | os.PathLike) -> DemoModelPaths:
    """Return the folders of the three demo checkpoints, building any that are missing."""
    root = demo_models_dir(cache_dir)
    paths = DemoModelPaths(caption=root / "blip", clip=root / "clip", music=root / "musicgen")
    for path, builder in ((paths.caption, _save_blip), (paths.clip, _save_clip), (paths.music, _save_musicgen)):
        if not (path / "config.json").is_file():
            _build_atomically(path, builder)
    return paths


def _build_atomically(target: Path, builder) -> None:
    # Built in a sibling temp folder and renamed, so a crash or a concurrent builder never leaves half a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _save_blip(out: Path) -> None:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    _quiet_transformers()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + _WORDS + list("abcdefghijklmnopqrstuvwxyz")))}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, encoder_hidden_size=32, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=64, patch_size=16)
    torch.manual_seed(_SEED)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 64, "width": 64}),
                              tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _save_clip(out: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip import CLIPImageProcessorPil

    _quiet_transformers()
    alphabet = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=64, patch_size=16)
    torch.manual_seed(_SEED + 1)
    # projection_dim 512 as in ViT-B/32, so trained mood heads have the same input size in demo mode
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def randomize_codebooks(audio_encoder) -> None:
    """EnCodec initialises its codebooks to zeros (they are learned buffers), which would make every code decode
    to the same sound; random vectors make different codes sound different, as in a trained codec."""
    import torch

    with torch.no_grad():
        for layer in audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            layer.codebook.cluster_size.fill_(1.0)


def _save_musicgen(out: Path) -> None:
    import torch
    from transformers import (EncodecConfig, EncodecFeatureExtractor, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, MusicgenProcessor, T5Config, T5Tokenizer)

    _quiet_transformers()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(_WORDS)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    codebook = 64
    text = T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    # EnCodec keeps the real 32 kHz layout (hop 640 → 50 frames/s) with very few filters; 1.2 kbps at 6-bit
    # codebooks gives the 4 codebooks MusicGen-small has.
    audio = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, hidden_size=16,
                          upsampling_ratios=[8, 5, 4, 4], codebook_size=codebook, codebook_dim=16,
                          target_bandwidths=[1.2], use_causal_conv=False, norm_type="weight_norm", normalize=False,
                          pad_mode="reflect", num_lstm_layers=2, compress=2, num_residual_layers=1,
                          chunk_length_s=None, overlap=None)
    decoder = MusicgenDecoderConfig(vocab_size=codebook, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=64, num_codebooks=4, max_position_embeddings=2048,
                                    pad_token_id=codebook, bos_token_id=codebook, dropout=0.0)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    config.decoder_start_token_id = codebook
    config.pad_token_id = codebook
    torch.manual_seed(_SEED + 2)
    model = MusicgenForConditionalGeneration(config).eval()
    randomize_codebooks(model.audio_encoder)
    gen = model.generation_config
    gen.decoder_start_token_id = codebook
    gen.pad_token_id = codebook
    gen.bos_token_id = codebook
    gen.do_sample, gen.top_k, gen.guidance_scale, gen.max_length = True, 250, 3.0, 1503
    processor = MusicgenProcessor(feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32000),
                                  tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
