"""The packed decoder weights, and the self-check's figures on them, kept on disk from one start to the next.

Packing MusicGen-small's decoder into 5-bit groups (the clip-ratio search, then the kernel's layout) takes ~2 s of
every start, and the fp32 side of the self-check (`selfcheck.probe`) ~1.2 s more. Both are functions of the
checkpoint's bytes, the code that packs and runs them and this CPU, so an entry is keyed by all of them: the
checkpoint files (resolved path, size, modification time: a Hub snapshot's files resolve to blobs named by their
content hash), the format, the sources of the packer, the decode loop, the self-check and the C kernel, the CPU's
flags and the torch version. Any change makes a new key; the old entry is never asked for again and is pruned.

An entry is a safetensors file of the packed tensors and a JSON record with the file's sha256. A file that does not
match its record (truncated, tampered with, half-written by a crash) is rebuilt, never loaded. The self-check's
figures are stored with the sha256 of the very bytes they were measured on, and judged again against the current
thresholds when they are reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FOLDER = "packed"
KEEP_ENTRIES = 2  # a bound on disk use: each entry of musicgen-small is ~200 MB
# the code whose output an entry holds: packing (native, quantize), which matrices are packed and in what order
# (lm), what the self-check measured (selfcheck) and the kernel
_HERE = Path(__file__).parent
SOURCES = (_HERE / "native.py", _HERE / "quantize.py", _HERE / "lm.py", _HERE / "selfcheck.py",
           _HERE / "kernels" / "lowbit_matmul.c")
_WEIGHT_FILES = (".safetensors", ".bin", ".json")


def checkpoint_identity(path: Path) -> list:
    """What names a checkpoint folder's contents without reading them: each weight or config file's resolved
    path, size and modification time."""
    out = []
    for file in sorted(Path(path).iterdir()):
        if file.suffix in _WEIGHT_FILES and file.is_file():
            real = file.resolve()
            stat = real.stat()
            out.append([file.name, str(real), stat.st_size, stat.st_mtime_ns])
    return out


class PackEntry:
    """One cache entry: `load()` the packed matrices (or None), `save()` them, and the self-check's figures."""

    def __init__(self, folder: Path, key: str, fmt: str):
        self.folder, self.key, self.format = Path(folder), key, fmt
        self.tensors = self.folder / f"{key}.safetensors"
        self.record = self.folder / f"{key}.json"
        self._sha256: str | None = None  # of the bytes this process loaded or wrote

    @classmethod
    def open(cls, cache_dir: str | Path | None, checkpoint: Path, fmt: str, kernel) -> "PackEntry | None":
        if cache_dir is None or kernel is None or not fmt.endswith("-native"):
            return None  # only the native kernel's packing is slow enough to keep
        from .native import cpu_signature  # the same CPU identity the kernel cache uses

        digest = hashlib.sha256()
        for source in SOURCES:
            digest.update(source.read_bytes())
        parts = {"checkpoint": checkpoint_identity(checkpoint), "format": fmt, "sources": digest.hexdigest(),
                 "cpu": cpu_signature(), "kernel": Path(kernel.path).name, "torch": torch.__version__}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
        return cls(Path(cache_dir) / FOLDER, key, fmt)

    def load(self, shapes: list[tuple[int, int]]) -> list | None:
        """The stored `PackedLowBit`s when the entry is whole and holds these (out, in) shapes, else None."""
        from safetensors.torch import load as load_bytes

        from .native import PackedLowBit

        try:
            record = json.loads(self.record.read_text())
            data = self.tensors.read_bytes()
        except (OSError, ValueError):
            return None
        checksum = hashlib.sha256(data).hexdigest()
        if record.get("sha256") != checksum or record.get("count") != len(shapes):
            log.warning("packed-weight cache entry %s does not match its record: rebuilding it", self.key)
            return None
        tensors = load_bytes(data)
        packs = [PackedLowBit.from_tensors({name: tensors[f"{i}.{name}"] for name in PackedLowBit.TENSORS
                                            if f"{i}.{name}" in tensors}) for i in range(len(shapes))]
        if [(p.out_features, p.in_features) for p in packs] != list(shapes):
            return None
        self._sha256 = checksum
        return packs

    def save(self, packs: list) -> None:
        """Write the entry atomically (a crash leaves the old one or none, never half a file under its name)."""
        from safetensors.torch import save

        data = save({f"{i}.{name}": tensor for i, pack in enumerate(packs)
                     for name, tensor in pack.to_tensors().items()})
        checksum = hashlib.sha256(data).hexdigest()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.tensors, data)
            _atomic_write(self.record, json.dumps({"sha256": checksum, "count": len(packs), "format": self.format,
                                                   "figures": None}).encode())
            self._sha256 = checksum
            self._prune()
        except OSError as exc:  # a read-only or full disk costs the next start ~3 s, nothing more
            log.warning("packed weights not cached: %s", exc)

    def recorded_figures(self) -> dict | None:
        """The figures on record, before any bytes are checked (whether reusing them is worth a try)."""
        try:
            return json.loads(self.record.read_text()).get("figures")
        except (OSError, ValueError, AttributeError):
            return None

    def figures(self) -> dict | None:
        """The self-check's figures measured on exactly the bytes this process loaded, or None."""
        try:
            record = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        if self._sha256 is None or record.get("sha256") != self._sha256:
            return None
        return record.get("figures")

    def save_figures(self, figures: dict) -> None:
        if self._sha256 is None:
            return
        try:
            record = json.loads(self.record.read_text())
            if record.get("sha256") == self._sha256:
                _atomic_write(self.record, json.dumps({**record, "figures": figures}).encode())
        except (OSError, ValueError) as exc:
            log.warning("self-check figures not cached: %s", exc)

    def _prune(self) -> None:
        entries = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP_ENTRIES:]:
            for path in (old, old.with_suffix(".json")):
                path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
