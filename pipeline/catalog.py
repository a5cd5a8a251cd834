"""The shipped song catalog (`index/`) and the three recommenders over it.

    catalog = Catalog.load()                       # verified against index/manifest.json
    catalog.search_features({"valence": 0.8, "energy": 0.7}, k=10)
    catalog.search_lyrics("driving at night with the windows down", k=10)
    catalog.search_fused(features, text, k=10)

Lyric search needs the sentence embedder the catalog was built with. `Catalog.load()` alone resolves it from the
settings (`I2M_EMBEDDER_MODEL`, pinned revision) on the first lyric search; the app passes `embedder_factory` (or
calls `attach_embedder`) to share its already-loaded copy. Either way the embedder's fingerprint is checked against
the manifest.

How scores are computed is documented in `pipeline.features` (audio features) and `pipeline.recommend`
(the lyric rule, calibration, fusion); the file contract is `pipeline.catalog_schema`. This module loads and
verifies the files and turns rows into `SongMatch`es with a *why* that names the evidence.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import catalog_schema as schema
from . import recommend, vector_index
from .errors import IndexIntegrityError, InputError
from .validate import check_k
from .features import FEATURES, FeatureSpace, as_matrix, closest_features, describe_pair


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
    return f"https://open.spotify.com/track/{spotify_id}" if schema.spotify_id(spotify_id) else ""


class Catalog:
    """Songs, their feature and lyric indexes, and the searches. Thread-safe for concurrent searches."""

    def __init__(self, path: Path, manifest: dict, songs, feature_index, feature_song_ids: np.ndarray,
                 lyric_index, passage_song_ids: np.ndarray, bags, song_topics: np.ndarray,
                 topic_prototypes: np.ndarray, embedder_factory: Callable[[], object] | None = None):
        self.path = path
        self.manifest = manifest
        self.space = FeatureSpace.from_json(manifest["feature_space"])
        self._feature_index = feature_index
        self._feature_song_ids = feature_song_ids
        self._passage_count = int(len(passage_song_ids))
        lyrics = manifest["lyrics"]
        self._calibration = lyrics.get("calibration") or {"center": 0.5, "width": 0.1}
        self._topics_shown: list[str] = list(lyrics["topics"]["shown_as"])
        self._embedder_factory = embedder_factory or _default_embedder
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
        self._has_features = songs["has_features"].to_numpy(dtype=bool)
        self._has_lyrics = songs["has_lyrics"].to_numpy(dtype=bool)
        self._feature_row = np.full(len(self._titles), -1, dtype=np.int64)
        self._feature_row[feature_song_ids] = np.arange(len(feature_song_ids))
        if len(passage_song_ids) and not np.all(np.diff(passage_song_ids) >= 0):
            raise IndexIntegrityError("passage_song_ids.npy is not grouped by song; rebuild the index.")
        # every passage decoded once: lyric search scans them all exactly, so no song is lost to a candidate cut
        passages = lyric_index.reconstruct_n(0, lyric_index.ntotal) if lyric_index.ntotal else \
            np.zeros((0, lyric_index.d), dtype=np.float32)
        self._lyrics = recommend.LyricScorer(passages, passage_song_ids, bags["song"], bags["word"], bags["count"],
                                             song_topics, topic_prototypes)

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
        if manifest.get("schema_version") != schema.SCHEMA_VERSION:
            raise IndexIntegrityError(f"{path} has schema version {manifest.get('schema_version')}, this app reads "
                                      f"version {schema.SCHEMA_VERSION}; rebuild it with scripts/build_index.py.")
        files = manifest.get("files", {})
        for name in schema.REQUIRED_FILES:
            if name not in files:
                raise IndexIntegrityError(f"The manifest of {path} does not list {name}.")
            file_path = path / name
            if not file_path.is_file():
                raise IndexIntegrityError(f"Catalog file {name} is missing from {path}.")
            if verify:
                size = file_path.stat().st_size
                if size != files[name]["bytes"] or schema.file_sha256(file_path) != files[name]["sha256"]:
                    raise IndexIntegrityError(
                        f"Catalog file {name} does not match its checksum in manifest.json (tampered, truncated "
                        f"or from another build); refusing to load it. Restore it or rebuild the index.")
        import pyarrow.parquet as pq

        songs = pq.read_table(path / schema.SONGS).to_pandas()
        bag_table = pq.read_table(path / schema.BAGS)
        bags = {"song": bag_table.column("song").to_numpy(), "word": bag_table.column("word").to_pylist(),
                "count": bag_table.column("count").to_numpy()}
        feature_song_ids = np.load(path / schema.FEATURE_IDS, allow_pickle=False)
        passage_song_ids = np.load(path / schema.PASSAGE_IDS, allow_pickle=False)
        song_topics = np.load(path / schema.TOPICS, allow_pickle=False)
        topic_prototypes = np.load(path / schema.TOPIC_MODEL, allow_pickle=False)
        feature_index = vector_index.load(path / schema.FEATURE_INDEX)
        lyric_index = vector_index.load(path / schema.PASSAGE_INDEX)
        counts = manifest["counts"]
        if (len(songs) != counts["songs"] or feature_index.ntotal != counts["with_features"]
                or lyric_index.ntotal != counts["passages"] or len(passage_song_ids) != counts["passages"]
                or len(feature_song_ids) != counts["with_features"] or len(song_topics) != counts["songs"]):
            raise IndexIntegrityError(f"The files of {path} disagree with the counts in its manifest.")
        return cls(path, manifest, songs, feature_index, feature_song_ids, lyric_index, passage_song_ids, bags,
                   song_topics, topic_prototypes, embedder_factory)

    @property
    def counts(self) -> dict[str, int]:
        c = self.manifest["counts"]
        return {k: int(c[k]) for k in ("songs", "with_features", "with_lyrics", "with_both")}

    # read-only views for evaluation scripts (song id = position)
    @property
    def titles(self) -> list[str]:
        return list(self._titles)

    @property
    def artists(self) -> list[str]:
        return list(self._artists)

    @property
    def has_lyrics(self) -> np.ndarray:
        return self._has_lyrics.copy()

    def feature_matrix(self) -> np.ndarray:
        """(songs with all 13 features, 13) in Spotify units, in song id order."""
        return self._features[self._has_features].copy()

    @property
    def passage_count(self) -> int:
        return self._passage_count

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

    def embedder(self):
        """The attached sentence embedder, resolving and checking it first if needed."""
        if self._embedder is None:
            with self._embedder_lock:
                if self._embedder is None:
                    self.attach_embedder(self._embedder_factory())
        return self._embedder

    # -- searches -------------------------------------------------------------------------------------------------
    def search_features(self, features: Mapping[str, float] | Sequence[float] | np.ndarray, k: int = 10,
                        exclude_ids: Sequence[int] = ()) -> list[SongMatch]:
        """Songs whose audio features are closest to `features` (Spotify units; missing names allowed)."""
        k = check_k(k)
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

    def _sound_evidence(self, song: int, query: np.ndarray, present: np.ndarray) -> str:
        values = self._features[song]
        close = closest_features(query[0], values, present, self.space)
        return ", ".join(describe_pair(n, query[0][FEATURES.index(n)], values[FEATURES.index(n)]) for n in close)

    def _feature_match(self, song: int, score: float, query: np.ndarray, present: np.ndarray) -> SongMatch:
        evidence = self._sound_evidence(song, query, present)
        return self._match(song, score, f"close on {evidence}" if evidence else "")

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
        return self.embedder().encode([text])[0]

    def search_lyrics(self, text: str, k: int = 10, *, query_vector: np.ndarray | None = None) -> list[SongMatch]:
        """Songs whose lyrics are about `text`, scored by the rule in `pipeline.recommend`."""
        k = check_k(k)
        text = (text or "").strip()
        if not text:
            raise InputError("Type a few words to search lyrics by (the text was empty).")
        if self._passage_count == 0:
            return []
        found = self._lyric_query(text, query_vector)
        return [self._match(song, score, self._lyric_evidence(found, song)) for song, score in
                self._lyric_ranking(found, k)]

    def _lyric_query(self, text: str, query_vector: np.ndarray | None = None) -> recommend.LyricQuery:
        q = self.embed(text) if query_vector is None else np.asarray(query_vector, dtype=np.float32)
        return self._lyrics.query(q, text)

    def _lyric_ranking(self, found: recommend.LyricQuery, limit: int) -> list[tuple[int, float]]:
        """The `limit` best songs, best first (ties by song id, so a ranking never depends on the machine)."""
        relevance = found.relevance
        if limit < len(relevance):
            # the limit-th best value and everything tied with it: a partial sort that keeps ties whole
            cut = np.partition(relevance, len(relevance) - limit)[len(relevance) - limit]
            rows = np.flatnonzero(relevance >= cut)
        else:
            rows = np.arange(len(relevance))
        rows = rows[np.lexsort((self._lyrics.songs[rows], -relevance[rows]))][:limit]
        scores = recommend.calibrated(relevance[rows], self._calibration)
        return list(zip(self._lyrics.songs[rows].tolist(), scores.tolist()))

    def _lyric_score_for(self, found: recommend.LyricQuery, song: int) -> float | None:
        position = int(np.searchsorted(self._lyrics.songs, song))
        if position >= len(self._lyrics.songs) or self._lyrics.songs[position] != song:
            return None
        return float(recommend.calibrated(found.relevance[position], self._calibration))

    def _lyric_evidence(self, found: recommend.LyricQuery, song: int) -> str:
        position = int(np.searchsorted(self._lyrics.songs, song))
        wanted = int(np.argmax(found.query_topics))
        profile = self._lyrics.topics[position]
        topic = self._topics_shown[wanted] if profile[wanted] >= 0.3 or int(np.argmax(profile)) == wanted else None
        return recommend.lyric_reason(topic, self._keywords[song], self._lyrics.shared_words(found.words, position))

    def search_fused(self, features: Mapping[str, float] | Sequence[float] | np.ndarray | None, text: str | None,
                     k: int = 10, *, pool: int = 100) -> list[SongMatch]:
        """Reciprocal-rank fusion of the feature and lyric rankings (see `pipeline.recommend.fuse`)."""
        return self.recommend(features, text, k, pool=pool)[2]

    def recommend(self, features: Mapping[str, float] | Sequence[float] | np.ndarray | None, text: str | None,
                  k: int = 10, *, pool: int = 100) -> tuple[list[SongMatch], list[SongMatch], list[SongMatch]]:
        """The three lists at once — by features, by lyrics, fused — each search and the embedding done once."""
        k = check_k(k)
        text = (text or "").strip()
        if features is None and not text:
            raise InputError("The fused list needs audio features, text, or both.")
        pool = max(pool, k)
        query, present = _feature_query(features) if features is not None else (None, None)
        feature_scores = dict(self._feature_ranking(query, present, pool)) if query is not None else {}
        found = self._lyric_query(text) if text and self._passage_count else None
        lyric_top = self._lyric_ranking(found, pool) if found is not None else []
        lyric_scores = dict(lyric_top)
        # complete both rankings over the whole candidate pool, so a song strong on both sides is seen as such
        if query is not None:
            for song in set(lyric_scores) - set(feature_scores):
                score = self._feature_score_for(query, present, song)
                if score is not None:
                    feature_scores[song] = score
        if found is not None:
            for song in set(feature_scores) - set(lyric_scores):
                score = self._lyric_score_for(found, song)
                if score is not None:
                    lyric_scores[song] = score
        fused = []
        for song, score, ranks in recommend.fuse({"features": feature_scores, "lyrics": lyric_scores})[:k]:
            parts = []
            if "features" in ranks:
                evidence = self._sound_evidence(song, query, present)
                parts.append(f"sound #{ranks['features']}" + (f" ({evidence})" if evidence else ""))
            if "lyrics" in ranks:
                evidence = self._lyric_evidence(found, song)
                parts.append(f"lyrics #{ranks['lyrics']}" + (f" ({evidence})" if evidence else ""))
            fused.append(self._match(song, score, " · ".join(parts)))
        by_features = sorted(feature_scores.items(), key=lambda item: (-item[1], item[0]))[:k] if query is not None \
            else []
        return ([self._feature_match(song, score, query, present) for song, score in by_features],
                [self._match(song, score, self._lyric_evidence(found, song)) for song, score in lyric_top[:k]],
                fused)

    def _feature_score_for(self, query: np.ndarray, present: np.ndarray, song: int) -> float | None:
        row = self._feature_row[song]
        if row < 0:
            return None
        vector = self.space.transform(query)[0]
        mask = self.space.column_mask(present)
        song_vector = self._feature_index.reconstruct(int(row))
        d2 = float(np.sum((song_vector[mask] - vector[mask]) ** 2))
        return float(self.space.similarity(np.array([d2]), self.space.weight_share(present))[0])

    # -- rows -----------------------------------------------------------------------------------------------------
    def _match(self, song: int, score: float, why: str) -> SongMatch:
        values = self._features[song]
        return SongMatch(
            song_id=int(song), title=self._titles[song], artist=self._artists[song], year=self._years[song],
            genre=self._genres[song] or "", spotify_id=self._spotify[song] or "",
            spotify_url=spotify_url(self._spotify[song]), score=round(min(1.0, max(0.0, float(score))), 4),
            features={name: (None if math.isnan(v) else round(float(v), 4)) for name, v in zip(FEATURES, values)},
            why=why)


def _default_embedder():
    """The embedder named by the settings (all-MiniLM-L6-v2 at its pinned revision), for `Catalog.load()` alone."""
    from .artifacts import ArtifactSpec, resolve
    from .embedder import SentenceEmbedder
    from .settings import Settings

    settings = Settings.from_env()
    spec = ArtifactSpec("sentence embedder", settings.embedder_model, settings.revision_for("embedder"))
    return SentenceEmbedder(resolve(spec, token=settings.hf_token).path, settings.embedder_model,
                            settings.revision_for("embedder"))


def _feature_query(features) -> tuple[np.ndarray, np.ndarray]:
    try:
        return as_matrix(features)
    except ValueError as exc:
        raise InputError(str(exc)) from None
