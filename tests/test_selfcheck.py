"""The music model's load-time self-check: the fast decoder against the fp32 reference, and its fallbacks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.settings import Settings


def _thresholds():
    from pipeline.music.selfcheck import Thresholds

    defaults = Settings()
    return Thresholds(defaults.selfcheck_max_kl_share, defaults.selfcheck_min_top1)


@pytest.fixture(scope="module")
def tileable_checkpoint(tmp_path_factory, demo_paths):
    """A small MusicGen saved to disk whose decoder shapes the native kernel tiles (multiples of 512), so that the
    fused C layers with their int8 KV cache are what the check runs (the tiny demo model takes PyTorch's int8)."""
    from transformers import AutoProcessor

    from tests.conftest import small_tileable_musicgen

    processor = AutoProcessor.from_pretrained(demo_paths.music)
    model = small_tileable_musicgen(text_vocab=len(processor.tokenizer))
    folder = tmp_path_factory.mktemp("tileable-musicgen")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def corrupted_kernel(monkeypatch):
    """Every matrix the native kernel packs gets its two 4-bit halves swapped in each byte: the kind of layout
    mistake a kernel change could make, which the self-check must catch."""
    from pipeline.music import native, packcache

    original = native.PackedLowBit.__init__
    # a changed packer gets a new cache key from its source; a monkeypatch does not change the source
    monkeypatch.setattr(packcache.PackEntry, "open", classmethod(lambda cls, *args: None))

    def packed_then_corrupted(self, weight, bits=5, kernel=None):
        original(self, weight, bits=bits, kernel=kernel)
        self.weight = ((self.weight >> 4) | (self.weight << 4)).contiguous()

    monkeypatch.setattr(native.PackedLowBit, "__init__", packed_then_corrupted)


def test_the_fast_decoder_passes_its_self_check_on_the_demo_model(demo_paths, cache_dir):
    from pipeline.music import MusicRequest
    from pipeline.music.selfcheck import load_checked

    generator, check = load_checked(demo_paths.music, _thresholds(), weights="int5", cache_dir=str(cache_dir))
    assert check is not None and len(check.checks) == 1 and check.checks[0].passed and not check.fell_back
    assert generator.backend == "fast" and check.weights == generator.weights == check.checks[0].weights
    figures = check.checks[0]
    assert len(figures.kl) == len(figures.top1) == len(figures.kl_share) == 4
    json.dumps(check.as_dict())
    assert generator.generate(MusicRequest("calm piano", 1.0, seed=1), write=False).samples.size


def test_the_fused_kernel_passes_and_a_corrupted_one_falls_back_to_int8(tileable_checkpoint, cache_dir,
                                                                        request):
    from pipeline.music.selfcheck import load_checked

    generator, check = load_checked(tileable_checkpoint, _thresholds(), weights="int5", cache_dir=str(cache_dir))
    if generator.lm is None or not generator.lm.fused:
        pytest.skip("no native kernel on this machine")
    assert check.checks[0].weights == "int5-native" and check.checks[0].passed and not check.fell_back
    good = check.checks[0]

    request.getfixturevalue("corrupted_kernel")
    generator, check = load_checked(tileable_checkpoint, _thresholds(), weights="int5", cache_dir=str(cache_dir))
    first, second = check.checks
    assert first.weights == "int5-native" and not first.passed
    assert second.weights == "int8" and second.passed
    assert generator.backend == "fast" and generator.weights == "int8" and check.fell_back
    assert "int5-native failed" in check.summary and "int8 weights" in check.summary
    # the corruption is far outside what the correct kernel shows, on both figures
    assert max(first.kl_share) > 5 * max(good.kl_share) and min(first.top1) < min(good.top1)


def test_when_no_fast_format_agrees_the_reference_backend_serves(demo_paths, cache_dir):
    from pipeline.music import MusicRequest
    from pipeline.music.selfcheck import Thresholds, load_checked

    impossible = Thresholds(max_kl_share=0.0, min_top1=1.0)  # zero KL cannot be met by any quantized format
    generator, check = load_checked(demo_paths.music, impossible, weights="int5", cache_dir=str(cache_dir))
    assert generator.backend == "reference" and generator.lm is None
    assert [c.passed for c in check.checks] == [False] * len(check.checks)
    assert check.checks[-1].weights == "int8" and check.fell_back
    assert "serving the reference backend" in check.summary
    assert generator.generate(MusicRequest("calm piano", 1.0, seed=1), write=False).samples.size


def test_the_check_can_be_switched_off(demo_paths, cache_dir):
    from pipeline.music.selfcheck import load_checked

    generator, check = load_checked(demo_paths.music, _thresholds(), check=False, weights="int5",
                                    cache_dir=str(cache_dir))
    assert check is None and generator.backend == "fast"


def test_teacher_tokens_follow_the_delay_pattern():
    from pipeline.music.selfcheck import delayed, scored_positions

    codes = torch.arange(4 * 10).reshape(4, 10)
    tokens = delayed(codes, pad=99, delays=[0, 1, 2, 3], positions=6)
    assert tokens.shape == (1, 4, 6) and (tokens[0, :, 0] == 99).all()
    assert tokens[0, 0, 1:].tolist() == codes[0, :5].tolist()
    assert tokens[0, 3, :4].tolist() == [99] * 4 and tokens[0, 3, 4:].tolist() == codes[3, :2].tolist()
    scored = scored_positions([0, 1, 2, 3], 6)
    assert scored[:, 0].all() and scored[:, 3].tolist() == [False] * 3 + [True] * 3


def test_status_shows_the_fallback_without_paths_or_token(tileable_checkpoint, demo_paths, cache_dir,
                                                         corrupted_kernel):
    from pipeline.components import MUSIC, Components, status_report
    from pipeline.music.native import load_kernel

    if load_kernel(str(cache_dir)) is None:
        pytest.skip("no native kernel on this machine")
    token = "hf_secretTokenValue123"
    settings = Settings(caption_model=str(demo_paths.caption), clip_model=str(demo_paths.clip),
                        music_model=str(tileable_checkpoint), cache_dir=str(cache_dir), hf_token=token)
    components = Components(settings, on_compute_thread=lambda: False)
    assert components.wait_until_ready(timeout=600)
    report = status_report(components.status(), settings, device="cpu", queue_length=3)
    text = json.dumps(report)
    music = next(c for c in report["components"] if c["name"] == MUSIC)
    assert music["state"] == "ready" and music["weights"] == "int8" and music["source"] == "local"
    assert music["selfcheck"]["fell_back"] and [c["passed"] for c in music["selfcheck"]["checks"]] == [False, True]
    assert music["load_s"] > 0 and music["device"] == "cpu" and report["queue_length"] == 3
    assert report["catalog"]["songs"] > 0
    assert token not in text and str(Path.home()) not in text and str(cache_dir) not in text
    assert str(tileable_checkpoint) not in text


def test_parity_script_on_the_demo_model(demo_paths, cache_dir, monkeypatch):
    from scripts import parity

    monkeypatch.setenv("I2M_CACHE_DIR", str(cache_dir))
    result = parity.main(["--seconds", "1", "--json"])
    assert result["weights"] == "int5-native" and result["frames"] == 50
    for figure in ("kl", "kl_share", "top1"):
        assert len(result[figure]["fast_vs_fp32"]) == len(result[figure]["fp32_seed_spread"]) == 4
    # on the demo model the fast loop is far closer to fp32 than a different seed is
    assert max(result["kl"]["fast_vs_fp32"]) < 0.1 * min(result["kl"]["fp32_seed_spread"])
    assert result["mel_l1_db"]["fast_vs_fp32"] < result["mel_l1_db"]["fp32_seed_spread"]
    json.dumps(result)


def test_mel_distance_sees_a_changed_sound():
    import numpy as np

    from scripts.parity import mel_distance

    rate = 32000
    t = np.arange(rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    assert mel_distance(tone, tone.copy(), rate) == 0.0
    near = mel_distance(tone, tone * 0.98, rate)
    far = mel_distance(tone, 0.5 * np.sin(2 * np.pi * 1760 * t), rate)
    assert 0 < near < 1.0 < far


def test_packed_weights_and_their_figures_are_reused_and_a_damaged_entry_is_rebuilt(tileable_checkpoint, cache_dir,
                                                                                   tmp_path):
    import shutil

    from pipeline.music import MusicRequest
    from pipeline.music.native import load_kernel
    from pipeline.music.packcache import FOLDER
    from pipeline.music.selfcheck import Thresholds, load_checked

    if load_kernel(str(cache_dir)) is None:
        pytest.skip("no native kernel on this machine")
    checkpoint = tmp_path / "checkpoint"  # a folder of its own: its own cache key, whatever other tests stored
    shutil.copytree(tileable_checkpoint, checkpoint)
    request = MusicRequest("calm piano", 1.0, seed=3)

    def load(thresholds=None):
        generator, check = load_checked(checkpoint, thresholds or _thresholds(), weights="int5",
                                        cache_dir=str(cache_dir))
        assert generator.weights == "int5-native" and check.checks[-1].passed
        return generator, check, generator.generate(request, write=False).samples

    first, first_check, first_audio = load()
    assert not first_check.reused and not first.lm.packs_reused
    again, again_check, again_audio = load()
    assert again_check.reused and again.lm.packs_reused and again_check.reference_seconds == 0
    assert again_check.checks[0].kl == first_check.checks[0].kl and again_check.as_dict()["reused"]
    assert "earlier start" in again_check.summary
    assert (again_audio == first_audio).all()  # the stored bytes are the packed bytes

    # stored figures are judged against today's thresholds: tighter ones that they fail send the load through the
    # full check (which fails as well and falls back to int8), not through the cache
    strict = Thresholds(max_kl_share=max(first_check.checks[0].kl_share) * 0.5, min_top1=0.0)
    fallback, strict_check = load_checked(checkpoint, strict, weights="int5", cache_dir=str(cache_dir))
    assert not strict_check.reused and not strict_check.checks[0].passed and fallback.weights == "int8"

    entries = list((cache_dir / FOLDER).glob("*.safetensors"))
    entry = max(entries, key=lambda p: p.stat().st_mtime)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the packed weights
    entry.write_bytes(bytes(data))
    _, rebuilt_check, rebuilt_audio = load()
    assert not rebuilt_check.reused and rebuilt_check.reference_seconds > 0  # measured again
    assert (rebuilt_audio == first_audio).all()
    _, after_check, _ = load()
    assert after_check.reused  # the rebuilt entry is whole again

    # an edited checkpoint is another key: nothing stored for the old one is used
    weights = next(checkpoint.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _, edited_check, _ = load()
    assert not edited_check.reused
