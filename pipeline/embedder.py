"""The sentence embedder shared by the lyric index build and lyric search (all-MiniLM-L6-v2 by default).

Vectors from a different embedder would silently mismatch the shipped catalog, so the index manifest stores a
fingerprint — the embeddings of fixed probe sentences — and `check_fingerprint` refuses a model that disagrees.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .runtime import build_model

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
    """A sentence-transformers model folder run on `transformers` directly when it is the usual stack (a
    Transformer, mean or CLS pooling, optionally L2 normalisation), which is what all-MiniLM-L6-v2 is:
    importing sentence_transformers (and the scikit-learn and SciPy it pulls in) took ~3 of the embedder's ~3.4 s
    at every start. Any other stack is handed to sentence_transformers itself. The fingerprint check against the
    index manifest is what guarantees both give the vectors the catalog was built with."""

    def __init__(self, path: Path, model_id: str, revision: str, device: str = "cpu"):
        self._lock = threading.Lock()  # the tokenizer is not safe to call from two threads at once
        stack = _plain_stack(Path(path))
        if stack is not None:
            self._model = _TransformerPooling(Path(path), device, **stack)
            dimension = self._model.dimension
        else:
            from sentence_transformers import SentenceTransformer

            self._model = build_model(SentenceTransformer, str(path), device=device)
            dimension = (self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension")
                         else self._model.get_sentence_embedding_dimension())
        self.info = EmbedderInfo(model_id=model_id, revision=revision, path=str(path), dimension=int(dimension))

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text."""
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def fingerprint(self) -> list[list[float]]:
        return [[round(float(v), 6) for v in row] for row in self.encode(PROBE_SENTENCES)]


def _plain_stack(path: Path) -> dict | None:
    """The settings of a Transformer → Pooling (mean or CLS) → [Normalize] folder, or None for anything else."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0]["path"]:
            return None
        config = json.loads((path / "sentence_bert_config.json").read_text())
        pooling = json.loads((path / modules[1]["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    if modes not in ({"pooling_mode_mean_tokens"}, {"pooling_mode_cls_token"}) or config.get("do_lower_case"):
        return None
    return {"max_length": int(config.get("max_seq_length") or 512), "mean": modes == {"pooling_mode_mean_tokens"},
            "normalize": len(kinds) == 3}


class _TransformerPooling:
    """What sentence_transformers computes for such a folder: token embeddings of the (truncated) text, pooled
    over its real tokens, normalised."""

    def __init__(self, path: Path, device: str, *, max_length: int, mean: bool, normalize: bool):
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._model = build_model(AutoModel.from_pretrained, str(path)).to(device).eval()
        self._device, self._max_length, self._mean, self._normalize = device, max_length, mean, normalize
        self.dimension = int(self._model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 64, normalize_embeddings: bool = True,
               show_progress_bar: bool = False, **_) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        texts = [str(text).strip() for text in texts]
        # longest first, as sentence_transformers batches: similar lengths pad less
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for start in tqdm(range(0, len(order), batch_size), desc="Batches", disable=not show_progress_bar):
            rows = order[start:start + batch_size]
            batch = self._tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                    max_length=self._max_length, return_tensors="pt").to(self._device)
            with torch.inference_mode():
                tokens = self._model(**batch).last_hidden_state
            if self._mean:
                mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            else:
                pooled = tokens[:, 0]
            if self._normalize or normalize_embeddings:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[rows] = pooled.float().cpu().numpy()
        return out


def encode_cached(embedder, texts: Sequence[str], cache_dir: Path, show_progress: bool = False) -> np.ndarray:
    """`embedder.encode(texts)`, each text's vector kept in `cache_dir` under the text's sha256, in one store per
    model and revision: the catalog build and the evaluation's baselines embed the same 45k passages, which takes
    many CPU minutes, and a rebuild that orders, adds or drops passages differently (a new source shifts every
    song's position) embeds only the texts it has not seen. A file of the older kind, one whole list of texts in
    order, is taken into the store when its list comes again."""
    cache_dir = Path(cache_dir)
    model = "\n".join([embedder.info.model_id, embedder.info.revision])
    store = cache_dir / f"texts-{hashlib.sha256(model.encode()).hexdigest()[:24]}.npz"
    keys = [hashlib.sha256(text.encode()).digest() for text in texts]
    known = _read_store(store, embedder.info.dimension)
    fresh: dict[bytes, np.ndarray] = {}
    legacy = cache_dir / f"{hashlib.sha256(chr(10).join([model, *texts]).encode()).hexdigest()[:24]}.npy"
    if any(key not in known for key in keys) and legacy.is_file():
        vectors = np.load(legacy, allow_pickle=False)
        if vectors.shape == (len(texts), embedder.info.dimension):
            fresh.update(zip(keys, vectors))
    missing = list({key: text for key, text in zip(keys, texts) if key not in known and key not in fresh}.items())
    if missing:
        vectors = embedder.encode([text for _, text in missing], show_progress=show_progress)
        fresh.update(zip((key for key, _ in missing), vectors))
    if fresh:
        known.update(fresh)
        _write_store(store, known)
    return np.ascontiguousarray(np.stack([known[key] for key in keys]) if keys else
                                np.zeros((0, embedder.info.dimension)), dtype=np.float32)


def _read_store(path: Path, dimension: int) -> dict[bytes, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        digests, vectors = data["digests"], data["vectors"]
    if vectors.ndim != 2 or vectors.shape[1] != dimension or len(digests) != len(vectors):
        return {}
    return {bytes(digest): vector for digest, vector in zip(digests, vectors)}


def _write_store(path: Path, vectors: dict[bytes, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    with open(partial, "wb") as handle:
        np.savez(handle, digests=np.frombuffer(b"".join(vectors), dtype=np.uint8).reshape(-1, 32),
                 vectors=np.stack(list(vectors.values())).astype(np.float32))
    partial.replace(path)


def fingerprint_matches(expected: Sequence[Sequence[float]], actual: Sequence[Sequence[float]]) -> tuple[bool, float]:
    a = np.asarray(expected, dtype=np.float64)
    b = np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape:
        return False, 0.0
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    worst = float(cos.min())
    return worst >= FINGERPRINT_MIN_COSINE, worst
