"""Scoring rules of the lyric recommender and of the fused list — the one definition, used by the catalog at query
time and by `scripts/build_index.py` to calibrate.

Lyrics. The query is embedded (all-MiniLM-L6-v2, cosine) and every song with lyrics gets four signals:

* best  — similarity of its best stanza-sized passage (a half-remembered line finds its stanza);
* whole — similarity of the song's mean passage vector (what the whole song is about);
* words — BM25 of the query's words in the song's bag of words (unordered single words with counts);
* topic — how well the song's lyric-topic profile fits the query's topics. Song profiles are predicted from the
  song's mean vector by a linear model trained at build time on the topic labels of the tcc_ceds table (out of
  fold for the labelled songs, so they are scored like any other song). The query's topics are its softmax
  similarity to topic prototypes (a description of each topic plus its most telling lyric words) plus the mean
  profile of the 30 songs it finds first by meaning (pseudo-relevance feedback): a scene caption is rewritten into
  the language lyrics use.

    relevance = 0.5 * best + 0.5 * whole + 0.006 * words + (1 - line) * 0.1 * z(topic)

`z` standardises over the catalog's songs. `line` in [0, 1] says how much the query reads like a lyric line (a
song shares many of its words, or one passage matches it closely); the topic prior then steps aside, so a
remembered line finds its song instead of songs on its topic. The weights were chosen on queries written for
tuning, never on the evaluation set (`scripts/eval_recs.py`).

Relevance is calibrated against chance, measured at build time over query-like texts and every song (mean m,
standard deviation sd): `score = sigmoid((relevance - (m + 2.5 sd)) / sd)`, so a match 2.5 standard deviations
above chance scores 0.5, chance-level matches ≈ 0.08, strong matches approach 1.

Fusion. Reciprocal-rank fusion over the feature and lyric rankings (k0 = 60, as in Cormack et al. 2009):
`rrf = Σ 1 / (k0 + rank)`, divided by its maximum `2 / (k0 + 1)` so the fused score is in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from . import passage_scan
from .catalog_schema import stem, words

W_BEST, W_WHOLE, W_WORDS, W_TOPIC = 0.5, 0.5, 0.006, 0.1
LINE_WORDS = (18.0, 30.0)  # top BM25 from which a query starts / fully counts as a lyric line
LINE_BEST = (0.55, 0.70)  # the same for the best passage similarity
PRF_SONGS = 30
PROTOTYPE_TEMPERATURE = 0.02
BM25_K1, BM25_B = 1.2, 0.75
CALIBRATION_SIGMAS = 2.5
RRF_K0 = 60

# Words too common in lyrics and captions to carry meaning; used for bags of words and query words alike.
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves im youre dont cant wont aint ill
ive id youll youve theyre thats whats gonna wanna gotta yeah oh ooh ah uh hey la na da got get gets like know go
going come comes came one two three say said tell told make made way cause cuz baby want let lets ya yo yes nah mmm
hmm whoa woah verse chorus intro outro hook bridge repeat instrumental x2 x3 x4 ahh ohh oooh woo whoo ayy uhh huh
couldn wouldn shouldn didn doesn isn wasn weren haven hasn hadn don won ain gon til em ima imma mmmm""".split())


def bag_words(text: str) -> list[str]:
    """The words a bag of words counts and a query is matched on: stemmed, no stop words, no single letters."""
    return [stem(w) for w in words(text) if len(w) >= 2 and w not in STOPWORDS]


def lyric_query(caption: str, emotion: str) -> str:
    """What lyric search looks for when a photo asks: the caption plus its mood in words."""
    from .prompt import EMOTION_WORDS

    words_ = ", ".join((emotion,) + EMOTION_WORDS.get(emotion, ()))
    return f"{caption}. {words_}" if caption else words_


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp((x - x.max()) / temperature)
    return e / e.sum()


@dataclass
class LyricQuery:
    """What one lyric search computed, over the songs with lyrics (positions in `LyricScorer.songs`)."""

    relevance: np.ndarray
    best: np.ndarray
    whole: np.ndarray
    query_topics: np.ndarray  # the query's topic weights (sum 1)
    line: float
    words: list[str]  # the query's bag words found in the catalog


class LyricScorer:
    """The lyric rule over arrays: passage vectors grouped by song, song bags of words, song topic profiles."""

    def __init__(self, passages: np.ndarray | passage_scan.PassageScan, passage_songs: np.ndarray,
                 bag_songs: np.ndarray, bag_words_: Sequence[str], bag_counts: np.ndarray, song_topics: np.ndarray,
                 topic_prototypes: np.ndarray):
        """`passages`: fp32 vectors, or a scan of the stored ones (`passage_scan.from_index`)."""
        self.passages = passage_scan.DecodedScan(passages) if isinstance(passages, np.ndarray) else passages
        passage_songs = np.asarray(passage_songs, dtype=np.int64)
        self.songs, self.starts = np.unique(passage_songs, return_index=True)  # grouped by song, ascending
        if len(passage_songs) and not np.all(np.diff(passage_songs) >= 0):
            raise ValueError("passages must be grouped by song, in ascending song order")
        # A song's mean vector is the normalised sum of its passages, so its similarity is the sum of its passages'
        # similarities over the sum's norm: one scan gives both signals.
        sums = self.passages.group_sums(self.starts) if len(self.starts) else \
            np.zeros((0, self.passages.dim), dtype=np.float64)
        norms = np.linalg.norm(sums, axis=1)
        self._inverse_norms = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        self.topics = np.clip(np.asarray(song_topics, dtype=np.float32)[self.songs], 0.0, 1.0)
        self.prototypes = np.asarray(topic_prototypes, dtype=np.float32)
        self._bags(np.asarray(bag_songs, dtype=np.int64), list(bag_words_), np.asarray(bag_counts, np.float64))

    def _bags(self, bag_songs: np.ndarray, bag_words_: list[str], counts: np.ndarray) -> None:
        n = len(self.songs)
        rows = np.searchsorted(self.songs, bag_songs)
        known = (rows < n) & (self.songs[np.minimum(rows, n - 1)] == bag_songs) if n else np.zeros(0, bool)
        rows, counts = rows[known], counts[known]
        names = np.asarray(bag_words_, dtype=object)[known]
        vocabulary, codes = np.unique(names.astype(str), return_inverse=True) if len(names) else (np.array([]), [])
        self.vocabulary = {w: i for i, w in enumerate(vocabulary.tolist())}
        order = np.argsort(codes, kind="stable")
        self._post_rows, self._post_counts = rows[order], counts[order]
        self._post_start = np.searchsorted(np.asarray(codes)[order], np.arange(len(vocabulary) + 1))
        df = np.diff(self._post_start).astype(np.float64)
        self._idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
        length = np.bincount(rows, weights=counts, minlength=n).astype(np.float64)
        self._norm = BM25_K1 * (1 - BM25_B + BM25_B * length / max(length.mean() if n else 1.0, 1e-9))

    def words_score(self, query_words: Sequence[str]) -> np.ndarray:
        scores = np.zeros(len(self.songs))
        for word in dict.fromkeys(query_words):
            code = self.vocabulary.get(word)
            if code is None:
                continue
            lo, hi = self._post_start[code], self._post_start[code + 1]
            rows, tf = self._post_rows[lo:hi], self._post_counts[lo:hi]
            scores[rows] += self._idf[code] * tf * (BM25_K1 + 1) / (tf + self._norm[rows])
        return scores

    def shared_words(self, query_words: Sequence[str], position: int) -> list[str]:
        """The query's words that the song at `position` uses (postings are sorted by song within a word)."""
        found = []
        for word in query_words:
            code = self.vocabulary.get(word)
            if code is not None:
                rows = self._post_rows[self._post_start[code]:self._post_start[code + 1]]
                i = np.searchsorted(rows, position)
                if i < len(rows) and rows[i] == position:
                    found.append(word)
        return found

    def query(self, q: np.ndarray, text: str) -> LyricQuery:
        sims = self.passages.products(q)
        best = np.maximum.reduceat(sims, self.starts) if len(self.starts) else sims[:0]
        whole = (np.add.reduceat(sims, self.starts) if len(self.starts) else sims[:0]) * self._inverse_norms
        query_words = [w for w in bag_words(text) if w in self.vocabulary]
        lexical = self.words_score(query_words)
        line = max(_ramp(float(lexical.max()) if len(lexical) else 0.0, LINE_WORDS),
                   _ramp(float(best.max()) if len(best) else 0.0, LINE_BEST))
        first = _top(_z(whole) + _z(best), PRF_SONGS)
        topics = softmax(self.prototypes @ q, PROTOTYPE_TEMPERATURE) + self.topics[first].mean(axis=0)
        topics = topics / topics.sum()
        fit = self.topics @ topics
        relevance = W_BEST * best + W_WHOLE * whole + W_WORDS * lexical + (1 - line) * W_TOPIC * _z(fit)
        return LyricQuery(relevance=relevance, best=best, whole=whole, query_topics=topics, line=line,
                          words=list(dict.fromkeys(query_words)))


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest values (as a set: pseudo-relevance feedback only averages them)."""
    return np.argpartition(-values, n - 1)[:n] if n < len(values) else np.arange(len(values))


def _ramp(value: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return float(min(1.0, max(0.0, (value - lo) / (hi - lo))))


def calibrate(relevances: Sequence[np.ndarray]) -> dict:
    """Chance level of relevance: mean and std over query-like texts × every song (almost all unrelated)."""
    values = np.concatenate([np.asarray(r, dtype=np.float64) for r in relevances]) if relevances else np.zeros(1)
    mean, std = float(values.mean()), float(max(values.std(), 1e-6))
    return {"chance_mean": round(mean, 6), "chance_std": round(std, 6), "center_sigmas": CALIBRATION_SIGMAS,
            "center": round(mean + CALIBRATION_SIGMAS * std, 6), "width": round(std, 6),
            "rule": "pipeline/recommend.py"}


def calibrated(relevance: np.ndarray | float, calibration: Mapping[str, float]) -> np.ndarray:
    width = max(float(calibration["width"]), 1e-6)
    return _sigmoid((np.asarray(relevance, dtype=np.float64) - float(calibration["center"])) / width)


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


def lyric_reason(topic: str | None, song_keywords: str, shared_words: Sequence[str]) -> str:
    """A short 'why' for a lyric match: the shared topic, the words the query and song share, the song's keywords."""
    keywords = [w for w in (song_keywords or "").split(", ") if w]
    parts = []
    if topic:
        parts.append(f"theme: {topic}")
    if shared_words:
        parts.append("shared words: " + ", ".join(shared_words[:3]))
    rest = [w for w in keywords if w not in shared_words][: 3 if not shared_words else 2]
    if rest:
        parts.append("keywords: " + ", ".join(rest))
    return "; ".join(parts)
