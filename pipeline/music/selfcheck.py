"""Before the music model serves, its fast decode loop is checked against the fp32 reference on the loaded weights.

The fast loop (`lm.FastMusicLM`: int5 weights through the project's C kernel, an int8 KV cache) was tuned on
random-weight models; trained checkpoints have outlier channels random ones lack. So at load, on a fixed prompt:

1. the fp32 transformers decoder (still in memory: packing frees it) gives the teacher tokens and the reference
   next-token logits, under classifier-free guidance as the app samples them;
2. the fast loop is built and run under teacher forcing on the same tokens;
3. per codebook, the mean next-token KL(reference ‖ fast) and the top-1 agreement decide: within the thresholds
   the fast loop serves; else int8 weights are tried, then transformers' own `generate` (the reference backend).

KL is judged as a share of what the reference knows, KL(reference ‖ uniform) = log V − entropy: a random-weight
model predicts nearly flat distributions (about 0.01-0.1 nats from uniform), a trained one peaked ones (several
nats), so one absolute KL bound would be either blind on the first or needlessly strict on the second. A share of
1 means the fast loop's predictions carry no more of the reference's information than a uniform guess.

Teacher tokens: uniformly random codes are far from anything a trained model has seen and make its predictions
flat, so KL says little. The tokens are instead sampled from the reference's own predictions (one parallel pass
on random codes, then the sampled codes are fed back: a cheap step towards what the model itself would write),
in MusicGen's delay pattern, and only positions where a codebook predicts a real code are scored.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .generator import MusicGenerator
from .lm import FastMusicLM, codebook_delays, sample
from .request import Sampling

PROMPT = "gentle acoustic guitar and soft piano, warm and calm, 90 BPM"
POSITIONS = 24
SEED = 20240611
# which weights to try next when a format fails; anything else falls back to the reference backend
FALLBACK_WEIGHTS = {"int5-native": "int8", "int4-native": "int8", "int4-aten": "int8"}


@dataclass(frozen=True)
class Thresholds:
    max_kl_share: float  # a codebook's mean KL(reference ‖ fast) over its mean KL(reference ‖ uniform)
    min_top1: float  # fraction of positions where fast and reference agree on the most likely code


@dataclass(frozen=True)
class Probe:
    """The reference's side of the check: prompt, teacher tokens (1, K, T), guided fp32 logits (T, K, V) and
    which (position, codebook) pairs predict a real code."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    scored: torch.Tensor
    guidance_scale: float
    seconds: float


@dataclass(frozen=True)
class Figures:
    """One format's comparison with the reference, per codebook: KL (nats), KL as a share of the reference's own
    information, and top-1 agreement."""

    weights: str
    kl: tuple[float, ...]
    kl_share: tuple[float, ...]
    top1: tuple[float, ...]
    passed: bool
    seconds: float

    def as_dict(self) -> dict:
        return {"weights": self.weights, "kl": [float(f"{v:.3g}") for v in self.kl],
                "kl_share": [float(f"{v:.3g}") for v in self.kl_share], "top1": [round(v, 4) for v in self.top1],
                "passed": self.passed, "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class SelfCheck:
    """What the load-time check found and decided: every format tried, in order, and the one that serves."""

    checks: tuple[Figures, ...]
    backend: str
    weights: str
    thresholds: Thresholds
    seconds: float  # everything, reloads for fallbacks included
    reference_seconds: float  # the fp32 side of the check (its teacher tokens and logits)
    summary: str
    reused: bool = False  # the figures were measured at an earlier start on the same packed bytes (`packcache`)

    @property
    def fell_back(self) -> bool:
        return len(self.checks) > 1 or (bool(self.checks) and not self.checks[-1].passed)

    def as_dict(self) -> dict:
        return {"summary": self.summary, "backend": self.backend, "weights": self.weights,
                "fell_back": self.fell_back, "reused": self.reused, "seconds": round(self.seconds, 2),
                "check_seconds": round(self.reference_seconds + sum(c.seconds for c in self.checks), 2),
                "thresholds": {"max_kl_share": self.thresholds.max_kl_share, "min_top1": self.thresholds.min_top1},
                "checks": [c.as_dict() for c in self.checks]}


def guided(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2, ...) conditional and unconditional rows → what is sampled: uncond + (cond − uncond) · scale."""
    return logits[1] + (logits[0] - logits[1]) * scale if scale > 1.0 else logits[0]


def reference_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: torch.Tensor,
                     guidance_scale: float, encoded: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 transformers decoder's next-token logits (T, K, V) for teacher tokens (1, K, T), guided."""
    k, t = tokens.shape[1], tokens.shape[2]
    with torch.inference_mode():
        if encoded is None:
            encoded = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = model(encoder_outputs=(torch.cat([encoded, torch.zeros_like(encoded)]),),
                    attention_mask=torch.cat([attention_mask, torch.zeros_like(attention_mask)]),
                    decoder_input_ids=torch.cat([tokens, tokens]).reshape(2 * k, t)).logits
    return guided(out.float().reshape(2, k, t, -1).permute(0, 2, 1, 3), guidance_scale)


def delayed(codes: torch.Tensor, pad: int, delays: list[int], positions: int) -> torch.Tensor:
    """(K, F) frames → decoder input tokens (1, K, positions): position 0 is all padding, and codebook k holds
    frame p − 1 − delay_k at position p (padding before its first frame and after the last)."""
    k = codes.shape[0]
    tokens = torch.full((1, k, positions), pad, dtype=torch.long)
    for c, delay in enumerate(delays):
        frames = codes[c, : max(0, positions - 1 - delay)]
        tokens[0, c, 1 + delay: 1 + delay + frames.shape[0]] = frames
    return tokens


def scored_positions(delays: list[int], positions: int) -> torch.Tensor:
    """(T, K) bool: the output at position p predicts frame p − delay_k of codebook k, a real code when ≥ 0."""
    p = torch.arange(positions)[:, None]
    return p >= torch.tensor(delays)[None, :]


def probe(model, processor, *, prompt: str = PROMPT, positions: int = POSITIONS, seed: int = SEED,
          guidance_scale: float | None = None) -> Probe:
    """Run the reference side on a loaded `MusicgenForConditionalGeneration` (before the fast loop frees it)."""
    started = time.perf_counter()
    sampling = Sampling()
    scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
    config = model.decoder.config
    k, vocab, pad = config.num_codebooks, config.vocab_size, config.pad_token_id
    delays = codebook_delays(k, getattr(config, "audio_channels", 1))
    inputs = processor(text=[prompt], return_tensors="pt", padding=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        # float32: on a GPU the text encoder may already be in half precision; the reference decoder is not
        encoded = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    random_codes = torch.randint(0, vocab, (k, positions), generator=generator)
    first = reference_logits(model, ids, mask, delayed(random_codes, pad, delays, positions), scale, encoded)
    # the code each position's prediction samples, read back as frames: frame f of codebook k is predicted at
    # position f + delay_k
    drawn = sample(first.reshape(-1, vocab), sampling, generator).reshape(positions, k)
    codes = torch.stack([torch.nn.functional.pad(drawn[delays[c]:, c], (0, delays[c]), value=pad) for c in range(k)])
    tokens = delayed(codes, pad, delays, positions)
    logits = reference_logits(model, ids, mask, tokens, scale, encoded)
    return Probe(ids, mask, tokens, logits, scored_positions(delays, positions), scale,
                 time.perf_counter() - started)


def figures(reference: torch.Tensor, fast: torch.Tensor, scored: torch.Tensor) -> dict[str, list[float]]:
    """Per codebook over scored positions of (T, K, V) logits: mean KL(reference ‖ fast) in nats ("kl"), that
    over the mean KL(reference ‖ uniform) ("kl_share"), and the share of positions whose top-1 codes agree."""
    log_ref = torch.log_softmax(reference.double(), dim=-1)
    log_fast = torch.log_softmax(fast.double(), dim=-1)
    p_ref = log_ref.exp()
    kl = (p_ref * (log_ref - log_fast)).sum(-1)  # (T, K)
    information = (p_ref * (log_ref + math.log(reference.shape[-1]))).sum(-1)
    agree = (reference.argmax(-1) == fast.argmax(-1)).double()
    weight = scored.double()
    count = weight.sum(0).clamp(min=1)

    def mean(values):
        return (values * weight).sum(0) / count

    return {"kl": mean(kl).tolist(), "kl_share": (mean(kl) / mean(information).clamp(min=1e-12)).tolist(),
            "top1": mean(agree).tolist()}


def compare(lm: FastMusicLM, reference: Probe, thresholds: Thresholds) -> Figures:
    """Teacher-force the fast loop on the probe's tokens and judge it against the thresholds."""
    started = time.perf_counter()
    got = lm.teacher_forced_logits(reference.input_ids, reference.attention_mask, reference.tokens,
                                   guidance=reference.guidance_scale > 1.0)
    fast = guided(got.float().cpu(), reference.guidance_scale)
    found = figures(reference.logits, fast, reference.scored)
    passed = _passes(found["kl_share"], found["top1"], thresholds)
    return Figures(lm.format, tuple(found["kl"]), tuple(found["kl_share"]), tuple(found["top1"]), passed,
                   time.perf_counter() - started)


class _ProbingGenerator(MusicGenerator):
    """`MusicGenerator.load` builds its result with `cls(model, processor, ...)`: this subclass sees the fp32
    model there, after loading and before the fast loop packs it and frees the reference decoder."""

    def __init__(self, model, processor, *, probe_into: list, **options):
        if not probe_into and options.get("backend", "fast") == "fast" and \
                model.config.model_type != "musicgen_melody":
            probe_into.append(probe(model, processor))
        super().__init__(model, processor, **options)


def load_checked(path: str | Path, thresholds: Thresholds, *, check: bool = True, packed_cache: bool = True,
                 **options) -> tuple[MusicGenerator, SelfCheck | None]:
    """A `MusicGenerator` for a checkpoint folder (options as `pipeline.music.load_model`), its fast loop checked
    against the fp32 reference first; None for the check when it did not run (off, or the reference backend).

    With `packed_cache`, the packed weights and the check's figures on them are kept in `cache_dir` (`packcache`):
    a later start with the same checkpoint, code and CPU loads those bytes and judges the stored figures against
    `thresholds` instead of packing and probing again."""
    started = time.perf_counter()
    entry = _entry(path, options) if packed_cache and options.get("backend", "fast") == "fast" else None
    if not check:
        return MusicGenerator.load(Path(path), packs=entry, **options), None
    if entry is not None:
        reused = _reuse(path, entry, thresholds, options, started)
        if reused is not None:
            return reused
    reference: list[Probe] = []
    generator = _ProbingGenerator.load(Path(path), probe_into=reference, packs=entry, **options)
    if generator.lm is None or not reference:
        return generator, None
    checks = [compare(generator.lm, reference[0], thresholds)]
    if entry is not None and checks[0].weights == entry.format:
        entry.save_figures({"weights": checks[0].weights, "kl": list(checks[0].kl),  # full precision
                            "kl_share": list(checks[0].kl_share), "top1": list(checks[0].top1)})
    while not checks[-1].passed:
        weights = FALLBACK_WEIGHTS.get(checks[-1].weights)
        generator = None
        gc.collect()  # the failed loop's packed weights go before the next copy is loaded
        if weights is None:
            generator = MusicGenerator.load(Path(path), **{**options, "backend": "reference"})
            break
        generator = _ProbingGenerator.load(Path(path), probe_into=reference, **{**options, "weights": weights})
        checks.append(compare(generator.lm, reference[0], thresholds))
    return generator, SelfCheck(tuple(checks), generator.backend, generator.weights, thresholds,
                                time.perf_counter() - started, reference[0].seconds, _summary(checks, generator))


def _entry(path, options):
    from .packcache import PackEntry
    from .quantize import resolve_format

    fmt, kernel = resolve_format(options.get("weights", "int5"), options.get("device", "cpu"),
                                 options.get("cache_dir"), options.get("native_kernels", True))
    return PackEntry.open(options.get("cache_dir"), Path(path), fmt, kernel)


def _passes(kl_share, top1, thresholds: Thresholds) -> bool:
    return all(math.isfinite(v) and v <= thresholds.max_kl_share for v in kl_share) and \
        all(v >= thresholds.min_top1 for v in top1)


def _reuse(path, entry, thresholds: Thresholds, options: dict, started: float):
    """The generator on the stored packed weights with the stored figures, when the figures pass today's
    thresholds and the bytes they were measured on load intact; else None (the full check runs)."""
    stored = entry.recorded_figures()
    if not stored or not _passes(stored["kl_share"], stored["top1"], thresholds):
        return None
    generator = MusicGenerator.load(Path(path), packs=entry, **options)
    if generator.lm is None or not generator.lm.packs_reused or entry.figures() != stored or \
            stored.get("weights") != generator.weights:
        return None  # rare (a damaged entry was just rebuilt): the caller loads again and measures
    figures = Figures(generator.weights, tuple(stored["kl"]), tuple(stored["kl_share"]), tuple(stored["top1"]),
                      True, 0.0)
    summary = _summary([figures], generator) + " (measured at an earlier start on these same packed weights)"
    return generator, SelfCheck((figures,), generator.backend, generator.weights, thresholds,
                                time.perf_counter() - started, 0.0, summary, reused=True)


def _summary(checks: list[Figures], generator: MusicGenerator) -> str:
    def worst(f: Figures) -> str:
        # rounded down, so that 99.7% never reads as "100%"
        agree = math.floor(1000 * min(f.top1)) / 10
        same = "at every position" if agree >= 100 else f"at {agree:g}% of positions or more"
        return (f"KL ≤ {max(f.kl):.2g} nats ({100 * max(f.kl_share):.2g}% of the reference's information), "
                f"the same most likely code {same}")

    if checks[-1].passed and len(checks) == 1:
        return f"fast loop ({checks[0].weights}) matches the fp32 reference: {worst(checks[0])}"
    failed = "; ".join(f"{f.weights} failed ({worst(f)})" for f in checks if not f.passed)
    serving = f"{generator.backend} backend, {generator.weights} weights"
    return f"self-check: {failed}; serving the {serving}"
