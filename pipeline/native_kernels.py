"""The project's int4 matrix kernel (`kernels/int4_matmul.c`), compiled for this CPU on first use.

PyTorch's packed int4 CPU kernel dequantizes every weight to bf16 before multiplying, which makes a MusicGen
decode step compute-bound at about half the memory bandwidth. This kernel instead quantizes the (tiny) activation
to int8 and multiplies with VNNI integer dot products, streaming the 4-bit weights at close to full bandwidth.

It is built with the system C compiler (`cc -O3 -march=native`) into the cache folder, linked against PyTorch's
own OpenMP runtime so the two share one thread pool, and called through ctypes (which releases the GIL). Without
a compiler, or on a CPU with neither AVX-512 VNNI nor AVX2, `load_kernel` returns None and the decoder uses
PyTorch's kernel instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "int4_matmul.c"
GROUP = 32
SUPERBLOCK = 512
log = logging.getLogger(__name__)


class Int4Kernel:
    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._fn = library.i4_linear
        self._fn.restype = ctypes.c_int
        p, i = ctypes.c_void_p, ctypes.c_int
        self._fn.argtypes = [p, i, i, p, p, p, p, i]
        library.i4_isa.restype = ctypes.c_int
        self.isa = {2: "avx512-vnni", 1: "avx2", 0: "scalar"}[library.i4_isa()]

    def linear(self, x: torch.Tensor, packed: "PackedInt4") -> torch.Tensor:
        x = x.contiguous().float() if x.dtype != torch.float32 or not x.is_contiguous() else x
        m = x.shape[0]
        y = torch.empty(m, packed.out_features, dtype=torch.float32)
        status = self._fn(x.data_ptr(), m, packed.in_features, packed.weight.data_ptr(), packed.scale.data_ptr(),
                          packed.offset.data_ptr(), y.data_ptr(), packed.out_features)
        if status != 0:
            raise MemoryError("int4 kernel could not allocate scratch memory")
        return y


class PackedInt4:
    """A weight matrix in the kernel's layout; keeps the packed bytes, scales and offsets alive."""

    __slots__ = ("weight", "scale", "offset", "out_features", "in_features")

    def __init__(self, weight: torch.Tensor):
        n, k = weight.shape
        if k % SUPERBLOCK:
            raise ValueError(f"in_features {k} is not a multiple of {SUPERBLOCK}")
        groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        scale = ((high - low).clamp(min=1e-8) / 15).to(torch.float16)
        offset = low.to(torch.float16)
        q = torch.round((groups - offset.float()) / scale.float()).clamp(0, 15).to(torch.uint8)
        # (n, superblocks, lane, block, 4) → (n, superblocks, block, lane, 4): block b holds 4 weights per lane
        blocks = q.reshape(n, k // SUPERBLOCK, 16, 8, 4).permute(0, 1, 3, 2, 4).reshape(n, k // SUPERBLOCK, 8, 64)
        self.weight = (blocks[:, :, :4] | (blocks[:, :, 4:] << 4)).reshape(n, k // 2).contiguous()
        self.scale = scale.reshape(n, -1).contiguous()
        self.offset = offset.reshape(n, -1).contiguous()
        self.out_features, self.in_features = n, k

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix these bytes represent (tests compare the kernel against it)."""
        n, k = self.out_features, self.in_features
        packed = self.weight.reshape(n, k // SUPERBLOCK, 4, 64)
        blocks = torch.cat([packed & 15, packed >> 4], dim=2).reshape(n, k // SUPERBLOCK, 8, 16, 4)
        q = blocks.permute(0, 1, 3, 2, 4).reshape(n, k // GROUP, GROUP).float()
        return (q * self.scale.float()[..., None] + self.offset.float()[..., None]).reshape(n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.offset))


def _torch_openmp() -> Path | None:
    lib = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib.glob("libgomp*.so*")) + sorted(lib.glob("libiomp*.so*"))
    return candidates[0] if candidates else None


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def load_kernel(cache_dir: str) -> Int4Kernel | None:
    """Compile (once per source and CPU) and load the kernel; None when that is not possible here."""
    if os.environ.get("I2M_NATIVE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    openmp = _torch_openmp()
    if compiler is None or openmp is None or not SOURCE.is_file():
        log.info("int4 kernel unavailable (compiler=%s, openmp=%s)", compiler, openmp)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_signature().encode() + str(openmp).encode()).hexdigest()[:16]
    target = Path(cache_dir) / "kernels" / f"int4_matmul-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o",
                       str(built), f"-L{openmp.parent}", f"-Wl,-rpath,{openmp.parent}", f"-l:{openmp.name}", "-lm"]
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=120)
            except (subprocess.SubprocessError, OSError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                log.warning("int4 kernel did not compile: %s", detail.decode(errors="replace")[-400:] or exc)
                return None
            os.replace(built, target)
    try:
        kernel = Int4Kernel(ctypes.CDLL(str(target)), target)
    except OSError as exc:
        log.warning("int4 kernel did not load: %s", exc)
        return None
    if kernel.isa == "scalar":
        return None  # slower than PyTorch's own kernel
    return kernel
