"""Measure the song recommenders on the development set beside two plain baselines.

    python scripts/eval_recs.py --json                         # the shipped index/ against ../shared/eval
    python scripts/eval_recs.py --index DIR --limit-queries 4  # a small slice (the test suite runs one)

The three metrics are defined in `../shared/eval/README.md`:

* theme precision@20 — lyric search for caption-like text; the share of the first 20 songs carrying a topic label
  (tcc_ceds table) whose label is the query's topic;
* noisy-passage recall@10 — a half-remembered 40-word run of a Billboard song finds that song in the top 10;
* mood consistency — the audio-feature search for the mean features of a mood returns songs of that mood.

Baselines, computed here over exactly the songs with lyrics in the evaluated catalog (fp32, all-MiniLM-L6-v2,
the build's 40-word passages): one vector per song (the normalised mean of its passages) and the best passage per
song. The audio-feature reference is plain standardised features (every feature weighted 1). Lyrics are read from
`../shared/data` only to compute these baselines; their embeddings share the build's cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.embedder import encode_cached  # noqa: E402
from scripts import build_index as b  # noqa: E402

DEFAULT_EVAL_DIR = REPO_ROOT.parent / "shared" / "eval"
THEME_DEPTH = 20  # labelled songs counted per query
THEME_MIN_LABELLED = 5  # fewer labelled songs than this in the ranking: the query is skipped
THEME_SEARCH_K = 400  # songs requested per theme query; labelled songs are about half of those with lyrics
MOOD_DEPTH = 20
MOOD_NEIGHBOURS = 15
MOOD_LABEL_FEATURES = ("valence", "energy", "danceability", "acousticness")
MOOD_SPLITS = 10  # random halves of the mood table for the out-of-sample estimate

Ranked = list[list[str]]  # per found song, best first: its normalised artist|title keys


# -- the development set ------------------------------------------------------------------------------------------

def load_dev(eval_dir: Path, limit_queries: int = 0) -> dict:
    data = json.loads((eval_dir / "recs_dev.json").read_text())
    themes = [(topic, query) for topic, queries in sorted(data["theme_queries"].items()) for query in queries]
    noisy = list(data["noisy_passages"])
    if limit_queries:
        # every topic keeps a query, so a slice still measures precision and not a base rate
        by_topic: dict[str, list[str]] = {}
        for topic, query in themes:
            by_topic.setdefault(topic, []).append(query)
        per_topic = max(1, limit_queries // max(1, len(by_topic)))
        themes = [(t, q) for t, qs in by_topic.items() for q in qs[:per_topic]]
        noisy = noisy[:limit_queries]
    moods = pd.read_csv(eval_dir / "moods_dev.csv").rename(columns={"length": "duration_ms"})
    return {"themes": themes, "noisy": noisy, "moods": moods}


def topic_labels(data_dir: Path) -> dict[str, str]:
    """normalised artist|title → topic, from the tcc_ceds table (a key claimed by two topics is dropped)."""
    table = pd.read_csv(data_dir / "tcc_ceds_music_partial.csv", usecols=["artist_name", "track_name", "topic"])
    labels: dict[str, str] = {}
    clashes: set[str] = set()
    for row in table.itertuples(index=False):
        for key in b.song_keys(str(row.artist_name), str(row.track_name)):
            if labels.get(key, row.topic) != row.topic:
                clashes.add(key)
            labels.setdefault(key, row.topic)
    return {k: v for k, v in labels.items() if k not in clashes}


# -- metrics ------------------------------------------------------------------------------------------------------

def theme_precision(search: Callable[[str], Ranked], queries: Sequence[tuple[str, str]],
                    labels: dict[str, str]) -> dict:
    per_query = []
    for topic, query in queries:
        found = []
        for keys in search(query):
            label = next((labels[k] for k in keys if k in labels), None)
            if label is not None:
                found.append(label)
                if len(found) == THEME_DEPTH:
                    break
        if len(found) >= THEME_MIN_LABELLED:
            per_query.append(sum(label == topic for label in found) / len(found))
    return {"value": _mean(per_query), "queries": len(per_query)}


def _noisy_hit(keys: Iterable[str], artist: str, title: str) -> bool:
    want_title = b.normalize_title(title)
    want_artists = {b.normalize_artist(artist), b.first_artist(artist)}
    for key in keys:
        song_artist, _, song_title = key.partition("|")
        if song_title == want_title and any(a and song_artist.startswith(a) for a in want_artists):
            return True
    return False


def noisy_recall(search: Callable[[str], Ranked], cases: Sequence[dict], depth: int = 10) -> dict:
    hits = [any(_noisy_hit(keys, case["artist"], case["title"]) for keys in search(case["query"])[:depth])
            for case in cases]
    return {"value": _mean(hits), "queries": len(hits)}


def mood_queries(moods: pd.DataFrame) -> dict[str, dict[str, float]]:
    from pipeline.features import FEATURES

    return {mood: {f: float(group[f].astype(float).mean()) for f in FEATURES if f in group}
            for mood, group in sorted(moods.groupby("mood"))}


class MoodLabeller:
    """A song's mood: the majority mood of its nearest tracks of the mood table in standardised label features."""

    def __init__(self, moods: pd.DataFrame):
        values = moods[list(MOOD_LABEL_FEATURES)].to_numpy(dtype=np.float64)
        self.mean, self.std = values.mean(axis=0), values.std(axis=0)
        self.points = (values - self.mean) / self.std
        self.moods = moods["mood"].to_numpy()

    def __call__(self, features: np.ndarray) -> list[str]:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        d2 = ((z[:, None, :] - self.points[None, :, :]) ** 2).sum(axis=-1)
        out = []
        for row in np.argsort(d2, axis=1, kind="stable")[:, :MOOD_NEIGHBOURS]:
            counts = Counter(self.moods[row].tolist())
            out.append(min(counts, key=lambda m: (-counts[m], m)))
        return out


def mood_consistency(search: Callable[[dict], np.ndarray], moods: pd.DataFrame) -> dict:
    """`search(query features) -> (n, 4)` label features of the top songs, best first."""
    label = MoodLabeller(moods)
    per_mood = {}
    for mood, query in mood_queries(moods).items():
        found = label(search(query)[:MOOD_DEPTH])
        per_mood[mood] = round(sum(f == mood for f in found) / max(1, len(found)), 4)
    return {"value": _mean(per_mood.values()), "per_mood": per_mood}


def mood_consistency_on_halves(catalog, moods: pd.DataFrame, splits: int = MOOD_SPLITS, seed: int = 0) -> dict:
    """The shipped song-mood model is fitted on the development mood table, so measuring it there is in-sample.
    Here it is refitted on a random half and measured on the other half (queries and labeller both from the unseen
    half), as the held-out table will be; also without the mood term, for the ratio. Mean and spread over splits."""
    from pipeline import song_moods

    shipped = song_moods.load()
    rng = np.random.default_rng(seed)
    columns = list(shipped.features)
    with_mood, without = [], []
    try:
        for _ in range(splits):
            order = rng.permutation(len(moods))
            fit_half, test_half = moods.iloc[order[: len(moods) // 2]], moods.iloc[order[len(moods) // 2:]]
            catalog.use_song_moods(song_moods.SongMoods.fit(fit_half[columns].to_numpy(dtype=float),
                                                            fit_half["mood"].to_numpy(), shipped.features))
            with_mood.append(mood_consistency(catalog_mood_search(catalog), test_half)["value"])
            catalog.use_song_moods(None)
            without.append(mood_consistency(catalog_mood_search(catalog), test_half)["value"])
    finally:
        catalog.use_song_moods(shipped)
    return {"splits": splits, "mean": _mean(with_mood), "sd": round(float(np.std(with_mood)), 4),
            "without_mood_fit_mean": _mean(without), "without_mood_fit_sd": round(float(np.std(without)), 4)}


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else float("nan")


# -- searches under test ------------------------------------------------------------------------------------------

def song_key_lists(titles: Sequence[str], artists: Sequence[str]) -> list[list[str]]:
    return [b.song_keys(a, t) for t, a in zip(titles, artists)]


def catalog_lyric_search(catalog, k: int, times: list[float] | None = None) -> Callable[[str], Ranked]:
    """The shipped method; `times` collects each call's seconds (embedding included)."""
    keys = song_key_lists(catalog.titles, catalog.artists)

    def search(text: str) -> Ranked:
        started = time.perf_counter()
        found = catalog.search_lyrics(text, k=k)
        if times is not None:
            times.append(time.perf_counter() - started)
        return [keys[m.song_id] for m in found]

    return search


class PlainBaselines:
    """fp32 all-MiniLM-L6-v2 over the catalog's songs with lyrics: mean vector per song, and max over passages."""

    def __init__(self, embedder, catalog, data_dir: Path, cache_dir: Path, log=print):
        lyrics = _raw_lyrics(data_dir)
        song_ids, texts, owners = [], [], []
        for song in np.flatnonzero(catalog.has_lyrics):
            lyric = next((lyrics[k] for k in b.song_keys(catalog.artists[song], catalog.titles[song]) if k in lyrics),
                         None)
            parts = b.passages(lyric) if lyric else []
            if parts:
                owners += [len(song_ids)] * len(parts)
                song_ids.append(int(song))
                texts += parts
        self.keys = song_key_lists([catalog.titles[i] for i in song_ids], [catalog.artists[i] for i in song_ids])
        self.embedder = embedder
        log(f"baselines: {len(texts):,} passages of {len(song_ids):,} songs (embeddings cached in {cache_dir})")
        vectors = encode_cached(embedder, texts, cache_dir)
        self.passages = vectors
        self.owner = np.asarray(owners, dtype=np.int64)
        means = np.zeros((len(song_ids), vectors.shape[1]), dtype=np.float64)
        np.add.at(means, self.owner, vectors)
        self.means = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
        self.starts = np.searchsorted(self.owner, np.arange(len(song_ids)))
        self.songs, self.n_passages = len(song_ids), len(texts)

    def _ranked(self, scores: np.ndarray, k: int) -> Ranked:
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.keys[i] for i in top]

    def mean_vector(self, k: int) -> Callable[[str], Ranked]:
        return lambda text: self._ranked(self.means @ self.embedder.encode([text])[0], k)

    def max_passage(self, k: int) -> Callable[[str], Ranked]:
        def search(text: str) -> Ranked:
            sims = self.passages @ self.embedder.encode([text])[0]
            return self._ranked(np.maximum.reduceat(sims, self.starts), k)

        return search


def _raw_lyrics(data_dir: Path) -> dict[str, str]:
    """normalised key → lyric text, exactly as the build merges its sources (so the passages, and the embedding
    cache, are the build's)."""
    records = (b.read_tidytuesday(data_dir / "tidytuesday_spotify_songs.zip") + b.read_musicoset(data_dir / "musicoset")
               + b.read_billboard_lyrics(data_dir / "billboard_lyrics_1964-2015.xlsx")
               + b.read_tcc_ceds(data_dir / "tcc_ceds_music_partial.csv"))
    _, songs = b.build_songs_table(b.merge_records(records))
    out: dict[str, str] = {}
    for song in songs:
        if song.lyrics:
            for key in b.song_keys(song.artist, song.title):
                out.setdefault(key, song.lyrics)
    return out


def catalog_mood_search(catalog) -> Callable[[dict], np.ndarray]:
    def search(query: dict) -> np.ndarray:
        found = catalog.search_features(query, k=MOOD_DEPTH)
        return np.array([[m.features[f] for f in MOOD_LABEL_FEATURES] for m in found], dtype=np.float64)

    return search


def standardised_mood_search(catalog) -> Callable[[dict], np.ndarray]:
    """Reference: every feature standardised over the catalog and weighted 1 (no circle of fifths, no bounds)."""
    from pipeline.features import FEATURES

    values = catalog.feature_matrix()
    mean, std = values.mean(axis=0), values.std(axis=0)
    z = (values - mean) / np.where(std > 0, std, 1.0)
    cols = [FEATURES.index(f) for f in MOOD_LABEL_FEATURES]

    def search(query: dict) -> np.ndarray:
        present = [FEATURES.index(f) for f in query]
        q = (np.array([query[f] for f in query]) - mean[present]) / np.where(std[present] > 0, std[present], 1.0)
        top = np.argsort(((z[:, present] - q) ** 2).sum(axis=1), kind="stable")[:MOOD_DEPTH]
        return values[top][:, cols]

    return search


# -- the report ---------------------------------------------------------------------------------------------------

def evaluate(index: Path | None = None, data_dir: Path = b.DEFAULT_DATA_DIR, eval_dir: Path = DEFAULT_EVAL_DIR,
             *, limit_queries: int = 0, baselines: bool = True, cache_dir: Path | None = None,
             log=lambda message: print(f"[eval_recs] {message}", file=sys.stderr, flush=True)) -> dict:
    from pipeline.catalog import Catalog

    dev = load_dev(eval_dir, limit_queries)
    labels = topic_labels(data_dir)
    catalog = Catalog.load(index)
    embedder = catalog.embedder()
    times: list[float] = []  # of the k=10 searches, as the app asks
    result = {"index": str(catalog.path), "songs_with_lyrics": int(catalog.counts["with_lyrics"]),
              "theme_queries": len(dev["themes"]), "noisy_queries": len(dev["noisy"]), "methods": {}}
    method = {"theme_precision_at_20": theme_precision(catalog_lyric_search(catalog, THEME_SEARCH_K), dev["themes"],
                                                       labels)["value"],
              "noisy_recall_at_10": noisy_recall(catalog_lyric_search(catalog, 10, times), dev["noisy"])["value"]}
    mood = mood_consistency(catalog_mood_search(catalog), dev["moods"])
    method["mood_consistency"] = mood["value"]
    method["mood_per_mood"] = mood["per_mood"]
    method["mood_consistency_on_halves"] = mood_consistency_on_halves(catalog, dev["moods"],
                                                                      splits=3 if limit_queries else MOOD_SPLITS)
    method["lyric_search_p50_ms"] = round(float(np.percentile(times, 50)) * 1000, 2)
    result["methods"]["catalog"] = method
    if baselines:
        plain = PlainBaselines(embedder, catalog, data_dir,
                               cache_dir or _default_cache(), log)
        for name, fn in (("plain_mean_vector_fp32", plain.mean_vector), ("plain_max_passage_fp32", plain.max_passage)):
            result["methods"][name] = {
                "theme_precision_at_20": theme_precision(fn(THEME_SEARCH_K), dev["themes"], labels)["value"],
                "noisy_recall_at_10": noisy_recall(fn(10), dev["noisy"])["value"]}
        result["methods"]["plain_standardised_features"] = {
            "mood_consistency": mood_consistency(standardised_mood_search(catalog), dev["moods"])["value"]}
    return result


def _default_cache() -> Path:
    from pipeline.settings import Settings

    return Path(Settings.from_env().cache_dir) / "embeddings"  # the build's cache: the same passages


def _table(result: dict) -> str:
    rows = ["| method | theme precision@20 | noisy recall@10 | mood consistency |", "|---|---|---|---|"]
    for name, m in result["methods"].items():
        cells = [m.get(key) for key in ("theme_precision_at_20", "noisy_recall_at_10", "mood_consistency")]
        rows.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    halves = result["methods"].get("catalog", {}).get("mood_consistency_on_halves")
    if halves:
        rows.append(f"\nmood consistency out of sample (song-mood model refitted on a random half of the mood table, "
                    f"measured on the other, {halves['splits']} splits): {halves['mean']:.3f} ± {halves['sd']:.3f}; "
                    f"without the mood fit {halves['without_mood_fit_mean']:.3f} "
                    f"± {halves['without_mood_fit_sd']:.3f}")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", help="catalog folder (default: the I2M_INDEX_DIR setting, index/)")
    parser.add_argument("--data-dir", default=str(b.DEFAULT_DATA_DIR))
    parser.add_argument("--eval-dir", default=str(DEFAULT_EVAL_DIR))
    parser.add_argument("--limit-queries", type=int, default=0, help="a small slice of the queries")
    parser.add_argument("--no-baselines", action="store_true", help="skip the plain baselines (no embedding pass)")
    parser.add_argument("--cache-dir", help="where the baselines' passage embeddings are cached")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = evaluate(Path(args.index) if args.index else None, Path(args.data_dir), Path(args.eval_dir),
                      limit_queries=args.limit_queries, baselines=not args.no_baselines,
                      cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(json.dumps(result, indent=1) if args.json else _table(result))
    return result


if __name__ == "__main__":
    main()
