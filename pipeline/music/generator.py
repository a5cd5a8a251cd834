"""Music from a text prompt with MusicGen (transformers classes, the `facebook/musicgen-*` checkpoints).

`MusicGenerator.stream()` yields loudness-normalised audio chunks (≤ `stream_chunk_s`) while codes are being
sampled; `generate()` returns the same samples at once. For the same request and seed both equal the non-streamed
reference (`decode_reference`: one EnCodec pass over all the codes) up to float rounding (~1e-7; see
`codec.py`) — the chunked codec is also twice as fast as one pass over a long clip.

Two backends sample the codes, chosen by the `I2M_MUSIC_BACKEND` setting:
* `fast` (default): `lm.FastMusicLM`, the project's lean loop with quantized weights;
* `reference`: transformers' own `generate`, streamed through a per-step hook (a stopping criterion that sees the
  tokens after every step; `generate(streamer=...)` never ends its streamer). MusicGen-Melody always uses it.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..audio import LoudnessNormalizer, chunk_grid, write_wav
from ..errors import Cancelled, InputError
from ..memory import release_file_pages
from ..runtime import build_model
from .codec import LOOKAHEAD_FRAMES, StreamingCodec
from .lm import FastMusicLM, codebook_delays
from .request import MusicRequest

_GLOBAL_RNG_LOCK = threading.Lock()  # the reference backend samples from torch's global generator
# T5 sees at most this many prompt tokens: a 400-character prompt is ~100 tokens, and MusicGen was trained on
# short descriptions; the cap bounds the cross-attention every step reads
MAX_TEXT_TOKENS = 256
BACKENDS = ("fast", "reference")


@dataclass(frozen=True)
class Continuation:
    """Where a clip ended, so that a later request continues the same music without a seam: its last codes (the
    audio prompt of the next window) and the codec and loudness states just before its end was decoded."""

    codes: torch.Tensor = field(repr=False)  # (K, ≤ window - stride frames)
    codecs: tuple = field(repr=False)  # one StreamingCodec snapshot per audio channel
    normalizer: LoudnessNormalizer = field(repr=False)
    prompt: str = ""
    seconds: float = 0.0  # how much music led here (all clips of a chain)


@dataclass(frozen=True)
class AudioChunk:
    samples: np.ndarray  # (n,) mono or (n, 2) stereo, float32 in [-1, 1]
    sample_rate: int
    index: int
    start_s: float
    is_last: bool
    elapsed_s: float = 0.0  # since the request started
    clip_id: str = ""  # the same for every chunk of one request
    continuation: Continuation | None = field(default=None, repr=False)  # on the last chunk only


@dataclass(frozen=True)
class GeneratedMusic:
    samples: np.ndarray
    sample_rate: int
    duration_s: float
    seed: int
    prompt: str
    codes: np.ndarray = field(repr=False)  # (codebooks, frames)
    compute_s: float = 0.0
    first_chunk_s: float | None = None
    wav_path: Path | None = None
    clip_id: str = ""
    continuation: Continuation | None = field(default=None, repr=False)

    @property
    def rtf(self) -> float:
        return self.compute_s / self.duration_s if self.duration_s else math.inf


def _inline(fn):
    return fn()


def bake_weight_norm(module: torch.nn.Module) -> None:
    """Fold EnCodec's weight-norm parametrisations into plain weights: same output, no per-call recompute."""
    from torch.nn.utils import parametrize

    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)


class MusicGenerator:
    """Holds a loaded MusicGen model and its processor; `load()` builds one from a checkpoint folder."""

    def __init__(self, model, processor, *, device: str = "cpu", weights: str = "int5", backend: str = "fast",
                 cache_dir: str | None = None, native_kernels: bool = True, first_chunk_s: float = 0.5,
                 stream_chunk_s: float = 1.0, audio_dir: Path | None = None, keep_reference: bool = False,
                 window_s: float = 30.0, extend_stride_s: float = 18.0, packs=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if model.config.model_type == "musicgen_melody":
            backend = "reference"  # its decoder takes the text as a prefix, not through cross-attention
        bake_weight_norm(model.audio_encoder)
        self.device = device
        self.processor = processor
        self.sample_rate = int(model.config.audio_encoder.sampling_rate)
        self.frame_rate = int(model.config.audio_encoder.frame_rate)
        self.channels = int(getattr(model.config.decoder, "audio_channels", 1))
        self.num_codebooks = int(model.config.decoder.num_codebooks)
        # one window of the model: clips beyond it continue window by window (`window_s`, `extend_stride_s`)
        self.max_frames = int(model.config.decoder.max_position_embeddings) - self.num_codebooks - 1
        self.window_frames = min(self.max_frames, max(2, round(window_s * self.frame_rate)))
        self.stride_frames = min(self.window_frames, max(1, round(extend_stride_s * self.frame_rate)))
        self.first_chunk_frames = max(1, round(first_chunk_s * self.frame_rate))
        self.chunk_frames = max(1, round(stream_chunk_s * self.frame_rate))
        self.audio_dir = audio_dir
        self.backend = backend
        self._model = model.to(device)
        self.audio_encoder = self._model.audio_encoder
        self.delays = codebook_delays(self.num_codebooks, self.channels)
        if backend == "fast":
            self.lm: FastMusicLM | None = FastMusicLM(self._model, weights=weights, device=device,
                                                      cache_dir=cache_dir, native_kernels=native_kernels,
                                                      keep_reference=keep_reference, packs=packs)
            self.weights = self.lm.format
        else:
            self.lm = None
            self.weights = "fp32"
        self.engine = None  # see `serve_batched`
        self._run = _inline

    def serve_batched(self, max_batch: int, runner: Callable | None = None) -> None:
        """Decode concurrent requests together (`engine.Engine`, continuous batching) from now on. `runner(fn)`
        runs model work where it must run (the app's compute thread); `stream()` and `generate()` are then called
        from the requests' own threads, which only wait and normalise audio, and hand every model call (batched
        decode steps, codec) to the runner."""
        if self.lm is None:
            return  # the reference backend runs one request at a time
        from .engine import Engine

        self._run = runner or _inline
        self.engine = Engine(self.lm, max_batch=max_batch, runner=self._run)

    @classmethod
    def load(cls, path: Path, *, dtype=None, **options) -> "MusicGenerator":
        import json

        from transformers import AutoProcessor

        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "musicgen")
        if model_type == "musicgen_melody":
            from transformers import MusicgenMelodyForConditionalGeneration as ModelClass
        else:
            from transformers import MusicgenForConditionalGeneration as ModelClass
        model = build_model(ModelClass.from_pretrained, path, dtype=torch.float32).eval()
        if options.get("device", "cpu") == "cpu" and options.get("weights", "int5") in ("int5", "int4", "int8"):
            # T5 runs once per request: dynamic int8 halves its time and saves ~330 MB; the text encoding it
            # conditions on stays at cosine 0.999 with fp32
            originals = [p.detach() for p in model.text_encoder.parameters()]
            model.text_encoder = torch.ao.quantization.quantize_dynamic(model.text_encoder, {torch.nn.Linear},
                                                                        dtype=torch.qint8)
            release_file_pages(originals)
            del originals
        elif dtype is not None and dtype != torch.float32:
            model.text_encoder.to(dtype)
        return cls(model, AutoProcessor.from_pretrained(path), **options)

    # -- codes ----------------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's T5 token ids and attention mask, (1, T) each."""
        inputs = self.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True,
                                max_length=MAX_TEXT_TOKENS)
        return inputs["input_ids"], inputs["attention_mask"]

    def n_frames(self, duration_s: float) -> int:
        frames = int(round(duration_s * self.frame_rate))
        if frames < 1:
            raise InputError("The duration is too short to make any audio.")
        if self.lm is None and frames > self.max_frames:
            raise InputError(f"The reference backend makes at most {self.max_frames / self.frame_rate:.0f} s per "
                             "clip.")
        return frames

    def frames(self, request: MusicRequest, cancel: threading.Event | None = None) -> Iterator[torch.Tensor]:
        """(K, n) blocks of complete code frames, in order, as the backend samples them (no audio yet)."""
        ids, mask = self.tokenize(request.prompt)
        n = self.n_frames(request.duration_s)
        prefix = request.continue_from.codes if request.continue_from is not None else None
        if self.lm is not None:
            decode = self.engine.frames if self.engine is not None else self.lm.frames
            yield from decode(ids, mask, n, seed=request.seed, sampling=request.sampling, cancel=cancel, prefix=prefix,
                              window=self.window_frames, stride=self.stride_frames)
        elif prefix is not None:
            raise InputError("Continuing a clip needs the fast music backend.")
        else:
            yield from self._reference_frames(ids, mask, n, request, cancel)

    def _reference_frames(self, ids, mask, n: int, request: MusicRequest,
                          cancel: threading.Event | None) -> Iterator[torch.Tensor]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        model = self._model
        pad = model.generation_config.pad_token_id
        k = self.num_codebooks
        delay = max(self.delays)
        steps = n + delay
        sampling = request.sampling
        _, pattern = model.decoder.build_delay_pattern_mask(
            torch.full((k, 1), pad, dtype=torch.long), pad_token_id=pad, max_length=steps + 1)
        updates: queue.Queue = queue.Queue()
        stop = threading.Event()

        class PerStepHook(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                masked = model.decoder.apply_delay_pattern_mask(input_ids, pattern)
                updates.put(masked[:k].clone())
                halt = stop.is_set() or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool)

        def run():
            try:
                with _GLOBAL_RNG_LOCK, torch.inference_mode():
                    torch.manual_seed(int(request.seed))
                    model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   do_sample=True, max_new_tokens=steps, min_new_tokens=steps,
                                   temperature=sampling.temperature, top_k=sampling.top_k or None,
                                   top_p=sampling.top_p if 0 < sampling.top_p < 1 else None,
                                   guidance_scale=sampling.guidance_scale,
                                   stopping_criteria=StoppingCriteriaList([PerStepHook()]))
                updates.put(None)
            except BaseException as exc:  # surfaced in the consuming thread
                updates.put(exc)

        worker = threading.Thread(target=run, name="musicgen-reference", daemon=True)
        worker.start()
        emitted = 0
        try:
            while True:
                item = updates.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                position = item.shape[-1] - 1
                complete = min(n, position - delay)
                if complete > emitted:
                    delays = self.delays
                    block = torch.stack([item[c, 1 + delays[c] + emitted: 1 + delays[c] + complete] for c in range(k)])
                    yield block
                    emitted = complete
        finally:
            stop.set()
            worker.join(timeout=60)
        if cancel is not None and cancel.is_set():
            raise Cancelled()

    # -- audio ----------------------------------------------------------------------------------------------------
    def _decode_one_shot(self, codes: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            if self.channels == 2:
                left = self.audio_encoder.decode(codes[0::2][None, None], [None]).audio_values[0, 0]
                right = self.audio_encoder.decode(codes[1::2][None, None], [None]).audio_values[0, 0]
                return torch.stack([left, right], dim=-1).float().cpu().numpy()
            return self.audio_encoder.decode(codes[None, None], [None]).audio_values[0, 0].float().cpu().numpy()

    def decode_reference(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """The non-streamed result for given codes: one EnCodec pass over the whole clip, then the same
        normalisation. `stream()` and `generate()` equal it up to float rounding (tests check 1e-5)."""
        codes = torch.as_tensor(codes)
        audio = self._decode_one_shot(codes)
        hop = self.sample_rate // self.frame_rate
        normalizer = LoudnessNormalizer()
        return np.concatenate([normalizer.process(audio[a * hop: b * hop])
                               for a, b in chunk_grid(codes.shape[-1], self.first_chunk_frames, self.chunk_frames)])

    def stream(self, request: MusicRequest, cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        """Audio chunks as soon as they are final: the first of `first_chunk_s`, then longer ones up to
        `stream_chunk_s` (`audio.chunk_grid`)."""
        return self._chunks(request, cancel, None)

    def _chunks(self, request: MusicRequest, cancel: threading.Event | None,
                codes_sink: list | None) -> Iterator[AudioChunk]:
        started = time.perf_counter()
        clip_id = uuid.uuid4().hex[:16]
        n = self.n_frames(request.duration_s)
        grid = chunk_grid(n, self.first_chunk_frames, self.chunk_frames)
        hop = self.sample_rate // self.frame_rate
        earlier = request.continue_from
        if earlier is not None:
            if len(earlier.codecs) != self.channels or earlier.codes.shape[0] != self.num_codebooks:
                raise InputError("That clip was made by another music model and cannot be continued here.")
            # the earlier clip's codec resumes where its end was decoded; the samples it already played are skipped
            decoders = [codec.snapshot() for codec in earlier.codecs]
            normalizer = copy.deepcopy(earlier.normalizer)
            skip = decoders[0].unfinished_samples
            tail = earlier.codes
        else:
            decoders = [StreamingCodec(self.audio_encoder) for _ in range(self.channels)]
            normalizer = LoudnessNormalizer()
            skip = 0
            tail = torch.zeros(self.num_codebooks, 0, dtype=torch.long)
        context = max(1, self.window_frames - self.stride_frames)
        waiting: list[torch.Tensor] = []  # code frames not yet handed to the codec
        pending: list[np.ndarray] = []  # final samples not yet emitted
        pending_samples = index = produced = 0
        for block in self.frames(request, cancel):
            produced += block.shape[-1]
            waiting.append(block)
            if codes_sink is not None:
                codes_sink.append(block)
            final = produced >= n
            # hand frames to the codec in chunk-sized batches: a call per frame would cost more than the audio
            if not final and produced < grid[index][1] + LOOKAHEAD_FRAMES:
                continue
            codes = torch.cat(waiting, dim=-1)
            waiting = []
            tail = torch.cat([tail, codes.cpu()], dim=-1)[:, -context:]
            audio = self._decode(decoders, codes, final=False)
            if final:  # the state a continuation resumes from: all frames in, the clip's end not yet decoded
                resume = self._run(lambda: tuple(decoder.snapshot() for decoder in decoders))
                audio = np.concatenate([audio, self._decode(decoders, codes[:, :0], final=True)], axis=0)
            if skip:
                audio, skip = audio[skip:], max(0, skip - audio.shape[0])
            if audio.shape[0]:
                pending.append(audio)
                pending_samples += audio.shape[0]
            while index < len(grid) and pending_samples >= (grid[index][1] - grid[index][0]) * hop:
                want = (grid[index][1] - grid[index][0]) * hop
                joined = np.concatenate(pending, axis=0)
                chunk, rest = joined[:want], joined[want:]
                pending, pending_samples = ([rest] if rest.shape[0] else []), rest.shape[0]
                samples = normalizer.process(chunk)
                last = index == len(grid) - 1
                continuation = None
                if last:
                    continuation = Continuation(codes=tail, codecs=resume, normalizer=copy.deepcopy(normalizer),
                                                prompt=request.prompt, seconds=n / self.frame_rate +
                                                (earlier.seconds if earlier is not None else 0.0))
                yield AudioChunk(samples=samples, sample_rate=self.sample_rate, index=index,
                                 start_s=grid[index][0] / self.frame_rate, is_last=last,
                                 elapsed_s=time.perf_counter() - started, clip_id=clip_id, continuation=continuation)
                index += 1

    def _decode(self, decoders: list[StreamingCodec], codes: torch.Tensor, final: bool) -> np.ndarray:
        return self._run(lambda: self._decode_here(decoders, codes, final))

    def _decode_here(self, decoders: list[StreamingCodec], codes: torch.Tensor, final: bool) -> np.ndarray:
        parts = [dec.push(codes[c::self.channels] if self.channels == 2 else codes, final=final)
                 for c, dec in enumerate(decoders)]
        audio = torch.stack([p[0, 0] for p in parts], dim=-1) if self.channels == 2 else parts[0][0, 0]
        return audio.float().cpu().numpy()

    def generate(self, request: MusicRequest, cancel: threading.Event | None = None,
                 write: bool = True) -> GeneratedMusic:
        """The whole clip at once: the same decode loop and chunked codec as `stream()`, so the same samples."""
        started = time.perf_counter()
        blocks: list[torch.Tensor] = []
        chunks = list(self._chunks(request, cancel, blocks))
        samples = np.concatenate([c.samples for c in chunks], axis=0)
        compute = time.perf_counter() - started
        path = write_wav(samples, self.sample_rate, self.audio_dir) if write and self.audio_dir else None
        return GeneratedMusic(samples=samples, sample_rate=self.sample_rate, duration_s=samples.shape[0] /
                              self.sample_rate, seed=request.seed, prompt=request.prompt,
                              codes=torch.cat(blocks, dim=-1).cpu().numpy(), compute_s=compute,
                              first_chunk_s=chunks[0].elapsed_s if chunks else None, wav_path=path,
                              clip_id=chunks[-1].clip_id, continuation=chunks[-1].continuation)
