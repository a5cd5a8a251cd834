"""The 13 Spotify audio features and the space in which songs are compared.

Raw features live in different units (tempo in BPM, loudness in dB, duration in ms, key as a pitch class), so a
plain Euclidean distance would be dominated by tempo and duration. `FeatureSpace` maps them to a comparable space:

1. bound every feature to `BOUNDS` (tempo [50, 200] BPM, loudness [-30, 0] dB, duration [1, 10] min, the 0–1
   features [0, 1]); duration is then log-scaled;
2. key is placed on the circle of fifths as (cos, sin), so C is next to G and F, not to C#;
3. standardise every column with the catalog's mean and standard deviation (stored in the index manifest);
4. multiply by per-feature weights (`WEIGHTS`): mood-bearing features (valence, energy, acousticness) count most,
   descriptive ones (key, duration, time signature, liveness) least.

The search distance is the L2 distance in that space, and a similarity in [0, 1] is `exp(-d² / tau)`, where tau is
chosen at build time so that a random pair of catalog songs scores 0.25 (`tau = median_pair_d² / ln 4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

FEATURES: tuple[str, ...] = (
    "danceability", "energy", "key", "loudness", "mode", "speechiness", "acousticness",
    "instrumentalness", "liveness", "valence", "tempo", "duration_ms", "time_signature",
)

# Where each feature may lie in Spotify units: inputs outside are refused, predictions are clipped to it.
RANGES: dict[str, tuple[float, float]] = {
    "danceability": (0.0, 1.0), "energy": (0.0, 1.0), "key": (0.0, 11.0), "loudness": (-60.0, 5.0),
    "mode": (0.0, 1.0), "speechiness": (0.0, 1.0), "acousticness": (0.0, 1.0), "instrumentalness": (0.0, 1.0),
    "liveness": (0.0, 1.0), "valence": (0.0, 1.0), "tempo": (0.0, 250.0), "duration_ms": (1_000.0, 3_600_000.0),
    "time_signature": (1.0, 7.0),
}

# The range in which songs are compared (and drawn): values beyond it are clipped, so a 230 BPM track is not
# further from the rest than a 200 BPM one. Key is placed on the circle of fifths instead (see `_bounded`).
BOUNDS: dict[str, tuple[float, float]] = {
    "danceability": (0.0, 1.0), "energy": (0.0, 1.0), "key": (0.0, 11.0), "loudness": (-30.0, 0.0),
    "mode": (0.0, 1.0), "speechiness": (0.0, 1.0), "acousticness": (0.0, 1.0), "instrumentalness": (0.0, 1.0),
    "liveness": (0.0, 1.0), "valence": (0.0, 1.0), "tempo": (50.0, 200.0), "duration_ms": (60_000.0, 600_000.0),
    "time_signature": (1.0, 7.0),
}
LOG_SCALED = ("duration_ms",)

UNITS = {"loudness": "dB", "tempo": "BPM", "duration_ms": "ms"}

# Chosen by measurement (`scripts/eval_recs.py`, mood consistency; a grid over the four mood-bearing weights scored
# on random halves of the development mood table): valence, energy and acousticness separate moods most.
WEIGHTS: dict[str, float] = {
    "valence": 4.5, "energy": 4.5, "danceability": 1.2, "acousticness": 3.0, "tempo": 1.0,
    "instrumentalness": 0.8, "loudness": 0.7, "mode": 0.6, "speechiness": 0.6, "liveness": 0.3,
    "key": 0.3, "duration_ms": 0.2, "time_signature": 0.2,
}

# Columns of the transformed space: key takes two (cos, sin on the circle of fifths).
SPACE_COLUMNS: tuple[str, ...] = tuple(c for f in FEATURES for c in ((f"{f}_cos", f"{f}_sin") if f == "key" else (f,)))
SPACE_SOURCE: tuple[str, ...] = tuple("key" if c.startswith("key_") else c for c in SPACE_COLUMNS)


def _bounded(features: np.ndarray) -> np.ndarray:
    """Step 1 and 2: (n, 13) Spotify units → (n, 14) bounded columns, NaN kept where a value is missing."""
    x = np.asarray(features, dtype=np.float64)
    v = np.clip(x, _LOW, _HIGH)  # one call for every column: the why column transforms a row per song shown
    v[:, _LOGGED] = np.log(v[:, _LOGGED])
    out = np.empty((x.shape[0], len(SPACE_COLUMNS)), dtype=np.float64)
    out[:, _PLAIN_COLUMNS] = v[:, _PLAIN_SOURCES]
    angle = (np.mod(x[:, _KEY], 12) * 7 % 12) * (2 * math.pi / 12)  # semitones → position on the circle of fifths
    out[:, _KEY_COLUMN], out[:, _KEY_COLUMN + 1] = np.cos(angle), np.sin(angle)
    return out


_LOW = np.array([BOUNDS[f][0] for f in FEATURES])
_HIGH = np.array([BOUNDS[f][1] for f in FEATURES])
_LOGGED = [FEATURES.index(f) for f in LOG_SCALED]
_KEY = FEATURES.index("key")
_KEY_COLUMN = SPACE_COLUMNS.index("key_cos")
_PLAIN_COLUMNS = [i for i, c in enumerate(SPACE_COLUMNS) if not c.startswith("key_")]
_PLAIN_SOURCES = [FEATURES.index(c) for c in SPACE_COLUMNS if not c.startswith("key_")]


def as_matrix(features: Mapping[str, float] | Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A mapping (missing names allowed) or a 13-vector → a (1, 13) array and a (13,) mask of present values."""
    if isinstance(features, Mapping):
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:
            raise ValueError(f"Unknown audio feature(s): {', '.join(unknown)}. Known: {', '.join(FEATURES)}.")
        row = np.array([_finite_or_nan(features.get(name), name) for name in FEATURES], dtype=np.float64)
    else:
        row = np.asarray(features, dtype=np.float64).reshape(-1)
        if row.shape[0] != len(FEATURES):
            raise ValueError(f"Expected {len(FEATURES)} audio features, got {row.shape[0]}.")
        row = np.where(np.isfinite(row), row, np.nan)
    present = ~np.isnan(row)
    if not present.any():
        raise ValueError("At least one audio feature is needed.")
    for i, name in enumerate(FEATURES):
        lo, hi = RANGES[name]
        if present[i] and not lo - 1e-9 <= row[i] <= hi + 1e-9:
            raise ValueError(f"{name}={row[i]:g} is outside its range [{lo:g}, {hi:g}].")
    return row[None, :], present


def _finite_or_nan(value, name: str) -> float:
    if value is None:
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    return number if math.isfinite(number) else math.nan


@dataclass(frozen=True)
class FeatureSpace:
    """The fitted transform: per-column mean and std of the bounded catalog, the weights and tau."""

    mean: np.ndarray
    std: np.ndarray
    tau: float

    @property
    def weights(self) -> np.ndarray:
        return np.array([WEIGHTS[s] for s in SPACE_SOURCE], dtype=np.float64)

    @classmethod
    def fit(cls, features: np.ndarray, rng_seed: int = 0) -> "FeatureSpace":
        bounded = _bounded(features)
        mean = np.nanmean(bounded, axis=0)
        std = np.nanstd(bounded, axis=0)
        std = np.where(std < 1e-6, 1.0, std)
        space = cls(mean=mean, std=std, tau=1.0)
        vectors = space.transform(features)
        rng = np.random.default_rng(rng_seed)
        n = vectors.shape[0]
        a, b = rng.integers(0, n, size=(2, min(200_000, 4 * n)))
        d2 = np.sum((vectors[a] - vectors[b]) ** 2, axis=1)
        median = float(np.median(d2[a != b])) if np.any(a != b) else 1.0
        return cls(mean=mean, std=std, tau=max(median, 1e-6) / math.log(4.0))

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(n, 13) Spotify units → (n, 14) float32 search vectors; missing values land on the catalog mean."""
        z = (_bounded(features) - self.mean) / self.std
        z = np.where(np.isnan(z), 0.0, z)
        return (z * self.weights).astype(np.float32)

    def column_mask(self, present: np.ndarray) -> np.ndarray:
        """(13,) presence mask → (14,) mask over the search columns."""
        return np.array([present[FEATURES.index(s)] for s in SPACE_SOURCE], dtype=bool)

    def similarity(self, squared_distance: np.ndarray, present_fraction: float = 1.0) -> np.ndarray:
        # A partial query compares fewer columns, so its distances shrink; scale tau by the weight share compared.
        tau = self.tau * max(present_fraction, 1e-6)
        return np.exp(-np.asarray(squared_distance, dtype=np.float64) / tau)

    def weight_share(self, present: np.ndarray) -> float:
        w2 = self.weights ** 2
        return float(w2[self.column_mask(present)].sum() / w2.sum())

    def to_json(self) -> dict:
        return {"columns": list(SPACE_COLUMNS), "mean": [round(float(v), 10) for v in self.mean],
                "std": [round(float(v), 10) for v in self.std], "weights": {k: WEIGHTS[k] for k in FEATURES},
                "tau": round(self.tau, 10),
                "bounds": {name: list(BOUNDS[name]) for name in FEATURES if name != "key"},
                "log_scaled": list(LOG_SCALED)}

    @classmethod
    def from_json(cls, data: dict) -> "FeatureSpace":
        if list(data["columns"]) != list(SPACE_COLUMNS):
            raise ValueError("The index was built with a different feature layout.")
        return cls(mean=np.array(data["mean"], dtype=np.float64), std=np.array(data["std"], dtype=np.float64),
                   tau=float(data["tau"]))


def closest_features(query: np.ndarray, songs: np.ndarray, present: np.ndarray, space: FeatureSpace,
                     limit: int = 3) -> list[list[str]]:
    """For each song (a row of `songs`, Spotify units), the names of the weighty features on which it is closest
    to the query, for the 'why' column. All rows are transformed in one call: a list of songs costs one pass."""
    songs = np.atleast_2d(np.asarray(songs, dtype=np.float64))
    q = space.transform(np.asarray(query, dtype=np.float64).reshape(1, -1))[0]
    squared = (space.transform(songs) - q) ** 2
    gaps = np.zeros((len(songs), len(FEATURES)))
    np.add.at(gaps.T, _SOURCE_INDEX, squared.T)  # key's two columns add up to one feature
    gaps /= _WEIGHT_VALUES ** 2
    # only the mood-bearing features: agreeing on mode or near-zero instrumentalness explains little
    eligible = np.asarray(present, dtype=bool) & (_WEIGHT_VALUES >= 1.0)
    gaps = np.where(eligible & ~np.isnan(songs), gaps, np.inf)
    out = []
    for row in gaps:
        names = [FEATURES[i] for i in np.flatnonzero(np.isfinite(row))]
        out.append(sorted(names, key=lambda name: (row[FEATURES.index(name)], -WEIGHTS[name]))[:limit])
    return out


_SOURCE_INDEX = np.array([FEATURES.index(source) for source in SPACE_SOURCE])
_WEIGHT_VALUES = np.array([WEIGHTS[f] for f in FEATURES])


def describe_pair(name: str, wanted: float, found: float) -> str:
    """'energy 0.82 ↔ 0.80': the value asked for (the photo's) beside the song's, in the feature's units."""
    def value(v: float) -> str:
        if name == "tempo":
            return f"{v:.0f}"
        if name == "loudness":
            return f"{v:.1f}"
        if name == "duration_ms":
            return f"{v / 60000:.1f}"
        return f"{v:.2f}"

    unit = {"tempo": " BPM", "loudness": " dB", "duration_ms": " min"}.get(name, "")
    label = "length" if name == "duration_ms" else name
    return f"{label} {value(wanted)} ↔ {value(found)}{unit}"


KEY_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
