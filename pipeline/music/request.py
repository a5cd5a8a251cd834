"""What a caller asks the music engine for: the sampling settings and the request that carries them.

`Sampling` is the one place where the sampling defaults, their allowed ranges and their validation live: the
decode loop, the facade, the UI's sliders and the API's parameter defaults all read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import InputError
from ..validate import Range, finite_number

SEED_LIMIT = 2 ** 63  # torch.Generator takes a signed 64-bit seed


@dataclass(frozen=True)
class Sampling:
    """How a code is drawn for each codebook at each step. Defaults are the official MusicGen demo's."""

    temperature: float = 1.0  # divides the logits: < 1 sharpens (safer, more repetitive), > 1 flattens
    top_k: int = 250  # draw among the k most likely codes; 0 = off
    top_p: float = 0.0  # nucleus: the smallest set of codes whose mass reaches p; 0 = off
    guidance_scale: float = 3.0  # classifier-free guidance: how hard the text steers; 1 = off (and half the work)

    RANGES: ClassVar[dict[str, Range]] = {
        "temperature": Range(0.05, 5.0, step=0.05),
        "top_k": Range(0, 2048, step=1, integer=True, off=0),
        "top_p": Range(0.0, 1.0, step=0.01, off=0.0),
        "guidance_scale": Range(1.0, 15.0, step=0.1, off=1.0),
    }

    @classmethod
    def checked(cls, **values) -> "Sampling":
        """A Sampling from untrusted values (None = the default); each is range-checked with a clear message."""
        unknown = set(values) - set(cls.RANGES)
        if unknown:
            raise InputError(f"Unknown sampling settings: {', '.join(sorted(unknown))}.")
        return cls(**{name: cls.RANGES[name].check(name, value) for name, value in values.items()
                      if value is not None})

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class DurationLimits:
    """The clip lengths this app serves (settings I2M_MIN_DURATION / I2M_MAX_DURATION)."""

    low: float
    high: float

    def check(self, value) -> float:
        duration = finite_number("duration_s", value)
        if not self.low <= duration <= self.high:
            raise InputError(f"duration_s must be between {self.low:g} and {self.high:g} seconds, got {duration:g}.")
        return duration


@dataclass(frozen=True)
class MusicRequest:
    prompt: str
    duration_s: float
    seed: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    # a `generator.Continuation`: the clip this one continues (its last codes, codec and loudness states)
    continue_from: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def checked(cls, prompt: str, duration_s, seed, sampling: Sampling, limits: DurationLimits) -> "MusicRequest":
        """`prompt` already cleaned (see `pipeline.prompt.clean_user_prompt`); the numbers are checked here."""
        if not prompt:
            raise InputError("The music prompt is empty. Analyze a photo or type a description.")
        return cls(prompt=prompt, duration_s=limits.check(duration_s), seed=check_seed(seed), sampling=sampling)

    def replace(self, **changes) -> "MusicRequest":
        return dataclasses.replace(self, **changes)


def check_seed(seed) -> int:
    value = finite_number("seed", seed)
    if value != int(value) or not 0 <= value < SEED_LIMIT:
        raise InputError(f"seed must be a whole number from 0 to 2^63-1, got {seed!r}.")
    return int(value)
