"""Scoring rules of the lyric recommender and of the fused list.

Lyrics. A query is embedded (all-MiniLM-L6-v2, cosine similarity) and compared with every stanza-sized passage.
For each song with retrieved passages, sorted by similarity s1 ≥ s2 ≥ s3:

    relevance = 0.7 * s1 + 0.3 * mean(s1, s2, s3)

(over the 4,096 passages nearest the query; passages outside that set count as its floor). The best passage carries the match; the others
add support when a theme runs through the song, instead of the seed's mean over a hundred lines, which drowned one
strong stanza in filler. Relevance is calibrated against chance, measured at build time as the cosine between
passages of different songs (mean m, standard deviation sd):

    score = sigmoid((relevance - (m + 3 sd)) / sd)

so a match three standard deviations above chance scores 0.5, chance-level matches score ≈ 0.05, and strong
matches approach 1: relevant lyrics are rewarded and weak ones penalised, in [0, 1].

Fusion. Reciprocal-rank fusion over the feature and lyric rankings (k0 = 60, as in Cormack et al. 2009):
`rrf = Σ 1 / (k0 + rank)`, divided by its maximum `2 / (k0 + 1)` so the fused score is in [0, 1].
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np

BEST_WEIGHT = 0.7
RRF_K0 = 60


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def calibrated_song_score(sims_desc: Sequence[float] | np.ndarray, floor: float | None,
                          calibration: Mapping[str, float]) -> float:
    """Score one song from its passage similarities, sorted in descending order."""
    top = list(sims_desc[:3])
    if not top:
        return 0.0
    pad = floor if floor is not None else top[-1]
    while len(top) < 3:
        top.append(min(pad, top[-1]))
    relevance = BEST_WEIGHT * top[0] + (1 - BEST_WEIGHT) * (sum(top) / 3.0)
    width = max(float(calibration["width"]), 1e-6)
    return _sigmoid((relevance - float(calibration["center"])) / width)


def aggregate_passages(passage_songs: np.ndarray, sims: np.ndarray,
                       calibration: Mapping[str, float]) -> list[tuple[int, float]]:
    """(song of each retrieved passage, similarity) → songs with calibrated scores, best first."""
    if len(sims) == 0:
        return []
    songs = np.asarray(passage_songs, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float64)
    floor = float(sims.min())
    order = np.lexsort((-sims, songs))  # by song, best passage first
    songs, sims = songs[order], sims[order]
    unique, first, counts = np.unique(songs, return_index=True, return_counts=True)
    top = np.full((len(unique), 3), np.nan)
    for rank in range(3):
        has = counts > rank
        top[has, rank] = sims[first[has] + rank]
    # missing 2nd/3rd passages take min(floor, the passage above): the retrieval floor bounds unseen ones
    top[:, 1] = np.where(np.isnan(top[:, 1]), np.minimum(floor, top[:, 0]), top[:, 1])
    top[:, 2] = np.where(np.isnan(top[:, 2]), np.minimum(floor, top[:, 1]), top[:, 2])
    relevance = BEST_WEIGHT * top[:, 0] + (1 - BEST_WEIGHT) * top.mean(axis=1)
    width = max(float(calibration["width"]), 1e-6)
    scores = 1.0 / (1.0 + np.exp(-(relevance - float(calibration["center"])) / width))
    ranked = sorted(zip(unique.tolist(), scores.tolist()), key=lambda item: (-item[1], item[0]))
    return ranked


def fuse(rankings: Mapping[str, Mapping[int, float]]) -> list[tuple[int, float, dict[str, int]]]:
    """Reciprocal-rank fusion: each ranking is {song: score}; returns (song, fused score, ranks) best first."""
    ranks: dict[int, dict[str, int]] = {}
    for name, scores in rankings.items():
        ordered = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        for position, (song, _) in enumerate(ordered, start=1):
            ranks.setdefault(song, {})[name] = position
    best = len(rankings) / (RRF_K0 + 1)
    fused = [(song, sum(1.0 / (RRF_K0 + r) for r in rs.values()) / best, rs) for song, rs in ranks.items()]
    fused.sort(key=lambda item: (-item[1], item[0]))
    return fused


def top_themes(query: np.ndarray, theme_vectors: np.ndarray, names: Sequence[str], limit: int = 4) -> list[str]:
    if len(names) == 0:
        return []
    scores = theme_vectors @ query
    return [names[i] for i in np.argsort(-scores, kind="stable")[:limit]]


_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return [w.strip("'") for w in _WORD.findall(text.lower()) if len(w.strip("'")) >= 3]


def lyric_reason(song_themes: str, song_keywords: str, query_themes: Sequence[str], query_words: set[str]) -> str:
    """A short 'why' for a lyric match: shared themes, and the song's keywords that the query uses."""
    themes = [t for t in (song_themes or "").split(", ") if t]
    keywords = [w for w in (song_keywords or "").split(", ") if w]
    shared = [t for t in themes if t in query_themes] or themes[:1]
    said = [w for w in keywords if w in query_words or w.rstrip("s") in query_words]
    parts = []
    if shared:
        parts.append("themes: " + ", ".join(shared))
    parts.append("keywords: " + ", ".join((said or keywords)[:3]) if keywords else "")
    return " · ".join(p for p in parts if p)
