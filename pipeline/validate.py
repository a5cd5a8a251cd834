"""Checking numbers that arrive from the UI or the API, with messages written for the person who sent them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Range:
    """An allowed interval for one request parameter; the UI's sliders and the API's checks both read it."""

    low: float
    high: float
    step: float = 1.0
    integer: bool = False
    off: float | None = None  # a value inside the range that switches the feature off (shown as "0 = off")

    def check(self, name: str, value) -> float | int:
        number = finite_number(name, value)
        whole = number == int(number)
        if self.integer and not whole or not self.low <= number <= self.high:
            kind = "a whole number" if self.integer else "a number"
            off = f" ({self.off:g} = off)" if self.off is not None else ""
            span = f"from {self.low:g}{off} to {self.high:g}" if math.isfinite(self.high) else f"of at least {self.low:g}"
            raise InputError(f"{name} must be {kind} {span}, got {value!r}.")
        return int(number) if self.integer else number


def finite_number(name: str, value) -> float:
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    return number


def check_k(k, max_k: float = math.inf) -> int:
    """How many songs one list may hold: 1..max_k (the facade passes the I2M_MAX_K setting; the catalog on its own
    takes any positive k and returns at most every song it has)."""
    return Range(1, max_k, integer=True).check("k", k)
