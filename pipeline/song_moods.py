"""Which of four moods (calm, energetic, happy, sad) a song or a feature query carries.

A nearest-centroid model over the mood-bearing audio features (valence, energy, danceability, acousticness),
standardised with the labelled table's statistics: `p(mood | x) ∝ exp(-½·‖z(x) − centroid_mood‖²)`, every
mood with the same prior and the same spread. It is data, `song_moods.json`, fitted by
`scripts/fit_song_moods.py` on a table of tracks labelled by people (the development mood table of
`../shared/eval`); the file records which table.

Why the feature search needs it: a query's nearest songs need not share its mood. The mean features of the
development table's *happy* tracks sit among energetic ones, so the plain nearest songs are energetic. The search
therefore scores a song by its sound similarity times `mood_fit`, the probability that song and query share a mood
(`Σ p_query(m)·p_song(m)`), divided by the query's largest mood probability so a song of the query's likeliest mood,
surely, fits 1. A centroid model, not a nearest-neighbour vote, because the query is often a mood's mean: a vote
reads the mean of a wide mood as its busier neighbour, a centroid reads it as itself.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import FEATURES

MODEL_FILE = Path(__file__).with_name("song_moods.json")


@dataclass(frozen=True)
class SongMoods:
    moods: tuple[str, ...]  # in the order of the probability columns
    features: tuple[str, ...]  # the mood-bearing features, in the order of `mean`, `std` and the centroids
    mean: np.ndarray  # the labelled table's mean and spread: the space in which the centroids live
    std: np.ndarray
    centroids: np.ndarray  # (moods, features)

    @classmethod
    def from_json(cls, data: dict) -> "SongMoods":
        features = tuple(data["features"])
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"{MODEL_FILE.name} names unknown features {unknown}.")
        moods = tuple(data["centroids"])
        return cls(moods=moods, features=features, mean=np.array(data["mean"], dtype=np.float64),
                   std=np.array(data["std"], dtype=np.float64),
                   centroids=np.array([data["centroids"][m] for m in moods], dtype=np.float64))

    def to_json(self, source: dict) -> dict:
        return {"source": source, "features": list(self.features),
                "mean": [round(float(v), 8) for v in self.mean], "std": [round(float(v), 8) for v in self.std],
                "centroids": {m: [round(float(v), 8) for v in c] for m, c in zip(self.moods, self.centroids)}}

    @classmethod
    def fit(cls, values: np.ndarray, labels, features: tuple[str, ...]) -> "SongMoods":
        """From (n, len(features)) values in Spotify units and each row's mood."""
        values = np.asarray(values, dtype=np.float64)
        labels = np.asarray(labels)
        mean, std = values.mean(axis=0), values.std(axis=0)
        z = (values - mean) / std
        moods = tuple(sorted(set(labels.tolist())))
        return cls(moods=moods, features=tuple(features), mean=mean, std=std,
                   centroids=np.stack([z[labels == m].mean(axis=0) for m in moods]))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, 13) features in Spotify units → (n, moods); a row missing a mood-bearing feature carries every mood
        equally (it neither helps nor hurts a song's place)."""
        columns = np.asarray(features, dtype=np.float64)[:, [FEATURES.index(f) for f in self.features]]
        z = (columns - self.mean) / self.std
        logits = -0.5 * ((z[:, None, :] - self.centroids[None, :, :]) ** 2).sum(axis=-1)
        logits = np.where(np.isnan(logits), 0.0, logits)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def fit_to(self, query: np.ndarray, songs: np.ndarray) -> np.ndarray:
        """How well songs (their mood probabilities, (n, moods)) fit a query's (moods,) probabilities, in [0, 1]:
        the probability that both carry one mood, over its largest possible value."""
        return songs @ query / float(query.max())

    def describe(self, query: np.ndarray, song: np.ndarray) -> str:
        """'happy mood 0.60 ↔ 0.93': the query's likeliest mood, its probability for the query and for the song."""
        best = int(np.argmax(query))
        return f"{self.moods[best]} mood {query[best]:.2f} ↔ {song[best]:.2f}"


@functools.lru_cache(maxsize=1)
def load() -> SongMoods:
    return SongMoods.from_json(json.loads(MODEL_FILE.read_text()))
