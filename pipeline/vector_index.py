"""FAISS indexes chosen by catalog size: exact while a full scan is cheap, IVF beyond.

Exact search is used up to `EXACT_LIMIT` vectors and `EXACT_SCAN` stored numbers (vectors × dimensions): the
shipped catalog's 115k feature vectors are scanned in a millisecond or two, so approximation would buy nothing.
At the DYLUMO scale (1.2 million tracks) an inverted-file index with `nlist ≈ 4·sqrt(n)` lists is trained on a
fixed-seed sample and probed with `nprobe` lists, chosen so that recall@10 against exact search stays ≥ 0.95
(`scripts/bench.py catalog` measures it). Lyric passages stay flat at any size: the lyric rule scores every one
(`pipeline.passage_scan`), so an inverted file would only cost its lists.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

EXACT_LIMIT = 200_000
EXACT_SCAN = 20_000_000
DEFAULT_NPROBE = {"l2": 24, "ip": 128}


def _faiss():
    import faiss  # deferred: importing faiss costs ~0.2 s and the UI process never needs it

    return faiss


def build(vectors: np.ndarray, metric: str, *, storage: str = "fp32", exact_limit: int | None = EXACT_LIMIT,
          seed: int = 1234, nprobe: int | None = None):
    """Index `vectors` (row i gets id i) for L2 (`metric="l2"`) or inner-product (`"ip"`) search.

    `storage`: `fp32` (exact), `fp16` (half the bytes) or `sq8` (a quarter: 8 bits per dimension between the
    trained per-dimension min and max; on the shipped lyric passages recall@10 against fp32 is 0.99).
    `exact_limit=None`: flat at any size, for vectors that are always scanned in full (lyric passages).
    """
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    codes = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}.get(storage)
    if exact_limit is None or (n <= exact_limit and n * d <= EXACT_SCAN):
        if codes is not None:
            index = faiss.IndexScalarQuantizer(d, codes, faiss_metric)
            index.train(vectors if n else np.zeros((1, d), dtype=np.float32))
        else:
            index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index.add(vectors)
        return index
    nlist = int(4 * math.sqrt(n))
    quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    if codes is not None:
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, codes, faiss_metric)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
    index.cp.seed = seed
    index.train(sample)
    index.add(vectors)
    index.nprobe = nprobe or DEFAULT_NPROBE[metric]
    return index


def is_exact(index) -> bool:
    return not hasattr(index, "nprobe") and not hasattr(index, "hnsw")


def all_vectors(index) -> np.ndarray:
    """Every stored vector, row i first (an inverted-file index needs its direct map for this, built here)."""
    if hasattr(index, "make_direct_map"):
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def sq8_codes(index) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A flat 8-bit index's codes [n, d] (uint8) and per-dimension `vmin`, `vdiff`, where each stored number
    decodes as `vmin + (code + 0.5)·vdiff/255`; None for any other index."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexScalarQuantizer) or index.sq.qtype != faiss.ScalarQuantizer.QT_8bit:
        return None
    trained = faiss.vector_to_array(index.sq.trained)
    codes = faiss.vector_to_array(index.codes).reshape(index.ntotal, index.code_size)
    return codes, trained[: index.d], trained[index.d:]


def save(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


def load(path: Path, nprobe: int | None = None):
    faiss = _faiss()
    index = faiss.read_index(str(path))
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "make_direct_map"):
        # an inverted-file index reconstructs a row (a partial query's re-ranking, a fused list's score) only
        # through its direct map, 8 bytes a row; without it those raise
        index.make_direct_map()
    return index


def search(index, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
           probe_factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows; with `allowed` (a mask over rows), the k nearest among the allowed rows (fewer when
    fewer are allowed, or, on an inverted-file index, when the probed lists hold fewer; missing places have row
    -1). The mask is checked inside the scan. An inverted-file index probes `probe_factor` times its lists."""
    faiss = _faiss()
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    params = selector = None
    if allowed is not None:
        bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")  # kept alive through the search
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    if hasattr(index, "nprobe"):
        if selector is not None or probe_factor != 1:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(index.nlist, index.nprobe * probe_factor))
    elif selector is not None:
        params = faiss.SearchParameters(sel=selector)
    # One query runs on the calling thread alone: an OpenMP team for a millisecond of work waits on any thread
    # the OS has given to someone else (the music decoder, another process), which made a 0.5 ms flat search
    # take 16 ms on a busy 2-core machine. The setting is the calling thread's, and faiss has its own OpenMP.
    threads = faiss.omp_get_max_threads()
    if len(queries) == 1:
        faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)
