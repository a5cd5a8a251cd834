"""The sentence embedder shared by the lyric index build and lyric search (all-MiniLM-L6-v2 by default).

Vectors from a different embedder would silently mismatch the shipped catalog, so the index manifest stores a
fingerprint — the embeddings of fixed probe sentences — and `check_fingerprint` refuses a model that disagrees.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

PROBE_SENTENCES = (
    "I miss you every night since you went away",
    "dancing all night long under the city lights",
    "a quiet morning by the lake with the birds",
)
FINGERPRINT_MIN_COSINE = 0.999


@dataclass(frozen=True)
class EmbedderInfo:
    model_id: str
    revision: str
    path: str
    dimension: int


class SentenceEmbedder:
    def __init__(self, path: Path, model_id: str, revision: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(path), device=device)
        self._lock = threading.Lock()  # the tokenizer is not safe to call from two threads at once
        self.info = EmbedderInfo(model_id=model_id, revision=revision, path=str(path),
                                 dimension=int(self._model.get_embedding_dimension()
                                               if hasattr(self._model, "get_embedding_dimension")
                                               else self._model.get_sentence_embedding_dimension()))

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text."""
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def fingerprint(self) -> list[list[float]]:
        return [[round(float(v), 6) for v in row] for row in self.encode(PROBE_SENTENCES)]


def encode_cached(embedder, texts: Sequence[str], cache_dir: Path, show_progress: bool = False) -> np.ndarray:
    """`embedder.encode(texts)`, kept in `cache_dir` under a digest of the model, its revision and every text: the
    catalog build and the evaluation's baselines embed the same 45k passages, which takes many CPU minutes."""
    digest = hashlib.sha256("\n".join([embedder.info.model_id, embedder.info.revision, *texts]).encode())
    path = Path(cache_dir) / f"{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape == (len(texts), embedder.info.dimension):
            return vectors
    vectors = embedder.encode(texts, show_progress=show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, vectors, allow_pickle=False)
    partial.replace(path)
    return vectors


def fingerprint_matches(expected: Sequence[Sequence[float]], actual: Sequence[Sequence[float]]) -> tuple[bool, float]:
    a = np.asarray(expected, dtype=np.float64)
    b = np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape:
        return False, 0.0
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    worst = float(cos.min())
    return worst >= FINGERPRINT_MIN_COSINE, worst
