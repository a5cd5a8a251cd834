"""Continuous batching: many requests decode together, one model step for all of them.

A decode step reads every weight of the model once, whatever the number of rows it computes, so on a CPU (bound
by memory bandwidth) a step for four listeners costs little more than a step for one. The engine keeps a set of
running requests (`lm.Decode`, up to `max_batch`) and, step after step, gathers their rows into one
`FastMusicLM.step`:

* a request joins at the next step boundary and leaves when it is done or cancelled (its consumer stopped
  reading, or its cancel event was set); the others never pause; beyond `max_batch` requests wait in line;
* batch-invariant: every row brings its own cache, position and text, every operation is row by row or
  row-independent (see `FastMusicLM.step`), and each request samples with its own generator, so a request's codes
  are exactly those it gets alone, whatever its batch mates;
* each step runs through `runner` (the app's single compute thread), so other model work — an Analyze for
  another visitor — runs between two steps.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import Cancelled
from .lm import PREFILL_COLUMNS, Decode, FastMusicLM
from .request import Sampling

_END = object()
# A consumer that has not taken a block for this long while blocks wait for it is gone (a server that stopped
# reading from a stream without closing it): its request leaves the batch instead of decoding for nobody.
STALE_S = 20.0
PREFILL_COLUMNS_SHARED = 4


@dataclass(eq=False)
class _Job:
    make: Callable[[], Decode]
    cancel: threading.Event | None
    output: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    gone: threading.Event = field(default_factory=threading.Event)  # the consumer stopped reading
    decode: Decode | None = None
    last_read: float = field(default_factory=time.monotonic)

    @property
    def stopped(self) -> bool:
        abandoned = not self.output.empty() and time.monotonic() - self.last_read > STALE_S
        return abandoned or self.gone.is_set() or (self.cancel is not None and self.cancel.is_set())


@dataclass(frozen=True)
class EngineStatus:
    running: int  # requests decoding now
    waiting: int  # requests in line for a place in the batch
    max_batch: int


class Engine:
    def __init__(self, lm: FastMusicLM, max_batch: int = 4, runner: Callable | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.lm = lm
        self.max_batch = max_batch
        self._runner = runner or (lambda fn: fn())
        self._waiting: collections.deque[_Job] = collections.deque()
        self._running: list[_Job] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.steps = 0  # steps run so far (benchmarks read it)

    def status(self) -> EngineStatus:
        with self._wake:
            return EngineStatus(len(self._running), len(self._waiting), self.max_batch)

    def frames(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_frames: int, *, seed: int,
               sampling: Sampling, cancel: threading.Event | None = None, prefix: torch.Tensor | None = None,
               window: int | None = None, stride: int | None = None) -> Iterator[torch.Tensor]:
        """The same (K, n) blocks as `FastMusicLM.frames` for this request, decoded in the shared batch. Raises
        Cancelled when `cancel` is set; closing the iterator takes the request out of the batch."""
        job = _Job(lambda: self.lm.decode(input_ids, attention_mask, n_frames, seed=seed, sampling=sampling,
                                          prefix=prefix, window=window, stride=stride), cancel)
        with self._wake:
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name="music-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        try:
            while True:
                item = job.output.get()
                job.last_read = time.monotonic()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.gone.set()
            with self._wake:
                if job in self._waiting:
                    self._waiting.remove(job)

    def _drive(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running:
                    self._wake.wait()
            try:
                self._runner(self._step)
            except BaseException as exc:  # a failed step fails every request in it; the engine goes on
                with self._wake:
                    failed, self._running = self._running, []
                for job in failed:
                    job.decode = None
                    job.output.put(exc)

    @torch.inference_mode()
    def _step(self) -> None:
        with self._wake:
            while self._waiting and len(self._running) < self.max_batch:
                self._running.append(self._waiting.popleft())
            jobs = list(self._running)
        active = []
        for job in jobs:
            if job.stopped:
                self._leave(job, Cancelled())
                continue
            if job.decode is None:
                try:
                    job.decode = job.make()  # the text encoder runs once, as the request joins
                except Exception as exc:  # noqa: BLE001 - handed to this request's consumer
                    self._leave(job, exc)
                    continue
            active.append(job)
        if not active:
            return
        tokens, positions, caches, texts, sizes = [], [], [], [], []
        # a continuation prefills its prompt several positions a step; with others in the batch only a few, so
        # that their steps stay short
        columns = PREFILL_COLUMNS if len(active) == 1 else PREFILL_COLUMNS_SHARED
        for job in active:
            t, p, c, x = job.decode.rows(columns)
            tokens.append(t)
            positions += p
            caches += c
            texts += x
            sizes.append(t.shape[0])
        logits = self.lm.step(torch.cat(tokens), positions, caches, texts)
        self.steps += 1
        start = 0
        for job, size in zip(active, sizes):
            for block in job.decode.advance(logits[start: start + size]):
                job.output.put(block)
            start += size
            if job.decode.done:
                self._leave(job, _END)

    def _leave(self, job: _Job, last) -> None:
        with self._wake:
            if job in self._running:
                self._running.remove(job)
        job.decode = None  # its caches go now, not when the consumer lets go
        job.output.put(last)
