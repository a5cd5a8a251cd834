"""Filters on the song lists, checked in one place for the UI, the API and the catalog.

    Filters.from_json({"genre": "jazz", "years": [1980, 1989], "popularity": [0, 40]})

`genre` is a family (`pipeline/genre_families.json`) or a fine genre; `years` and `popularity` (Spotify's 0-100)
are inclusive ranges. Any subset may be given; a song whose year or popularity is unknown does not pass a filter on
it. Whether a genre exists is the catalog's to say (a rebuilt catalog may hold genres the vocabulary does not), so
`Catalog.passing` checks that; everything else is checked here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from .errors import InputError
from .genres import fine_genre
from .validate import Range

YEARS = Range(1900, 2100, integer=True)
POPULARITY = Range(0, 100)
EXAMPLE = '{"genre": "jazz", "years": [1980, 1989], "popularity": [0, 40]}'


@dataclass(frozen=True)
class Filters:
    genre: str | None = None
    years: tuple[int, int] | None = None
    popularity: tuple[float, float] | None = None

    KEYS = ("genre", "years", "popularity")

    @classmethod
    def from_json(cls, value) -> "Filters":
        """Filters from an API or UI value: None or "" (no filter), a JSON object, or its text."""
        if isinstance(value, Filters):
            return value
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InputError(f"filters must be a JSON object such as {EXAMPLE}.") from None
        if not isinstance(value, Mapping):
            raise InputError(f"filters must be a JSON object such as {EXAMPLE}, got {value!r}.")
        unknown = [str(key) for key in value if key not in cls.KEYS]
        if unknown:
            raise InputError(f"Unknown filter {', '.join(map(repr, unknown))}: the filters are "
                             f"{', '.join(cls.KEYS)} (any subset), e.g. {EXAMPLE}.")
        genre = value.get("genre")
        if genre is not None and not isinstance(genre, str):
            raise InputError(f"filters.genre must be a genre name such as \"jazz\", got {genre!r}.")
        return cls(genre=fine_genre(genre), years=_span("years", value.get("years"), YEARS),
                   popularity=_span("popularity", value.get("popularity"), POPULARITY))

    @property
    def active(self) -> bool:
        return any(getattr(self, key) is not None for key in self.KEYS)

    def to_dict(self) -> dict:
        return {key: (list(v) if isinstance(v, tuple) else v) for key in self.KEYS
                if (v := getattr(self, key)) is not None}

    def describe(self) -> str:
        """'genre jazz, years 1980–1989, popularity 0–40' (for notes)."""
        parts = [f"genre {self.genre}"] if self.genre else []
        if self.years:
            parts.append(f"years {self.years[0]}–{self.years[1]}")
        if self.popularity:
            parts.append(f"popularity {self.popularity[0]:g}–{self.popularity[1]:g}")
        return ", ".join(parts)


def _span(name: str, value, allowed: Range):
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != 2:
        raise InputError(f"filters.{name} must be a range [from, to], e.g. {EXAMPLE}; got {value!r}.")
    low, high = (allowed.check(f"filters.{name}", v) for v in value)
    if low > high:
        raise InputError(f"filters.{name} runs backwards: [{low:g}, {high:g}]; give [from, to] with from ≤ to.")
    return low, high
