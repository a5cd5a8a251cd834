"""Loudness normalisation and WAV files.

Normalisation must work while audio streams, so it is causal: a one-pole DC blocker (cut-off ≈ 5 Hz) removes any
offset, each chunk's gain comes from the RMS of everything produced so far (this chunk included), ramped linearly
from the previous chunk's gain to avoid clicks, then a soft limiter keeps peaks below full scale. Chunks follow a fixed grid (`chunk_grid`), so a streamed clip and the same
clip generated in one go are normalised identically.
"""

from __future__ import annotations

import io
import re
import time
import uuid
import wave
from pathlib import Path
from typing import Sequence

import numpy as np

TARGET_DBFS = -16.0
MAX_GAIN_DB = 24.0
MIN_GAIN_DB = -12.0
LIMIT = 0.891  # -1 dBFS: above this the soft limiter bends the signal
DC_POLE = 0.999  # y[n] = x[n] - x[n-1] + DC_POLE * y[n-1]: -3 dB at ~5 Hz for 32 kHz audio


# How much longer a streamed chunk may be than the one before. A listener starts playing at the first chunk; chunk
# i + 1 arrives r * (its length) of compute later (r: the real-time factor), while the player still holds what came
# before it. Chunks that grow by 1 / 0.8 keep arriving in time while r <= 0.8; a jump from 0.5 s straight to 1 s
# made two listeners at RTF 0.6 wait at their second chunk.
STREAM_RAMP = 1.25


def chunk_grid(n_frames: int, first: int, size: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the streamed chunks: `first` frames, then each up to `STREAM_RAMP` times the
    one before, until `size`."""
    bounds, start, width = [], 0, max(1, first)
    size = max(1, size)
    while start < n_frames:
        end = min(n_frames, start + width)
        bounds.append((start, end))
        start = end
        width = size if width >= size else min(size, max(width + 1, int(width * STREAM_RAMP)))
    return bounds


class LoudnessNormalizer:
    def __init__(self, target_dbfs: float = TARGET_DBFS):
        self._target = 10 ** (target_dbfs / 20)
        self._sum_squares = 0.0
        self._count = 0
        self._gain: float | None = None
        self._dc_state = None
        self._dc_previous = None

    def _block_dc(self, chunk: np.ndarray) -> np.ndarray:
        from scipy.signal import lfilter

        x = chunk.astype(np.float64).reshape(chunk.shape[0], -1)
        if self._dc_state is None:
            # the first sample is the reference, so a constant offset never produces a step at time zero
            self._dc_state = np.zeros((1, x.shape[1]))
            self._dc_previous = x[0].copy()
        diff = np.diff(np.vstack([self._dc_previous[None, :], x]), axis=0)  # x[n] - x[n-1], across chunks
        y, self._dc_state = lfilter([1.0], [1.0, -DC_POLE], diff, axis=0, zi=self._dc_state)
        self._dc_previous = x[-1].copy()
        return y.reshape(chunk.shape).astype(np.float32)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """chunk: (samples,) or (samples, channels) float32 in [-1, 1] → normalised copy."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.shape[0] == 0:
            return chunk.copy()
        chunk = self._block_dc(chunk)
        self._sum_squares += float(np.sum(chunk.astype(np.float64) ** 2))
        self._count += chunk.size
        rms = (self._sum_squares / max(self._count, 1)) ** 0.5
        gain = self._target / rms if rms > 1e-6 else 1.0
        gain = float(np.clip(gain, 10 ** (MIN_GAIN_DB / 20), 10 ** (MAX_GAIN_DB / 20)))
        start = self._gain if self._gain is not None else gain
        ramp = np.linspace(start, gain, chunk.shape[0], dtype=np.float32)
        if chunk.ndim == 2:
            ramp = ramp[:, None]
        self._gain = gain
        return soft_limit(chunk * ramp)


def soft_limit(x: np.ndarray) -> np.ndarray:
    """Identity below -1 dBFS; above it, a tanh knee that never reaches full scale."""
    y = x.astype(np.float32, copy=True)
    over = np.abs(y) > LIMIT
    if np.any(over):
        headroom = 1.0 - LIMIT
        y[over] = np.sign(y[over]) * (LIMIT + headroom * np.tanh((np.abs(y[over]) - LIMIT) / headroom))
    return y


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes: what a streamed chunk is sent as (Gradio passes bytes through untouched, so loudness
    stays ours) and what a WAV file holds."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return buffer.getvalue()


def joined_wav_bytes(chunks: Sequence[np.ndarray], sample_rate: int) -> bytes:
    """Consecutive chunks as one WAV: what a player is sent when it fell a few chunks behind the music."""
    return wav_bytes(np.concatenate(list(chunks)), sample_rate)


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """A WAV this app wrote, back as float32 samples ((n,) or (n, channels)) at the rate it expects."""
    with wave.open(str(path), "rb") as handle:
        if handle.getframerate() != sample_rate or handle.getsampwidth() != 2:
            raise ValueError(f"{path.name} is not a 16-bit {sample_rate} Hz WAV of this app")
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
        channels = handle.getnchannels()
    samples = pcm.astype(np.float32) / 32767.0
    return samples if channels == 1 else samples.reshape(-1, channels)


def write_wav(samples: np.ndarray, sample_rate: int, folder: Path, clip_id: str | None = None) -> Path:
    """Each request gets its own file (never a shared path), 16-bit PCM. A whole clip's file carries its clip id
    in its name, so that the WAV an API caller got back is enough to continue the clip (`clip_id_in`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{clip_id}-{uuid.uuid4().hex[:6]}" if clip_id and _CLIP_ID.fullmatch(clip_id) else uuid.uuid4().hex[:10]
    path = folder / f"music-{time.strftime('%Y%m%d-%H%M%S')}-{tag}.wav"
    path.write_bytes(wav_bytes(samples, sample_rate))
    return path


_CLIP_ID = re.compile(r"[0-9a-f]{16}")
_CLIP_FILE = re.compile(r"music-\d{8}-\d{6}-([0-9a-f]{16})-[0-9a-f]{6}\.wav")


def clip_id_in(text: str) -> str:
    """The clip id in a clip id, or in the path, URL or name of a whole clip's WAV (`write_wav`); else `text`."""
    text = str(text).strip()
    found = _CLIP_FILE.fullmatch(re.split(r"[/\\]", re.split(r"[?#]", text)[0])[-1])
    return found.group(1) if found else text
