"""The allocator settings the app serves with (pipeline/memory.py), checked in a fresh process each."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a 24 MB buffer (below the 32 MB mmap threshold, so it comes from the heap) touched, freed, then the resident size
PROBE = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
from pipeline import memory
{setup}
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
buffer = np.ones(24 * 1024 * 1024 // 8)
held = rss()
del buffer
print(held - rss())
"""


def _returned_bytes(setup: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), setup=setup)], capture_output=True,
                            text=True, timeout=120, check=True)
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_serving_keeps_freed_buffers_for_the_next_request():
    # pinning only the mmap threshold (what loading used to leave behind) hands a freed top-of-heap buffer back at
    # once, so the next request faults it in again
    pinned = _returned_bytes("import ctypes\nctypes.CDLL('libc.so.6').mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD")
    assert pinned > 16 * 1024 * 1024, pinned
    with_loading = _returned_bytes("with memory.loading_allocations():\n    pass")
    assert with_loading < 4 * 1024 * 1024, with_loading
