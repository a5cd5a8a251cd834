"""Real-size BLIP-base, CLIP ViT-B/32 and MusicGen-small architectures with random weights, for benchmarks.

The Hub is out of reach here, but speed and memory depend on shapes, not on weight values, so these give true
figures. Configurations mirror the checkpoints' config.json files. `save_checkpoints(folder)` writes them with
`save_pretrained` (tokenizers included) so that the app can load them through its normal `from_pretrained`
path: point I2M_CAPTION_MODEL, I2M_CLIP_MODEL and I2M_MUSIC_MODEL at the printed folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def blip_base(seed: int = 0):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    vocab = {f"w{i}": i for i in range(30522)}
    for token, index in (("[PAD]", 0), ("[UNK]", 100), ("[CLS]", 101), ("[SEP]", 102), ("[MASK]", 103)):
        vocab.pop(f"w{index}")
        vocab[token] = index
    tokenizer = BertTokenizer(vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                         num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=512,
                         bos_token_id=30522, sep_token_id=102, pad_token_id=0, eos_token_id=102),
        vision_config=dict(hidden_size=768, image_size=384, intermediate_size=3072, num_attention_heads=12,
                           num_hidden_layers=12, patch_size=16),
        projection_dim=512)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 384, "width": 384}),
                              tokenizer=tokenizer)
    return model, processor


def clip_vit_b32(seed: int = 0):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip import CLIPImageProcessorPil

    alphabet = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    for i, symbol in enumerate(alphabet + [a + "</w>" for a in alphabet]):
        vocab[symbol] = i
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=32),
        projection_dim=512)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tokenizer)
    return model, processor


def musicgen_small(seed: int = 0, tokenizer_source: Path | None = None):
    import torch
    from transformers import (EncodecConfig, EncodecFeatureExtractor, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, MusicgenProcessor, T5Config, T5Tokenizer)

    from pipeline.demo_models import randomize_codebooks

    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    relative_attention_num_buckets=32, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)
    audio = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                          codebook_size=2048, codebook_dim=128, hidden_size=128, target_bandwidths=[2.2],
                          use_causal_conv=False, norm_type="weight_norm", normalize=False, pad_mode="reflect",
                          num_lstm_layers=2, compress=2, num_residual_layers=1, chunk_length_s=None, overlap=None)
    decoder = MusicgenDecoderConfig(vocab_size=2048, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    ffn_dim=4096, num_codebooks=4, max_position_embeddings=2048, pad_token_id=2048,
                                    bos_token_id=2048, dropout=0.1, activation_function="gelu")
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    config.decoder_start_token_id = 2048
    config.pad_token_id = 2048
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    randomize_codebooks(model.audio_encoder)
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = 2048
    gen.do_sample, gen.top_k, gen.guidance_scale, gen.max_length = True, 250, 3.0, 1503
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁w{i}", -float(i % 50) - 1) for i in range(32000)]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(32128 - len(pieces))]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    processor = MusicgenProcessor(feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32000),
                                  tokenizer=tokenizer)
    return model, processor


DEFAULT_FOLDER = Path.home() / ".cache" / "image-to-music" / "real-size"


def music_checkpoint(folder: Path | None = None) -> Path:
    """The real-size MusicGen-small checkpoint folder, written once (about 2.4 GB) and reused by every benchmark,
    which then loads it the way the app does (`MusicGenerator.load`)."""
    target = Path(folder or DEFAULT_FOLDER) / "music"
    if not (target / "config.json").is_file():
        import shutil
        import tempfile

        target.parent.mkdir(parents=True, exist_ok=True)
        model, processor = musicgen_small()
        # written beside the target and renamed, so an interrupted build is never mistaken for a checkpoint
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            if not (target / "config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                Path(tmp).rename(target)
                Path(tmp).mkdir()  # TemporaryDirectory removes what it made
    return target


def save_checkpoints(folder: Path) -> dict[str, Path]:
    """Write the three real-size checkpoints once (about 4 GB) and return their folders."""
    folder = Path(folder)
    out = {}
    out["music"] = music_checkpoint(folder)
    for name, builder in (("caption", blip_base), ("clip", clip_vit_b32)):
        target = folder / name
        if not (target / "config.json").is_file():
            model, processor = builder()
            model.save_pretrained(target)
            processor.save_pretrained(target)
            del model
        out[name] = target
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    paths = save_checkpoints(parser.parse_args().folder)
    for name, path in paths.items():
        print(f"I2M_{'CAPTION' if name == 'caption' else name.upper()}_MODEL={path}")
