"""How closely the app's fast music decoder follows the fp32 reference on a checkpoint, beside how much two fp32
runs with different seeds differ anyway.

    python scripts/parity.py --json                                   # the tiny demo model
    python scripts/parity.py --checkpoint facebook/musicgen-small --json   # Hub id (cache or download) or folder

The fp32 reference (transformers, fp32 T5 and decoder) samples two clips with seeds A and B. On clip A's codes, as
teacher tokens, both the reference and the fast loop as the app serves it (int8 T5, int5 decoder through the native
kernel, int8 KV cache; `--weights` to choose) predict every next code under classifier-free guidance:

* `kl` (nats) and `kl_share` (that over the reference's own KL from a uniform guess), per codebook: fast vs fp32
  on clip A, beside fp32 on clip A vs fp32 on clip B (same positions, other history: the seed's spread);
* `top1`: how often the most likely codes agree, the same two ways;
* `mel_l1_db`: one code per position is drawn from each prediction with shared random numbers (the same draws for
  fast and fp32), the codes are decoded by EnCodec and compared as log-mel spectrograms (mean absolute dB); beside
  it, the same with the reference drawing twice with different random numbers.

A fast loop that is right shows `kl` far below the seed spread, `top1` close to 1, and a `mel_l1_db` well under
the fp32 spread. Every figure is printed as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(sample_rate / 2), n_mels + 2))
    bank = np.zeros((n_mels, bins.size))
    for m in range(n_mels):
        low, mid, high = edges[m], edges[m + 1], edges[m + 2]
        rising = (bins - low) / max(mid - low, 1e-9)
        falling = (high - bins) / max(high - mid, 1e-9)
        bank[m] = np.clip(np.minimum(rising, falling), 0.0, None)
    return bank


def log_mel(samples: np.ndarray, sample_rate: int, n_fft: int = 2048, hop: int = 512, n_mels: int = 64,
            floor_db: float = 80.0) -> np.ndarray:
    """(n_mels, frames) log-mel power in dB, floored `floor_db` below its maximum (silence does not dominate)."""
    from scipy.signal import stft

    mono = samples.mean(axis=-1) if samples.ndim == 2 else samples
    _, _, spectrum = stft(mono.astype(np.float64), fs=sample_rate, nperseg=n_fft, noverlap=n_fft - hop,
                          boundary=None, padded=False)
    power = mel_filterbank(sample_rate, n_fft, n_mels) @ (np.abs(spectrum) ** 2)
    db = 10.0 * np.log10(np.maximum(power, 1e-12))
    return np.maximum(db, db.max() - floor_db)


def mel_distance(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of two clips' log-mel spectrograms, in dB (over the shorter clip)."""
    n = min(a.shape[0], b.shape[0])
    return float(np.mean(np.abs(log_mel(a[:n], sample_rate) - log_mel(b[:n], sample_rate))))


def coupled_draw(logits, sampling, uniforms):
    """One code per (position, codebook) from (T, K, V) logits with given uniforms (T, K): temperature and top-k
    as the app samples, then the inverse CDF in code order, so two close distributions given the same uniforms
    mostly draw the same code."""
    import torch

    scaled = logits / max(sampling.temperature, 1e-5)
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cdf, uniforms[..., None].to(cdf.dtype)).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def codes_from_predictions(drawn, delays: list[int], frames: int):
    """(T, K) codes drawn at each output position → (K, frames): frame f of codebook k is predicted at f + delay_k."""
    import torch

    return torch.stack([drawn[delays[k]: delays[k] + frames, k] for k in range(len(delays))])


def run(args) -> dict:
    import torch
    from transformers import AutoProcessor

    from pipeline.artifacts import ArtifactSpec, redact_paths, resolve
    from pipeline.music import MusicRequest, Sampling
    from pipeline.music.generator import MusicGenerator
    from pipeline.music.lm import codebook_delays
    from pipeline.music.selfcheck import delayed, figures, guided, reference_logits, scored_positions
    from pipeline.runtime import quiet_libraries
    from pipeline.settings import MUSIC_REVISIONS, Settings

    quiet_libraries()
    started = time.perf_counter()
    settings = Settings.from_env()
    if args.checkpoint:
        revision = args.revision or MUSIC_REVISIONS.get(args.checkpoint, "main")
        path = resolve(ArtifactSpec("music model", args.checkpoint, revision), token=settings.hf_token or None).path
        name = args.checkpoint
    else:
        from pipeline.demo_models import ensure_demo_models

        path, name = ensure_demo_models(settings.cache_dir).music, "tiny random-weight demo model"
    sampling = Sampling()
    scale = sampling.guidance_scale

    # the reference: every weight in fp32, transformers' own generate
    from transformers import MusicgenForConditionalGeneration

    if json.loads((Path(path) / "config.json").read_text()).get("model_type") == "musicgen_melody":
        raise SystemExit("MusicGen-Melody always runs on the reference backend: nothing to compare")
    model = MusicgenForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    reference = MusicGenerator(model, processor, backend="reference", first_chunk_s=settings.first_chunk_s,
                               stream_chunk_s=settings.stream_chunk_s)
    runs = [reference.generate(MusicRequest(args.prompt, args.seconds, seed=seed), write=False) for seed in args.seeds]
    frames = runs[0].codes.shape[-1]
    config = model.decoder.config
    delays = codebook_delays(config.num_codebooks, getattr(config, "audio_channels", 1))
    positions = frames + max(delays)
    scored = scored_positions(delays, positions) & (torch.arange(positions)[:, None] - torch.tensor(delays) < frames)
    ids, mask = reference.tokenize(args.prompt)
    teacher = [delayed(torch.as_tensor(run.codes), config.pad_token_id, delays, positions) for run in runs]
    fp32 = [reference_logits(model, ids, mask, tokens, scale) for tokens in teacher]

    # the fast loop as the app loads it
    fast = MusicGenerator.load(Path(path), weights=args.weights, cache_dir=settings.cache_dir,
                               native_kernels=settings.native_kernels)
    if fast.lm is None:
        raise SystemExit(f"{name}: the fast backend does not run this model")
    fast_logits = guided(fast.lm.teacher_forced_logits(ids, mask, teacher[0]).float().cpu(), scale)

    fast_vs = figures(fp32[0], fast_logits, scored)
    spread = figures(fp32[0], fp32[1], scored)

    generator = torch.Generator().manual_seed(args.seeds[0])
    shared = torch.rand(positions, len(delays), generator=generator)
    other = torch.rand(positions, len(delays), generator=generator)
    audio = {}
    for label, logits, uniforms in (("fp32", fp32[0], shared), ("fast", fast_logits, shared),
                                    ("fp32_other_draws", fp32[0], other)):
        codes = codes_from_predictions(coupled_draw(logits, sampling, uniforms), delays, frames)
        audio[label] = reference.decode_reference(codes)
    rate = reference.sample_rate

    def rounded(values):
        return [float(f"{v:.4g}") for v in values]

    return {
        "checkpoint": redact_paths(str(name), REPO_ROOT), "weights": fast.weights, "backend": fast.backend,
        "fused_native_layers": fast.lm.fused, "prompt": args.prompt, "seconds": args.seconds, "frames": frames,
        "seeds": list(args.seeds), "guidance_scale": scale,
        "kl": {"fast_vs_fp32": rounded(fast_vs["kl"]), "fp32_seed_spread": rounded(spread["kl"])},
        "kl_share": {"fast_vs_fp32": rounded(fast_vs["kl_share"]), "fp32_seed_spread": rounded(spread["kl_share"])},
        "top1": {"fast_vs_fp32": rounded(fast_vs["top1"]), "fp32_seed_spread": rounded(spread["top1"])},
        "mel_l1_db": {"fast_vs_fp32": round(mel_distance(audio["fast"], audio["fp32"], rate), 3),
                      "fp32_seed_spread": round(mel_distance(audio["fp32_other_draws"], audio["fp32"], rate), 3)},
        "threads": torch.get_num_threads(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="MusicGen folder or Hub id (default: the tiny demo model)")
    parser.add_argument("--revision", help="Hub revision (default: the app's pin for known ids, else main)")
    parser.add_argument("--weights", default="int5", choices=("int5", "int4", "int8", "bf16", "fp32"),
                        help="the fast decoder's weights (default int5, as the app on CPU)")
    parser.add_argument("--prompt", default="warm lo-fi hip hop beat with soft piano chords, 80 BPM")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the compared clips")
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2), metavar=("A", "B"))
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=None if args.json else 1, ensure_ascii=False), flush=True)
    return result


if __name__ == "__main__":
    main()
