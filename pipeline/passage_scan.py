"""A query's inner product with every stored lyric passage: exactly, reading a quarter of the bytes.

The lyric rule scores every song (no candidate cut, so nothing is lost to an approximate search), so each search
reads every passage. Decoded to fp32 that is 4 bytes a number, 69 MB for the shipped 45k passages and 154 MB at
100k, and one core streams it at about 10 GB/s: 7 and 15 ms, the largest part of a lyric search after the
embedding.

The index stores each number in 8 bits (faiss `QT_8bit`: `x = vmin + (code + 0.5)·vdiff/255` per dimension), so

    q·x = Σ q·(vmin + 128.5·step)  +  Σ (code − 128)·(q·step),      step = vdiff/255

a constant plus the product of the signed codes with one weight per dimension. The weights are written as a
fixed-point integer of four 7-bit digits and the codes are multiplied by the digits as int8 × int8 → int32
(`torch._int_mm`, oneDNN's VNNI kernel, on torch's own threads: the ones that just embedded the query). Every
product and sum is an exact integer; the one rounding is the weights' to 26 bits of the largest, so the result is
closer to the float64 product than an fp32 scan's (tests/test_passage_scan.py). README, Performance, has the
timings.

An index stored another way (fp32, or an older build's inverted file) is scanned from its decoded fp32 vectors,
and so are the codes where this torch's int8 product fails the check below: the same numbers, within fp32
rounding.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from . import vector_index

log = logging.getLogger(__name__)

DIGIT_BITS = 7  # digits in [-64, 63], not the full int8 range: more room for a kernel without VNNI, which adds
# product pairs in saturating int16 (whether that is enough is what `int8_products_exact` checks)
DIGITS = 4
WEIGHT_BITS = 26  # the largest weight's magnitude in fixed point: four 7-bit digits hold up to about 2^27


class PassageScan(Protocol):
    rows: int
    dim: int

    def products(self, q: np.ndarray) -> np.ndarray:
        """float64 [rows]: q · every passage, in stored order."""

    def group_sums(self, starts: np.ndarray) -> np.ndarray:
        """float64 [groups, dim]: the sum of the passages of each run starting at `starts`."""


class DecodedScan:
    """Passages held as fp32 vectors (a catalog being built, an index not stored in 8 bits)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows, self.dim = self.vectors.shape

    def products(self, q: np.ndarray) -> np.ndarray:
        with _one_blas_thread():
            return (self.vectors @ np.asarray(q, dtype=np.float32)).astype(np.float64)

    def group_sums(self, starts: np.ndarray) -> np.ndarray:
        # the same additions in the same order as np.add.at, twice as fast
        return np.add.reduceat(self.vectors, starts, axis=0, dtype=np.float64)


class CodeScan:
    """Passages held as their 8-bit codes, scanned by exact integer products. torch is imported at the first scan,
    not at load, and a torch whose int8 product is not exact here scans the codes decoded instead."""

    def __init__(self, codes: np.ndarray, vmin: np.ndarray, vdiff: np.ndarray):
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.rows, self.dim = codes.shape
        self.step = np.asarray(vdiff, dtype=np.float64) / 255.0
        self.offset = np.asarray(vmin, dtype=np.float64) + 128.5 * self.step
        self.codes = (codes ^ 0x80).view(np.int8)  # code − 128, in two's complement
        self._decoded: DecodedScan | None = None

    def products(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        if not int8_products_exact():
            if self._decoded is None:
                self._decoded = DecodedScan((self.offset + self.codes * self.step).astype(np.float32))
            return self._decoded.products(q)
        import torch

        digits, scale = fixed_point(q * self.step)
        # codes.T [dim, rows]: oneDNN reads the row-major codes in place
        partial = torch._int_mm(torch.from_numpy(digits), torch.from_numpy(self.codes).T).numpy().astype(np.int64)
        # Σ_j 128^j · partial_j: at most 384·128·64·128^3 ≈ 2^43 for 384 dimensions, exact in int64
        total = partial[DIGITS - 1]
        for j in range(DIGITS - 2, -1, -1):
            total = total * (1 << DIGIT_BITS) + partial[j]
        return float(q @ self.offset) + total / scale

    def group_sums(self, starts: np.ndarray) -> np.ndarray:
        counts = np.diff(np.append(starts, self.rows)).astype(np.float64)
        code_sums = np.add.reduceat(self.codes, starts, axis=0, dtype=np.int64)
        return counts[:, None] * self.offset + code_sums * self.step


def fixed_point(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """`weights` ≈ Σ_j 128^j · digits[j] / scale, digits int8 in [-64, 63] (balanced base 128)."""
    top = float(np.abs(weights).max()) if len(weights) else 0.0
    scale = 2.0 ** (WEIGHT_BITS - np.ceil(np.log2(top))) if top > 0 else 1.0
    value = np.rint(weights * scale).astype(np.int64)
    base, half = 1 << DIGIT_BITS, 1 << (DIGIT_BITS - 1)
    digits = np.empty((DIGITS, len(weights)), dtype=np.int8)
    for j in range(DIGITS):
        digit = (value + half) % base - half
        digits[j] = digit
        value = (value - digit) // base
    return digits, scale


def from_index(index) -> PassageScan:
    """The scan of a stored passage index: by its codes where it holds 8-bit codes, else by its decoded vectors."""
    stored = vector_index.sq8_codes(index)
    if stored is not None and stored[0].shape[1]:
        return CodeScan(*stored)
    return DecodedScan(vector_index.all_vectors(index) if index.ntotal else np.zeros((0, index.d), np.float32))


_EXACT: bool | None = None


def int8_products_exact() -> bool:
    """Whether this torch multiplies the extreme codes and digits exactly; checked once per process. oneDNN's
    kernels without VNNI (AVX2, AVX-512 before Cascade Lake) add product pairs in saturating int16 with the digits
    on the unsigned side and fail it; so would a torch without `_int_mm` on CPU. Swapping the operands is exact
    there, but slower than the fp32 scan on AVX2."""
    global _EXACT
    if _EXACT is None:
        try:
            import torch

            rng = np.random.default_rng(0)
            codes = rng.choice(np.array([-128, -127, 0, 126, 127], dtype=np.int8), size=(67, 384))
            codes[:4] = np.array([[-128], [127], [-128], [127]], dtype=np.int8)
            digits = rng.choice(np.array([-64, -63, 0, 62, 63], dtype=np.int8), size=(DIGITS, 384))
            digits[0], digits[1] = -64, 63
            got = torch._int_mm(torch.from_numpy(digits), torch.from_numpy(codes).T).numpy()
            _EXACT = bool(np.array_equal(got, digits.astype(np.int64) @ codes.T.astype(np.int64)))
        except (RuntimeError, AttributeError, NotImplementedError) as error:
            log.warning("int8 matrix product unavailable (%s); lyric passages are scanned in fp32", error)
            _EXACT = False
        else:
            if not _EXACT:
                log.warning("int8 matrix product is not exact on this CPU; lyric passages are scanned in fp32")
    return _EXACT


_BLAS = None


def _one_blas_thread():
    """One query's matrix-vector product on the calling thread alone. Right after the query is embedded, the
    model's OpenMP team still spins on both cores; a second (BLAS) team fighting it made a 5-ms scan take 20–100 ms
    on 2 cores (lyric search p50 29–35 ms, p95 90–120 ms; with one BLAS thread 21 / 22 ms). The integer scan runs
    on that same torch team instead, so it has no such fight."""
    global _BLAS
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")
