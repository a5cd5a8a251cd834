"""The shipped song catalog (`index/`) and the three recommenders over it.

    catalog = Catalog.load()                       # verified against index/manifest.json
    catalog.search_features({"valence": 0.8, "energy": 0.7}, k=10)
    catalog.search_lyrics("driving at night with the windows down", k=10)
    catalog.search_fused(features, text, k=10)

How scores are computed is documented in `pipeline.features` (audio features) and `pipeline.recommend`
(lyrics calibration, fusion); this module loads and verifies the files and turns rows into `SongMatch`es.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import recommend, vector_index
from .artifacts import file_sha256
from .errors import IndexIntegrityError, InputError
from .features import FEATURES, FeatureSpace, as_matrix, closest_features, describe_feature

SCHEMA_VERSION = 1
LYRIC_CANDIDATES = 4096  # passages nearest the query that lyric search aggregates per song
REQUIRED_FILES = ("songs.parquet", "feature_song_ids.npy", "features.faiss", "passage_song_ids.npy",
                  "lyrics.faiss", "themes.npy")


@dataclass(frozen=True)
class SongMatch:
    song_id: int
    title: str
    artist: str
    year: int | None
    genre: str
    spotify_id: str
    spotify_url: str
    score: float  # in [0, 1]
    features: dict[str, float | None] = field(default_factory=dict)  # the song's 13 features, Spotify units
    why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def spotify_url(spotify_id: str) -> str:
    return f"https://open.spotify.com/track/{spotify_id}" if spotify_id else ""


class Catalog:
    """Songs, their feature and lyric indexes, and the searches. Thread-safe for concurrent searches."""

    def __init__(self, path: Path, manifest: dict, songs, feature_index, feature_song_ids: np.ndarray,
                 lyric_index, passage_song_ids: np.ndarray, theme_vectors: np.ndarray,
                 embedder_factory: Callable[[], object] | None = None):
        self.path = path
        self.manifest = manifest
        self.space = FeatureSpace.from_json(manifest["feature_space"])
        self._feature_index = feature_index
        self._feature_song_ids = feature_song_ids
        self._lyric_index = lyric_index
        self._passage_song_ids = passage_song_ids
        self._theme_vectors = theme_vectors
        self._theme_names: list[str] = list(manifest["themes"])
        self._calibration = manifest["lyrics"].get("calibration") or {"center": 0.5, "width": 0.1}
        self._embedder_factory = embedder_factory
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self._feature_vectors: np.ndarray | None = None

        self._titles = songs["title"].tolist()
        self._artists = songs["artist"].tolist()
        self._years = [None if y is None or (isinstance(y, float) and math.isnan(y)) else int(y)
                       for y in songs["year"].tolist()]
        self._genres = songs["genre"].tolist()
        self._spotify = songs["spotify_id"].tolist()
        self._features = songs[list(FEATURES)].to_numpy(dtype=np.float64)
        self._keywords = songs["keywords"].tolist()
        self._themes = songs["themes"].tolist()
        self._has_features = songs["has_features"].to_numpy(dtype=bool)
        self._has_lyrics = songs["has_lyrics"].to_numpy(dtype=bool)
        self._feature_row = np.full(len(self._titles), -1, dtype=np.int64)
        self._feature_row[feature_song_ids] = np.arange(len(feature_song_ids))
        # passages are stored grouped by song: [start, end) of each song's passages
        order_ok = np.all(np.diff(passage_song_ids) >= 0) if len(passage_song_ids) else True
        if not order_ok:
            raise IndexIntegrityError("passage_song_ids.npy is not grouped by song; rebuild the index.")
        songs_range = np.arange(len(self._titles) + 1)
        self._passage_bounds = np.searchsorted(passage_song_ids, songs_range, side="left")

    # -- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, *, embedder_factory: Callable[[], object] | None = None,
             verify: bool = True) -> "Catalog":
        """Open a catalog folder (default: the `I2M_INDEX_DIR` setting), checking every file's sha256."""
        if path is None:
            from .settings import Settings

            path = Settings.from_env().index_dir
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise IndexIntegrityError(f"No catalog at {path}: manifest.json is missing. "
                                      "Build one with `python scripts/build_index.py`.")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise IndexIntegrityError(f"{manifest_path} is not valid JSON ({exc}).") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise IndexIntegrityError(f"{path} has schema version {manifest.get('schema_version')}, this app reads "
                                      f"version {SCHEMA_VERSION}; rebuild it with scripts/build_index.py.")
        files = manifest.get("files", {})
        for name in REQUIRED_FILES:
            if name not in files:
                raise IndexIntegrityError(f"The manifest of {path} does not list {name}.")
            file_path = path / name
            if not file_path.is_file():
                raise IndexIntegrityError(f"Catalog file {name} is missing from {path}.")
            if verify:
                size = file_path.stat().st_size
                if size != files[name]["bytes"] or file_sha256(file_path) != files[name]["sha256"]:
                    raise IndexIntegrityError(
                        f"Catalog file {name} does not match its checksum in manifest.json (tampered, truncated "
                        f"or from another build); refusing to load it. Restore it or rebuild the index.")
        import pyarrow.parquet as pq

        songs = pq.read_table(path / "songs.parquet").to_pandas()
        feature_song_ids = np.load(path / "feature_song_ids.npy", allow_pickle=False)
        passage_song_ids = np.load(path / "passage_song_ids.npy", allow_pickle=False)
        theme_vectors = np.load(path / "themes.npy", allow_pickle=False)
        feature_index = vector_index.load(path / "features.faiss")
        lyric_index = vector_index.load(path / "lyrics.faiss")
        counts = manifest["counts"]
        if (len(songs) != counts["songs"] or feature_index.ntotal != counts["with_features"]
                or lyric_index.ntotal != counts["passages"] or len(passage_song_ids) != counts["passages"]
                or len(feature_song_ids) != counts["with_features"]):
            raise IndexIntegrityError(f"The files of {path} disagree with the counts in its manifest.")
        return cls(path, manifest, songs, feature_index, feature_song_ids, lyric_index, passage_song_ids,
                   theme_vectors, embedder_factory)

    @property
    def counts(self) -> dict[str, int]:
        c = self.manifest["counts"]
        return {k: int(c[k]) for k in ("songs", "with_features", "with_lyrics", "with_both")}

    def attach_embedder(self, embedder) -> None:
        """Use `embedder` for lyric queries after checking its fingerprint against the manifest."""
        from .embedder import fingerprint_matches

        ok, worst = fingerprint_matches(self.manifest["embedder"]["fingerprint"], embedder.fingerprint())
        if not ok:
            raise IndexIntegrityError(
                f"The sentence embedder does not match the one the catalog was built with "
                f"({self.manifest['embedder']['model_id']}; probe cosine {worst:.4f} < 0.999). Its vectors would "
                "silently mismatch the lyric index, so lyric search is refused. Use the same embedder or rebuild "
                "the index with scripts/build_index.py.")
        self._embedder = embedder

    def _get_embedder(self):
        if self._embedder is None:
            with self._embedder_lock:
                if self._embedder is None:
                    if self._embedder_factory is None:
                        raise InputError("Lyric search needs a sentence embedder; none is attached.")
                    self.attach_embedder(self._embedder_factory())
        return self._embedder

    # -- searches -------------------------------------------------------------------------------------------------
    def search_features(self, features: Mapping[str, float] | Sequence[float] | np.ndarray, k: int = 10,
                        exclude_ids: Sequence[int] = ()) -> list[SongMatch]:
        """Songs whose audio features are closest to `features` (Spotify units; missing names allowed)."""
        k = _check_k(k)
        query, present = _feature_query(features)
        ranked = self._feature_ranking(query, present, k, exclude_ids)
        return [self._feature_match(song, score, query, present) for song, score in ranked]

    def _feature_ranking(self, query: np.ndarray, present: np.ndarray, k: int,
                         exclude_ids: Sequence[int] = ()) -> list[tuple[int, float]]:
        exclude = {int(i) for i in exclude_ids}
        rows, d2 = self._nearest_by_features(query, present, k + len(exclude))
        scores = self.space.similarity(d2, self.space.weight_share(present))
        ranked = [(int(self._feature_song_ids[row]), float(score)) for row, score in zip(rows, scores)]
        return [(song, score) for song, score in ranked if song not in exclude][:k]

    def _feature_match(self, song: int, score: float, query: np.ndarray, present: np.ndarray) -> SongMatch:
        close = closest_features(query[0], self._features[song], present, self.space)
        why = "close on " + ", ".join(describe_feature(n, self._features[song][FEATURES.index(n)])
                                      for n in close) if close else ""
        return self._match(song, score, why)

    def _nearest_by_features(self, query: np.ndarray, present: np.ndarray, want: int):
        vector = self.space.transform(query)
        if present.all():
            d2, rows = vector_index.search(self._feature_index, vector, want)
            keep = rows[0] >= 0
            return rows[0][keep], d2[0][keep]
        # A partial query: compare only the columns it gives. Exact over the whole table when it is small,
        # else a re-ranking of a wide approximate candidate set.
        mask = self.space.column_mask(present)
        if vector_index.is_exact(self._feature_index):
            candidates = self._all_feature_vectors()
            rows = np.arange(candidates.shape[0])
        else:
            _, found = vector_index.search(self._feature_index, vector, min(self._feature_index.ntotal,
                                                                             max(2000, 50 * want)))
            rows = found[0][found[0] >= 0]
            candidates = np.vstack([self._feature_index.reconstruct(int(r)) for r in rows])
        d2 = np.sum((candidates[:, mask] - vector[0, mask]) ** 2, axis=1)
        top = np.argsort(d2, kind="stable")[:want]
        return rows[top], d2[top]

    def _all_feature_vectors(self) -> np.ndarray:
        if self._feature_vectors is None:
            self._feature_vectors = self._feature_index.reconstruct_n(0, self._feature_index.ntotal)
        return self._feature_vectors

    def embed(self, text: str) -> np.ndarray:
        return self._get_embedder().encode([text])[0]

    def search_lyrics(self, text: str, k: int = 10, *, query_vector: np.ndarray | None = None) -> list[SongMatch]:
        """Songs whose lyrics are about `text`, scored by the calibrated rule in `pipeline.recommend`."""
        k = _check_k(k)
        text = (text or "").strip()
        if not text:
            raise InputError("Type a few words to search lyrics by (the text was empty).")
        if self._lyric_index.ntotal == 0:
            return []
        q = self.embed(text) if query_vector is None else query_vector
        return self._lyric_matches(self._lyric_scores(q, k)[:k], q, text)

    def _lyric_matches(self, ranked: list[tuple[int, float]], q: np.ndarray, text: str) -> list[SongMatch]:
        query_themes = recommend.top_themes(q, self._theme_vectors, self._theme_names)
        words = set(recommend.words(text))
        return [self._match(song, score, recommend.lyric_reason(self._themes[song], self._keywords[song],
                                                                query_themes, words))
                for song, score in ranked]

    def _lyric_scores(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        # a fixed, generous candidate set: a song's score must not depend on how many songs were asked for
        n_passages = min(self._lyric_index.ntotal, max(LYRIC_CANDIDATES, 40 * k))
        sims, rows = vector_index.search(self._lyric_index, q[None, :], n_passages)
        keep = rows[0] >= 0
        return recommend.aggregate_passages(self._passage_song_ids[rows[0][keep]], sims[0][keep],
                                            self._calibration)

    def _lyric_score_for(self, q: np.ndarray, song: int) -> float | None:
        """The calibrated lyric score of one song, from all its passages (used to complete fused lists)."""
        start, end = self._passage_bounds[song], self._passage_bounds[song + 1]
        if end <= start:
            return None
        vectors = self._lyric_index.reconstruct_n(int(start), int(end - start))
        sims = np.sort(vectors @ q)[::-1]
        return recommend.calibrated_song_score(sims, floor=None, calibration=self._calibration)

    def _feature_score_for(self, query: np.ndarray, present: np.ndarray, song: int) -> float | None:
        row = self._feature_row[song]
        if row < 0:
            return None
        vector = self.space.transform(query)[0]
        mask = self.space.column_mask(present)
        song_vector = self._feature_index.reconstruct(int(row))
        d2 = float(np.sum((song_vector[mask] - vector[mask]) ** 2))
        return float(self.space.similarity(np.array([d2]), self.space.weight_share(present))[0])

    def search_fused(self, features: Mapping[str, float] | Sequence[float] | np.ndarray | None, text: str | None,
                     k: int = 10, *, pool: int = 100) -> list[SongMatch]:
        """Reciprocal-rank fusion of the feature and lyric rankings (see `pipeline.recommend.fuse`)."""
        return self.recommend(features, text, k, pool=pool)[2]

    def recommend(self, features: Mapping[str, float] | Sequence[float] | np.ndarray | None, text: str | None,
                  k: int = 10, *, pool: int = 100) -> tuple[list[SongMatch], list[SongMatch], list[SongMatch]]:
        """The three lists at once — by features, by lyrics, fused — each search and the embedding done once."""
        k = _check_k(k)
        text = (text or "").strip()
        if features is None and not text:
            raise InputError("The fused list needs audio features, text, or both.")
        pool = max(pool, k)
        query, present = _feature_query(features) if features is not None else (None, None)
        feature_scores = dict(self._feature_ranking(query, present, pool)) if query is not None else {}
        q = self.embed(text) if text and self._lyric_index.ntotal else None
        lyric_ranked = self._lyric_scores(q, pool)[:pool] if q is not None else []
        lyric_scores = dict(lyric_ranked)
        # complete both rankings over the whole candidate pool, so a song strong on both sides is seen as such
        for song in set(feature_scores) | set(lyric_scores):
            if query is not None and song not in feature_scores:
                score = self._feature_score_for(query, present, song)
                if score is not None:
                    feature_scores[song] = score
            if q is not None and song not in lyric_scores:
                score = self._lyric_score_for(q, song)
                if score is not None:
                    lyric_scores[song] = score
        fused = []
        for song, score, ranks in recommend.fuse({"features": feature_scores, "lyrics": lyric_scores})[:k]:
            parts = [f"#{ranks[name]} by {name}" for name in ("features", "lyrics") if name in ranks]
            fused.append(self._match(song, score, " · ".join(parts)))
        by_features = sorted(feature_scores.items(), key=lambda item: (-item[1], item[0]))[:k] if query is not None \
            else []
        return ([self._feature_match(song, score, query, present) for song, score in by_features],
                self._lyric_matches(lyric_ranked[:k], q, text) if q is not None else [], fused)

    # -- rows -----------------------------------------------------------------------------------------------------
    def _match(self, song: int, score: float, why: str) -> SongMatch:
        values = self._features[song]
        return SongMatch(
            song_id=int(song), title=self._titles[song], artist=self._artists[song], year=self._years[song],
            genre=self._genres[song] or "", spotify_id=self._spotify[song] or "",
            spotify_url=spotify_url(self._spotify[song]), score=round(min(1.0, max(0.0, float(score))), 4),
            features={name: (None if math.isnan(v) else round(float(v), 4)) for name, v in zip(FEATURES, values)},
            why=why)


def _feature_query(features) -> tuple[np.ndarray, np.ndarray]:
    try:
        return as_matrix(features)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_k(k) -> int:
    try:
        value = float(k)
    except (TypeError, ValueError):
        raise InputError(f"k must be a whole number, got {k!r}.") from None
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= 500:
        raise InputError(f"k must be a whole number from 1 to 500, got {k!r}.")
    return int(value)
