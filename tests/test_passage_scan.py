"""The lyric passage scan: the integer product over 8-bit codes gives the stored vectors' inner products (to float64
accuracy, finer than an fp32 scan), and any index it cannot read that way is scanned from its decoded vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import passage_scan, recommend, vector_index


def _sq8(vectors: np.ndarray):
    index = vector_index.build(vectors, "ip", storage="sq8")
    codes, vmin, vdiff = vector_index.sq8_codes(index)
    decoded = vmin.astype(np.float64) + (codes + 0.5) * (vdiff.astype(np.float64) / 255)
    return index, decoded


def _unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_codes_decode_as_faiss_decodes_them():
    index, decoded = _sq8(_unit(np.random.default_rng(0), 500, 384))
    assert np.abs(vector_index.all_vectors(index) - decoded).max() < 1e-7


@pytest.mark.parametrize("d", [384, 40])
def test_integer_scan_equals_the_stored_vectors_products(d):
    rng = np.random.default_rng(1)
    index, decoded = _sq8(_unit(rng, 3000, d))
    scan = passage_scan.from_index(index)
    assert isinstance(scan, passage_scan.CodeScan)
    fp32 = passage_scan.DecodedScan(vector_index.all_vectors(index))
    for q in _unit(rng, 5, d).astype(np.float64):
        truth = decoded @ q
        got = scan.products(q)
        assert got.dtype == np.float64 and got.shape == (3000,)
        error = np.abs(got - truth).max()
        assert error < 2e-8
        assert error < np.abs(fp32.products(q) - truth).max()  # finer than the fp32 scan it replaces


def test_extreme_codes_and_weights_stay_exact():
    """Codes at both ends (0 and 255, signed −128 and 127) against weights whose digits are all at their ends."""
    rng = np.random.default_rng(2)
    d = 384
    codes = rng.choice(np.array([0, 1, 254, 255], dtype=np.uint8), size=(200, d))
    codes[0], codes[1] = 0, 255
    vmin, vdiff = rng.uniform(-1, 0, d), rng.uniform(0.5, 2, d)
    scan = passage_scan.CodeScan(codes, vmin, vdiff)
    decoded = vmin + (codes + 0.5) * (vdiff / 255)
    for q in (np.full(d, 1.0), np.full(d, -1.0), rng.choice([-1.0, 1.0], d), rng.standard_normal(d) * 1e-6):
        truth = decoded @ q
        # the one rounding: each weight q·vdiff/255 to 1 part in 2^25 of the largest, times |code − 128| ≤ 128
        bound = d * 128 * 0.5 * np.abs(q * vdiff / 255).max() / 2 ** 25
        assert np.abs(scan.products(q) - truth).max() <= bound + 1e-12 * np.abs(truth).max()


def test_digits_write_the_weights_in_fixed_point():
    rng = np.random.default_rng(3)
    for weights in (rng.standard_normal(384) * 1e-4, np.array([1.0, -1.0, 0.5, 0.0]), np.zeros(5)):
        digits, scale = passage_scan.fixed_point(weights)
        assert digits.dtype == np.int8 and digits.min() >= -64 and digits.max() <= 63
        value = sum(digits[j].astype(np.int64) * 128 ** j for j in range(passage_scan.DIGITS))
        assert np.abs(value / scale - weights).max() <= 0.5 / scale


def test_group_sums_are_the_sums_of_the_stored_vectors():
    rng = np.random.default_rng(4)
    index, decoded = _sq8(_unit(rng, 1000, 64))
    starts = np.array([0, 1, 7, 500, 999])
    truth = np.add.reduceat(decoded, starts, axis=0)
    assert np.abs(passage_scan.from_index(index).group_sums(starts) - truth).max() < 1e-9
    assert np.abs(passage_scan.DecodedScan(vector_index.all_vectors(index)).group_sums(starts) - truth).max() < 1e-5


def test_other_indexes_are_scanned_from_their_decoded_vectors():
    rng = np.random.default_rng(5)
    vectors = _unit(rng, 2000, 32)
    q = _unit(rng, 1, 32)[0]
    flat = vector_index.build(vectors, "ip")
    ivf = vector_index.build(vectors, "ip", storage="sq8", exact_limit=100)
    assert vector_index.sq8_codes(flat) is None and vector_index.sq8_codes(ivf) is None
    for index in (flat, ivf):
        scan = passage_scan.from_index(index)
        assert isinstance(scan, passage_scan.DecodedScan)
        assert np.allclose(scan.products(q), vector_index.all_vectors(index) @ q, atol=1e-6)


def test_a_torch_without_exact_int8_products_scans_the_decoded_codes(monkeypatch):
    import torch

    monkeypatch.setattr(passage_scan, "int8_products_exact", lambda: False)
    monkeypatch.setattr(torch, "_int_mm", None)  # would raise if it were still called
    index, decoded = _sq8(_unit(np.random.default_rng(6), 300, 48))
    scan = passage_scan.from_index(index)
    q = np.ones(48) / np.sqrt(48)
    assert np.abs(scan.products(q) - decoded @ q).max() < 1e-6


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif(not _cpu_flags() & {"avx512_vnni", "avx_vnni"}, reason="this CPU has no VNNI")
def test_a_cpu_with_vnni_multiplies_int8_exactly():
    # the fast path is what the app runs on such a CPU; a silent fall back would hide a slower search
    assert passage_scan.int8_products_exact()


def test_passages_stay_flat_at_any_size(monkeypatch):
    monkeypatch.setattr(vector_index, "EXACT_SCAN", 1000)
    vectors = _unit(np.random.default_rng(7), 1200, 16)
    assert not vector_index.is_exact(vector_index.build(vectors, "ip", storage="sq8"))
    flat = vector_index.build(vectors, "ip", storage="sq8", exact_limit=None)
    assert vector_index.is_exact(flat) and vector_index.sq8_codes(flat) is not None


def test_the_lyric_rule_gives_the_same_ranking_from_codes_and_from_decoded_vectors():
    rng = np.random.default_rng(8)
    songs = np.sort(rng.integers(0, 300, 1500))
    index, _ = _sq8(_unit(rng, 1500, 64))
    bags = (np.arange(300), ["word"] * 300, np.ones(300))
    topics, prototypes = rng.uniform(0, 1, (300, 3)), _unit(rng, 3, 64)
    by_codes = recommend.LyricScorer(passage_scan.from_index(index), songs, *bags, topics, prototypes)
    by_vectors = recommend.LyricScorer(vector_index.all_vectors(index), songs, *bags, topics, prototypes)
    for q in _unit(rng, 4, 64):
        a, b = by_codes.query(q, "word"), by_vectors.query(q, "word")
        assert np.abs(a.relevance - b.relevance).max() < 1e-5
        assert np.abs(a.whole - b.whole).max() < 1e-6 and np.abs(a.best - b.best).max() < 1e-6
        assert np.argsort(-a.relevance, kind="stable")[:10].tolist() == \
            np.argsort(-b.relevance, kind="stable")[:10].tolist()


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_the_check_refuses_int8_kernels_that_saturate_and_the_scan_stays_right(isa):
    """oneDNN's int8 kernels without VNNI add product pairs in saturating int16: limited to them (its documented
    ONEDNN_MAX_CPU_ISA switch, as on a CPU without VNNI), the check must say no, and the scan must still give the
    stored vectors' products."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np
from pipeline import passage_scan, vector_index
rng = np.random.default_rng(0)
x = rng.standard_normal((500, 384)).astype(np.float32)
index = vector_index.build(x / np.linalg.norm(x, axis=1, keepdims=True), "ip", storage="sq8")
codes, vmin, vdiff = vector_index.sq8_codes(index)
decoded = vmin.astype(np.float64) + (codes + 0.5) * (vdiff.astype(np.float64) / 255)
q = rng.standard_normal(384)
error = np.abs(passage_scan.from_index(index).products(q) - decoded @ q).max()
print(passage_scan.int8_products_exact(), error < 1e-5)
"""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
