"""Keeping resident memory down while models load (the whole app must fit in 3 GB on a free CPU Space).

Two things hold memory after a model has been converted (quantized, cast) and its original weights dropped:

* checkpoints are memory-mapped, and the pages of weights that were read once for conversion stay resident for
  as long as any other tensor keeps the mapping open — `release_file_pages` hands such pages back;
* glibc keeps freed heap memory for reuse instead of returning it — `trim` asks it to give it back, and
  `loading_allocations` keeps big temporary buffers (quantization works on whole matrices) out of the heap
  while models load, so the heap does not grow in the first place.

Both are no-ops where they do not apply (another OS, another libc, anonymous memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import mmap
import sys
from typing import Iterable

_MADV_DONTNEED = 4
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Freed memory a heap keeps for reuse before handing it back. Setting the mmap threshold pins glibc's trim threshold
# at its 128 kB default (no more dynamic adjustment), so every multi-MB temporary freed at the top of a heap was
# returned to the system and faulted in again on the next call: EnCodec's upsampling (10-20 MB activations per
# chunk) ran at 0.17 s per second of audio that way and 0.115 s with 64 MB kept (32 MB: no gain, 128 MB: none more).
KEEP_FREED_BYTES = 64 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings backed by a checkpoint file."""
    ranges = []
    try:
        with open("/proc/self/maps") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith((".safetensors", ".bin")):
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_file_pages(tensors: Iterable) -> int:
    """Drop the resident pages of tensors that are views into a memory-mapped checkpoint and will not be read
    again. Only whole pages inside a tensor are released, so neighbouring tensors are never touched; anonymous
    memory is left alone (releasing it would zero live data). Returns the bytes released."""
    libc = _libc()
    mappings = _file_mappings()
    if libc is None or not mappings:
        return 0
    page = mmap.PAGESIZE
    released = 0
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(low <= start and end <= high for low, high in mappings):
            continue
        first = (start + page - 1) // page * page
        last = end // page * page
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            released += last - first
    return released


def trim() -> None:
    """Collect garbage and return freed heap memory to the operating system."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def serving_allocations() -> None:
    """How the app allocates once its models are loaded: buffers up to 32 MB come from the heap, and up to
    `KEEP_FREED_BYTES` of freed heap stay with the process for the next request instead of being faulted in again
    (benchmarks call this too, to measure what the app does)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


class loading_allocations:
    """While models load, serve allocations above 128 kB from fresh mappings, returned to the system on free, so
    that conversion buffers do not grow the heap; afterwards, `serving_allocations`."""

    def __enter__(self):
        libc = _libc()
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        return self

    def __exit__(self, *exc):
        trim()  # what loading freed goes back first; only then is freed memory kept for reuse
        serving_allocations()
