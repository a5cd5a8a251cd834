"""The shipped song catalog (`index/`) and the three recommenders over it.

    catalog = Catalog.load()                       # verified against index/manifest.json
    catalog.search_features({"valence": 0.8, "energy": 0.7}, k=10)
    catalog.search_lyrics("driving at night with the windows down", k=10)
    catalog.search_fused(features, text, k=10)
    catalog.search_features(features, k=10, filters={"genre": "jazz", "years": [1980, 1989]})

Every search takes `filters` (`pipeline.filters`): they are applied inside the search, so the top k are the best
k songs that pass, not a filtered top k; `filter_note` says when fewer than k songs pass.

Lyric search needs the sentence embedder the catalog was built with. `Catalog.load()` alone resolves it from the
settings (`I2M_EMBEDDER_MODEL`, pinned revision) on the first lyric search; the app passes `embedder_factory` (or
calls `attach_embedder`) to share its already-loaded copy. Either way the embedder's fingerprint is checked against
the manifest.

How scores are computed is documented in `pipeline.features` (audio features), `pipeline.song_moods` (the mood
fit that multiplies the feature similarity), `pipeline.recommend` (the lyric rule, calibration, fusion) and
`pipeline.passage_scan` (every lyric passage scored from its stored 8-bit codes); the file contract is
`pipeline.catalog_schema`. This module loads and verifies the files and turns rows into
`SongMatch`es with a *why* that names the evidence.
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
from . import genres as vocabulary
from . import passage_scan, recommend, song_moods, vector_index
from .errors import IndexIntegrityError, InputError
from .filters import Filters
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
    genres: list[str] = field(default_factory=list)  # fine genres, as the sources name them; `genre` is the first
    families: list[str] = field(default_factory=list)  # their families (`pipeline/genre_families.json`)
    popularity: float | None = None  # Spotify's 0-100 when the song was collected

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
        self._vectors_lock = threading.Lock()

        # catalogs built before build_index tidied the title-cased sources' names carry "Don'T" and "I'Ll"
        self._titles = [schema.tidy_name(t) for t in songs["title"].tolist()]
        self._artists = [schema.tidy_name(a) for a in songs["artist"].tolist()]
        self._years = [None if y is None or (isinstance(y, float) and math.isnan(y)) else int(y)
                       for y in songs["year"].tolist()]
        self._genres = _labels(songs["genres"])
        self._families = _labels(songs["families"])
        self._year_values = songs["year"].to_numpy(dtype=np.float64, na_value=np.nan)
        self._popularity = songs["popularity"].to_numpy(dtype=np.float64, na_value=np.nan)
        # label → the songs carrying it: a genre filter is one lookup, not a scan of every song's labels
        self._by_label = _label_index([songs["families"], songs["genres"]])
        self._spotify = songs["spotify_id"].tolist()
        self._features = songs[list(FEATURES)].to_numpy(dtype=np.float64)
        self._keywords = songs["keywords"].tolist()
        self._has_features = songs["has_features"].to_numpy(dtype=bool)
        self._has_lyrics = songs["has_lyrics"].to_numpy(dtype=bool)
        self._feature_row = np.full(len(self._titles), -1, dtype=np.int64)
        self._feature_row[feature_song_ids] = np.arange(len(feature_song_ids))
        self._moods: song_moods.SongMoods | None = None
        self._row_moods = np.zeros((0, 0))
        self.use_song_moods(song_moods.load())
        self._vectors64: np.ndarray | None = None
        self._row_norms: np.ndarray | None = None
        if len(passage_song_ids) and not np.all(np.diff(passage_song_ids) >= 0):
            raise IndexIntegrityError("passage_song_ids.npy is not grouped by song; rebuild the index.")
        # lyric search scans every passage exactly, so no song is lost to a candidate cut
        self._lyrics = recommend.LyricScorer(passage_scan.from_index(lyric_index), passage_song_ids, bags["song"],
                                             bags["word"], bags["count"], song_topics, topic_prototypes)

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
    def feature_song_ids(self) -> np.ndarray:
        """The song ids of `feature_matrix()`'s rows."""
        return np.flatnonzero(self._has_features)

    @property
    def passage_count(self) -> int:
        return self._passage_count

    def use_song_moods(self, model: "song_moods.SongMoods | None") -> None:
        """The mood model of the feature search (`pipeline.song_moods`; None: sound similarity alone). For a refit
        and for measuring one (`scripts/eval_recs.py`), not while searches run; the app keeps the shipped model."""
        # each feature row's mood probabilities: the feature search prefers songs that share the query's mood
        rows = np.zeros((0, 0)) if model is None else model.probabilities(self._features[self._feature_song_ids])
        self._moods, self._row_moods = model, rows

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
    # -- filters --------------------------------------------------------------------------------------------------
    @property
    def genre_choices(self) -> dict[str, list[str]]:
        """The families and the fine genres this catalog holds (what a genre filter may name)."""
        fine = {g for gs in self._genres for g in gs}
        return {"families": [f for f in vocabulary.families() if f in self._by_label],
                "genres": sorted(fine)}

    def passing(self, filters: Filters | Mapping | str | None) -> np.ndarray | None:
        """A mask over song ids of the songs that pass `filters`, or None when nothing is filtered."""
        filters = Filters.from_json(filters)
        if not filters.active:
            return None
        mask = np.ones(len(self._titles), dtype=bool)
        if filters.genre is not None:
            if filters.genre not in self._by_label:
                families = ", ".join(f for f in vocabulary.families() if f in self._by_label)
                raise InputError(f"Unknown genre {filters.genre!r}: name a family ({families}) or a fine genre of "
                                 "the catalog such as \"deep-house\" or \"bossa nova\".")
            mask = np.zeros(len(self._titles), dtype=bool)
            mask[self._by_label[filters.genre]] = True
        # NaN (unknown year or popularity) compares False: such songs do not pass a filter on it
        with np.errstate(invalid="ignore"):
            if filters.years is not None:
                mask &= (self._year_values >= filters.years[0]) & (self._year_values <= filters.years[1])
            if filters.popularity is not None:
                mask &= (self._popularity >= filters.popularity[0]) & (self._popularity <= filters.popularity[1])
        return mask

    def filter_note(self, filters: Filters | Mapping | str | None, k: int, *, features: bool = True,
                    lyrics: bool = True) -> str | None:
        """A note for the person when `filters` leave fewer than `k` songs for a list they asked for."""
        filters = Filters.from_json(filters)
        mask = self.passing(filters)
        if mask is None:
            return None
        counts = {"with audio features": int((mask & self._has_features).sum()) if features else None,
                  "with lyrics": int((mask & self._has_lyrics).sum()) if lyrics else None}
        shown = {name: n for name, n in counts.items() if n is not None}
        if all(n >= k for n in shown.values()):
            return None
        told = " and ".join(f"{n:,} song{'s' if n != 1 else ''} {name}" for name, n in shown.items())
        return (f"The filters ({filters.describe()}) leave {told}, fewer than the {k} asked for: the lists show "
                "every song that passes. Widen the years or popularity, or pick a broader genre, for more.")

    # -- searches -------------------------------------------------------------------------------------------------
    def search_features(self, features: Mapping[str, float] | Sequence[float] | np.ndarray, k: int = 10,
                        exclude_ids: Sequence[int] = (), *, filters=None) -> list[SongMatch]:
        """Songs whose audio features are closest to `features` (Spotify units; missing names allowed), among the
        songs that pass `filters`."""
        k = check_k(k)
        query, present = _feature_query(features)
        ranked = self._feature_ranking(query, present, k, exclude_ids, self.passing(filters))
        return self._feature_matches(ranked, query, present)

    def _feature_ranking(self, query: np.ndarray, present: np.ndarray, k: int,
                         exclude_ids: Sequence[int] = (), passing: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Best first: sound similarity times the mood fit (`pipeline.song_moods`), or the similarity alone when
        the query leaves out a mood-bearing feature."""
        exclude = {int(i) for i in exclude_ids}
        mood = self._query_moods(query, present)
        if mood is None:
            rows, d2 = self._nearest_by_features(query, present, k + len(exclude), passing)
            scores = self.space.similarity(d2, self.space.weight_share(present))
        else:
            rows, scores = self._nearest_by_sound_and_mood(query, present, k + len(exclude), passing, mood)
        ranked = [(int(self._feature_song_ids[row]), float(score)) for row, score in zip(rows, scores)]
        return [(song, score) for song, score in ranked if song not in exclude][:k]

    def _query_moods(self, query: np.ndarray, present: np.ndarray) -> np.ndarray | None:
        if self._moods is None or not all(present[FEATURES.index(f)] for f in self._moods.features):
            return None
        return self._moods.probabilities(query)[0]

    def _nearest_by_sound_and_mood(self, query: np.ndarray, present: np.ndarray, want: int,
                                   passing: np.ndarray | None, mood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        share = self.space.weight_share(present)
        allowed = None if passing is None else passing[self._feature_song_ids]
        if vector_index.is_exact(self._feature_index):
            # every song that passes is measured: none is lost to a candidate cut
            vector = self.space.transform(query)[0].astype(np.float64)
            mask = self.space.column_mask(present)
            vectors, norms = self._vectors_and_norms()
            rows = np.arange(len(norms)) if allowed is None else np.flatnonzero(allowed)
            narrow = len(rows) < len(norms) // 4
            if narrow:  # only the rows that pass are worth reading
                vectors, norms = vectors[rows], norms[rows]
            if mask.all():
                d2 = vectors @ vector
                d2 *= -2.0
                d2 += norms
                d2 += float(vector @ vector)
                np.maximum(d2, 0.0, out=d2)
            else:
                d2 = _squared_distances(vectors, vector, mask)
            scores = self.space.similarity(d2, share)
            scores *= self._moods.fit_to(mood, self._row_moods[rows] if narrow else self._row_moods)
            if allowed is not None and not narrow:
                scores = scores[rows]
            top = _largest(scores, rows, want)
            return rows[top], scores[top]
        # An inverted-file index gives candidates nearest first by sound. A song beyond them is no closer than the
        # farthest candidate and fits at most 1, so once the want-th score reaches that candidate's similarity the
        # ranking is final; until then the candidates grow, up to every song of the lists the index probes (it is
        # approximate, as for any query). Songs of the query's mood lie a little farther by sound than its plain
        # nearest, so more lists are probed than for sound alone.
        total = int(allowed.sum()) if allowed is not None else int(self._feature_index.ntotal)
        count = min(total, max(MOOD_CANDIDATES, want))
        while True:
            rows, d2 = self._nearest_by_features(query, present, count, passing, enough=want,
                                                 probe_factor=MOOD_PROBE_FACTOR)
            scores = self.space.similarity(d2, share) * self._moods.fit_to(mood, self._row_moods[rows])
            top = _largest(scores, rows, want)
            bound = float(self.space.similarity(np.array([d2.max()]), share)[0]) if len(d2) else 0.0
            if count >= total or len(rows) < count or (len(top) == want and scores[top[-1]] >= bound):
                return rows[top], scores[top]
            count = min(total, count * 8)

    def _vectors_and_norms(self) -> tuple[np.ndarray, np.ndarray]:
        if self._row_norms is None:
            vectors = self._all_feature_vectors().astype(np.float64)  # takes the lock itself
            with self._vectors_lock:
                if self._row_norms is None:
                    self._vectors64 = vectors
                    self._row_norms = np.einsum("ij,ij->i", vectors, vectors)
        return self._vectors64, self._row_norms

    def _sound_evidence(self, songs: Sequence[int], query: np.ndarray, present: np.ndarray) -> list[str]:
        """Per song: 'happy mood 0.60 ↔ 0.93; close on energy 0.82 ↔ 0.80, …', the shared mood, then the closest
        features."""
        values = self._features[list(songs)]
        close = closest_features(query[0], values, present, self.space)
        mood = self._query_moods(query, present)
        out = []
        for song, row_values, names in zip(songs, values, close):
            parts = []
            row = self._feature_row[song]
            if mood is not None and row >= 0:
                parts.append(self._moods.describe(mood, self._row_moods[row]))
            if names:
                parts.append("close on " + ", ".join(describe_pair(n, query[0][FEATURES.index(n)],
                                                                   row_values[FEATURES.index(n)]) for n in names))
            out.append("; ".join(parts))
        return out

    def _feature_matches(self, ranked: Sequence[tuple[int, float]], query: np.ndarray,
                         present: np.ndarray) -> list[SongMatch]:
        evidence = self._sound_evidence([song for song, _ in ranked], query, present)
        return [self._match(song, score, why) for (song, score), why in zip(ranked, evidence)]

    def _nearest_by_features(self, query: np.ndarray, present: np.ndarray, want: int,
                             passing: np.ndarray | None = None, enough: int | None = None, probe_factor: int = 1):
        """The `want` nearest rows by sound, nearest first. On an inverted-file index (probing `probe_factor` times
        its lists), fewer when its probed lists hold fewer, as long as they hold `enough` (default: `want`);
        otherwise the passing rows are scanned."""
        vector = self.space.transform(query)
        allowed = None if passing is None else passing[self._feature_song_ids]
        exact = vector_index.is_exact(self._feature_index)
        broad = allowed is not None and allowed.mean() >= IVF_FILTER_SHARE
        if present.all() and (allowed is None or exact or broad):
            # FAISS, a filter being a bitmap of the rows that pass, checked inside the scan. On an inverted-file
            # index only a broad filter goes this way (the probed lists hold enough passing rows; if they did
            # not, the exact scan below takes over).
            d2, rows = vector_index.search(self._feature_index, vector, want, allowed=allowed,
                                           probe_factor=probe_factor)
            keep = rows[0] >= 0
            if allowed is None or exact or keep.sum() >= min(enough or want, int(allowed.sum())):
                return rows[0][keep], d2[0][keep]
        mask = self.space.column_mask(present)
        if allowed is not None or exact:
            # An exact scan of the rows that pass (every row without a filter). A partial query compares only the
            # columns it gives; a selective filter on an approximate index is scanned exactly too, so that it
            # never comes back short of songs that pass.
            vectors = self._all_feature_vectors()
            rows = np.flatnonzero(allowed) if allowed is not None else np.arange(len(vectors))
            d2 = _squared_distances(vectors if allowed is None else vectors[rows], vector[0], mask)
        else:  # a partial query on an approximate index: a re-ranking of a wide candidate set
            _, found = vector_index.search(self._feature_index, vector, min(self._feature_index.ntotal,
                                                                             max(2000, 50 * want)),
                                           probe_factor=probe_factor)
            rows = found[0][found[0] >= 0]
            candidates = np.vstack([self._feature_index.reconstruct(int(r)) for r in rows])
            d2 = _squared_distances(candidates, vector[0], mask)
        top = _smallest(d2, rows, want)
        return rows[top], d2[top]

    def _all_feature_vectors(self) -> np.ndarray:
        if self._feature_vectors is None:
            with self._vectors_lock:
                if self._feature_vectors is None:
                    self._feature_vectors = vector_index.all_vectors(self._feature_index)
        return self._feature_vectors

    def embed(self, text: str) -> np.ndarray:
        return self.embedder().encode([text])[0]

    def search_lyrics(self, text: str, k: int = 10, *, query_vector: np.ndarray | None = None,
                      filters=None) -> list[SongMatch]:
        """Songs whose lyrics are about `text`, scored by the rule in `pipeline.recommend`, among the songs that
        pass `filters`."""
        k = check_k(k)
        passing = self.passing(filters)
        text = (text or "").strip()
        if not text:
            raise InputError("Type a few words to search lyrics by (the text was empty).")
        if self._passage_count == 0:
            return []
        found = self._lyric_query(text, query_vector)
        return [self._match(song, score, self._lyric_evidence(found, song)) for song, score in
                self._lyric_ranking(found, k, passing)]

    def _lyric_query(self, text: str, query_vector: np.ndarray | None = None) -> recommend.LyricQuery:
        q = self.embed(text) if query_vector is None else np.asarray(query_vector, dtype=np.float32)
        return self._lyrics.query(q, text)

    def _lyric_ranking(self, found: recommend.LyricQuery, limit: int,
                       passing: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The `limit` best songs that pass, best first (ties by song id, so a ranking never depends on the
        machine). Every song is scored, so the filter is applied before the cut."""
        relevance = found.relevance
        rows = np.arange(len(relevance)) if passing is None else np.flatnonzero(passing[self._lyrics.songs])
        rows = rows[_smallest(-relevance[rows], self._lyrics.songs[rows], limit)]
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
                     k: int = 10, *, pool: int = 100, filters=None) -> list[SongMatch]:
        """Reciprocal-rank fusion of the feature and lyric rankings (see `pipeline.recommend.fuse`)."""
        return self.recommend(features, text, k, pool=pool, filters=filters)[2]

    def recommend(self, features: Mapping[str, float] | Sequence[float] | np.ndarray | None, text: str | None,
                  k: int = 10, *, pool: int = 100,
                  filters=None) -> tuple[list[SongMatch], list[SongMatch], list[SongMatch]]:
        """The three lists at once — by features, by lyrics, fused — each search and the embedding done once; all
        three among the songs that pass `filters` (both rankings are filtered, so the fused one is too)."""
        k = check_k(k)
        passing = self.passing(filters)
        text = (text or "").strip()
        if features is None and not text:
            raise InputError("The fused list needs audio features, text, or both.")
        pool = max(pool, k)
        query, present = _feature_query(features) if features is not None else (None, None)
        feature_scores = dict(self._feature_ranking(query, present, pool, (), passing)) if query is not None else {}
        found = self._lyric_query(text) if text and self._passage_count else None
        lyric_top = self._lyric_ranking(found, pool, passing) if found is not None else []
        lyric_scores = dict(lyric_top)
        # complete both rankings over the whole candidate pool, so a song strong on both sides is seen as such
        if query is not None:
            feature_scores.update(self._feature_scores_for(query, present, set(lyric_scores) - set(feature_scores)))
        if found is not None:
            for song in set(feature_scores) - set(lyric_scores):
                score = self._lyric_score_for(found, song)
                if score is not None:
                    lyric_scores[song] = score
        fused = []
        best = recommend.fuse({"features": feature_scores, "lyrics": lyric_scores})[:k]
        by_sound = [song for song, _, ranks in best if "features" in ranks]
        sound = dict(zip(by_sound, self._sound_evidence(by_sound, query, present))) if by_sound else {}
        for song, score, ranks in best:
            parts = []
            if "features" in ranks:
                evidence = sound[song]
                parts.append(f"sound #{ranks['features']}" + (f" ({evidence})" if evidence else ""))
            if "lyrics" in ranks:
                evidence = self._lyric_evidence(found, song)
                parts.append(f"lyrics #{ranks['lyrics']}" + (f" ({evidence})" if evidence else ""))
            fused.append(self._match(song, score, " · ".join(parts)))
        by_features = sorted(feature_scores.items(), key=lambda item: (-item[1], item[0]))[:k] if query is not None \
            else []
        return (self._feature_matches(by_features, query, present) if by_features else [],
                [self._match(song, score, self._lyric_evidence(found, song)) for song, score in lyric_top[:k]],
                fused)

    def _feature_scores_for(self, query: np.ndarray, present: np.ndarray, songs) -> dict[int, float]:
        """The feature score of each given song that has features, as the ranking computes it; the query is
        transformed and its mood read once for the whole set."""
        songs = sorted(s for s in songs if self._feature_row[s] >= 0)
        if not songs:
            return {}
        rows = self._feature_row[songs]
        vector = self.space.transform(query)[0]
        mask = self.space.column_mask(present)
        vectors = np.vstack([self._feature_index.reconstruct(int(row)) for row in rows])
        scores = self.space.similarity(_squared_distances(vectors, vector, mask), self.space.weight_share(present))
        mood = self._query_moods(query, present)
        if mood is not None:
            scores = scores * self._moods.fit_to(mood, self._row_moods[rows])
        return {int(song): float(score) for song, score in zip(songs, scores)}

    # -- rows -----------------------------------------------------------------------------------------------------
    def _match(self, song: int, score: float, why: str) -> SongMatch:
        values = self._features[song]
        genres = self._genres[song]
        popularity = self._popularity[song]
        return SongMatch(
            song_id=int(song), title=self._titles[song], artist=self._artists[song], year=self._years[song],
            genre=genres[0] if genres else "", spotify_id=self._spotify[song] or "",
            spotify_url=spotify_url(self._spotify[song]), score=round(min(1.0, max(0.0, float(score))), 4),
            features={name: (None if math.isnan(v) else round(float(v), 4)) for name, v in zip(FEATURES, values)},
            why=why, genres=list(genres), families=list(self._families[song]),
            popularity=None if math.isnan(popularity) else round(float(popularity), 1))


def _default_embedder():
    """The embedder named by the settings (all-MiniLM-L6-v2 at its pinned revision), for `Catalog.load()` alone."""
    from .artifacts import ArtifactSpec, resolve
    from .embedder import SentenceEmbedder
    from .settings import Settings

    settings = Settings.from_env()
    spec = ArtifactSpec("sentence embedder", settings.embedder_model, settings.revision_for("embedder"))
    return SentenceEmbedder(resolve(spec, token=settings.hf_token).path, settings.embedder_model,
                            settings.revision_for("embedder"))


# On an inverted-file index (above 200k songs), a filter that lets at least this share of the songs through is
# searched in the probed lists (the 1.2M-track benchmark measures its recall); a narrower one is scanned exactly.
IVF_FILTER_SHARE = 0.05
# Candidates first drawn from an inverted-file index for the mood-aware ranking (grown until the ranking is final).
MOOD_CANDIDATES = 2048
# Lists probed for the mood-aware ranking, as a multiple of the index's own (1.2M synthetic rows, 24 lists: recall@10
# 0.94; 48: 0.98; 96: 1.00, at about three times the time).
MOOD_PROBE_FACTOR = 2
SELECTION_SAMPLE = 256  # sampled values per song wanted when picking the best songs (see `_largest`)


def _labels(column) -> list[list[str]]:
    """Each song's labels from their joined form; the few thousand distinct strings are split once each."""
    texts = column.tolist()
    parsed = {text: vocabulary.split(text) for text in set(texts)}
    return [parsed[text] for text in texts]


def _label_index(columns) -> dict[str, np.ndarray]:
    import pandas as pd

    parts: dict[str, list[np.ndarray]] = {}
    for column in columns:
        codes, texts = pd.factorize(column)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(texts) + 1))
        for i, text in enumerate(texts):
            for label in vocabulary.split(text):
                parts.setdefault(label, []).append(order[bounds[i]:bounds[i + 1]])
    return {label: np.unique(np.concatenate(found)) for label, found in parts.items()}


def _squared_distances(vectors: np.ndarray, query: np.ndarray, columns: np.ndarray) -> np.ndarray:
    diff = vectors - query if columns.all() else vectors[:, columns] - query[columns]
    return np.einsum("ij,ij->i", diff, diff)


def _smallest(values: np.ndarray, ties: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n smallest values, smallest first, ties broken by `ties` (the values tied at the cut are
    kept whole, so the order never depends on the machine)."""
    return _largest(-values, ties, n)


def _largest(values: np.ndarray, ties: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest values, largest first, ties broken by `ties`. The n-th largest of a strided
    sample is never above the n-th largest of all, so the values at or above it hold the answer: a few hundred to
    sort instead of a partial sort of every value (1 ms for 115k songs)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n >= len(values):
        positions = np.arange(len(values))
    else:
        sample = values[:: max(1, len(values) // (SELECTION_SAMPLE * n))]
        cut = np.partition(sample, len(sample) - n)[len(sample) - n]
        positions = np.flatnonzero(values >= cut)
    return positions[np.lexsort((ties[positions], -values[positions]))][:n]


def _feature_query(features) -> tuple[np.ndarray, np.ndarray]:
    try:
        return as_matrix(features)
    except ValueError as exc:
        raise InputError(str(exc)) from None
