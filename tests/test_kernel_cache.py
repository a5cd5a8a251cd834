"""The compiled kernel is a shared library loaded into the app's process: a cached copy is only loaded when it is
byte-for-byte what this process built (its sha256 is recorded beside it)."""

import hashlib

import pytest

from pipeline.music import native


@pytest.fixture
def fresh_loader():
    native.load_kernel.cache_clear()
    yield native.load_kernel
    native.load_kernel.cache_clear()


def test_a_tampered_cached_library_is_rebuilt_not_loaded(tmp_path, fresh_loader):
    kernel = fresh_loader(str(tmp_path))
    if kernel is None:
        pytest.skip("no C compiler or no AVX2/AVX-512 VNNI on this machine")
    library = kernel.path
    recorded = library.with_name(library.name + ".sha256")
    good = library.read_bytes()
    assert recorded.read_text().strip() == hashlib.sha256(good).hexdigest()

    # someone else's bytes at the predictable path (a new file: the loaded one stays mapped in this process)
    library.unlink()
    library.write_bytes(good[:-64] + b"\0" * 64)
    native.load_kernel.cache_clear()
    again = fresh_loader(str(tmp_path))
    assert again is not None and again.path == library
    assert recorded.read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    assert library.read_bytes() != good[:-64] + b"\0" * 64


def test_a_library_without_its_recorded_hash_is_rebuilt(tmp_path, fresh_loader):
    kernel = fresh_loader(str(tmp_path))
    if kernel is None:
        pytest.skip("no native kernel here")
    recorded = kernel.path.with_name(kernel.path.name + ".sha256")
    recorded.unlink()
    kernel.path.unlink()
    kernel.path.write_bytes(b"not a library")
    native.load_kernel.cache_clear()
    again = fresh_loader(str(tmp_path))
    assert again is not None and recorded.is_file() and kernel.path.read_bytes()[:4] == b"\x7fELF"
