"""The catalog's genre vocabulary: fine genres (as the source tables name them) and the families they belong to.

The mapping is data, `genre_families.json`, edited without touching code; the build stores each song's fine genres
and families with it, and filters name either. A fine genre the file does not list (a table added with
`--table`) keeps itself as its only label and no family.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

VOCABULARY_FILE = Path(__file__).with_name("genre_families.json")
SEPARATOR = ", "  # how a song's genres and families are joined in songs.parquet (no genre name holds a comma)


def fine_genre(value) -> str | None:
    """A source table's genre label in the vocabulary's spelling (lower case, single spaces), or None if empty."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.lower().split()).replace(",", " ")
    return text or None


@functools.lru_cache(maxsize=1)
def families() -> dict[str, tuple[str, ...]]:
    """Family → its fine genres, in the file's order."""
    data = json.loads(VOCABULARY_FILE.read_text())
    return {family: tuple(fine_genre(g) for g in genres) for family, genres in data["families"].items()}


@functools.lru_cache(maxsize=1)
def _family_of() -> dict[str, str]:
    return {genre: family for family, genres in families().items() for genre in genres}


def family_of(genre: str) -> str | None:
    return _family_of().get(fine_genre(genre) or "")


def families_for(genres: Iterable[str]) -> list[str]:
    """The families of some fine genres, each once, in the vocabulary's family order."""
    found = {family_of(g) for g in genres} - {None}
    return [f for f in families() if f in found]


def join(labels: Iterable[str]) -> str:
    return SEPARATOR.join(labels)


def split(text: str | None) -> list[str]:
    return [part for part in (text or "").split(SEPARATOR) if part]
