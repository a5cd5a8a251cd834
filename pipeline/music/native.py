"""The project's low-bit matrix kernel (`kernels/lowbit_matmul.c`), compiled for this CPU on first use.

PyTorch's packed int4 CPU kernel dequantizes every weight to bf16 before multiplying, which makes a MusicGen
decode step compute-bound at about half the memory bandwidth. This kernel instead quantizes the (tiny) activation
to int8 and multiplies with VNNI integer dot products, streaming 4- or 5-bit weights at close to full bandwidth.
Weights are quantized per group of 32 with an fp16 scale and offset, each group's range chosen among a few clip
ratios to minimise the squared error.

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

import numpy as np
import torch

SOURCE = Path(__file__).with_name("kernels") / "lowbit_matmul.c"
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
GROUP = 32
SUPERBLOCK = 512
# The six packed matrices of one decoder layer, in the order of `layer_t.weights[]` in kernels/lowbit_matmul.c
# (its comment on mg_layer names them the same way); the decode loop packs them under these names.
LAYER_MATRICES = ("qkv", "out", "cross_q", "cross_out", "fc1", "fc2")
MAX_HEAD_DIM = 256  # mg_layer quantizes one key per head into a stack buffer of this many bytes
KEY_BLOCK = 16  # positions per block of the key cache (KB in the C source)
log = logging.getLogger(__name__)


class _Packed(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("hb", ctypes.c_void_p), ("d", ctypes.c_void_p), ("mn", ctypes.c_void_p)]


class _LayerTable(ctypes.Structure):
    """Mirror of `layer_t` in the C source: one layer's packed matrices and layer norms."""

    _fields_ = [("weights", _Packed * 6), ("norms", ctypes.c_void_p * 6)]


class _Cache(ctypes.Structure):
    """Mirror of `cache_t`: one row's KV cache for one layer."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("ks", ctypes.c_void_p), ("vs", ctypes.c_void_p)]


class _Cross(ctypes.Structure):
    """Mirror of `cross_t`: a text's cross-attention keys and values for one layer."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p)]


class LowBitKernel:
    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._fn = library.i4_linear
        self._fn.restype = ctypes.c_int
        p, i = ctypes.c_void_p, ctypes.c_int
        self._fn.argtypes = [p, i, i, p, p, p, p, p, i, i]
        self._layers = library.mg_layers
        self._layers.restype = ctypes.c_int
        self._layers.argtypes = [p, i, i, i, i, p, i, ctypes.c_float, p, p, p, p, p, p, i]
        self.threads = 0  # 0: OpenMP's default (PyTorch's thread count)
        library.i4_isa.restype = ctypes.c_int
        self.isa = {2: "avx512-vnni", 1: "avx2", 0: "scalar"}[library.i4_isa()]
        self._quantize = library.quantize_groups
        self._quantize.restype = ctypes.c_int
        self._quantize.argtypes = [p, ctypes.c_long, i, p, i, p, p, p, i]
        self._slices = library.fifth_bit_slices
        self._slices.restype = None
        self._slices.argtypes = [p, p, ctypes.c_long, i]

    def high_bits(self, packed: "PackedLowBit") -> int | None:
        """Where this kernel reads a matrix's fifth bits: the planes themselves, or on AVX2 their slices (the same
        bits grouped for shifts instead of masked moves), made once per matrix and kept beside the planes."""
        if packed.high_bits is None:
            return None
        if self.isa != "avx2":
            return packed.high_bits.data_ptr()
        if packed.high_bit_slices is None:
            slices = torch.empty_like(packed.high_bits)
            self._slices(packed.high_bits.data_ptr(), slices.data_ptr(), packed.high_bits.numel() // 64, self.threads)
            packed.high_bit_slices = slices
        return packed.high_bit_slices.data_ptr()

    def quantize_groups(self, groups: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`quantize_groups` in C: (rows, groups, 32) fp32 → codes (uint8), fp16 scales and offsets, (rows,
        groups, 1) each for the last two. The same clip-ratio search and arithmetic, a group at a time."""
        groups = groups.detach().float().contiguous()
        q = torch.empty(groups.shape, dtype=torch.uint8)
        scale = torch.empty(groups.shape[:-1] + (1,), dtype=torch.float16)
        offset = torch.empty_like(scale)
        ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32)
        self._quantize(groups.data_ptr(), groups.numel() // GROUP, levels, ratios.data_ptr(), len(CLIP_RATIOS),
                       q.data_ptr(), scale.data_ptr(), offset.data_ptr(), self.threads)
        return q, scale, offset

    def linear(self, x: torch.Tensor, packed: "PackedLowBit") -> torch.Tensor:
        x = x.contiguous().float() if x.dtype != torch.float32 or not x.is_contiguous() else x
        m = x.shape[0]
        y = torch.empty(m, packed.out_features, dtype=torch.float32)
        status = self._fn(x.data_ptr(), m, packed.in_features, packed.weight.data_ptr(), self.high_bits(packed),
                          packed.scale.data_ptr(), packed.offset.data_ptr(), y.data_ptr(), packed.out_features,
                          self.threads)
        if status != 0:
            raise MemoryError("low-bit kernel could not allocate scratch memory")
        return y


class FusedLayer:
    """One MusicGen decoder layer for the C path: six packed matrices and three layer norms, kept alive here,
    with the pointer table the C side reads built once."""

    def __init__(self, kernel: LowBitKernel, matrices: list["PackedLowBit"], norms: list[torch.Tensor], eps: float,
                 heads: int):
        if len(matrices) != len(LAYER_MATRICES):
            raise ValueError(f"a fused layer takes {len(LAYER_MATRICES)} matrices: {', '.join(LAYER_MATRICES)}")
        head_dim = matrices[1].out_features // heads
        if head_dim > MAX_HEAD_DIM or head_dim % 4:
            raise ValueError(f"the fused layer handles heads of at most {MAX_HEAD_DIM} dimensions, a multiple of 4 "
                             "(the key cache holds 4 dimensions per position side by side)")
        self.matrices = matrices
        self.norms = [n.detach().float().contiguous() for n in norms]
        self.eps = float(eps)
        self.heads = heads
        self.hidden = matrices[1].out_features
        self.ffn = matrices[4].out_features
        self.table = _LayerTable(
            (_Packed * 6)(*[_Packed(m.weight.data_ptr(), kernel.high_bits(m), m.scale.data_ptr(), m.offset.data_ptr())
                            for m in matrices]),
            (ctypes.c_void_p * 6)(*[n.data_ptr() for n in self.norms]))


class RowCache:
    """One row's KV cache in every layer, for the C path: keys in blocks of 16 positions, (H, Tpad/16, Dh/4, 16, 4)
    uint8 (k + 128, the layout `attend_cache` in the C source reads with one VNNI instruction per 16 positions and
    4 dimensions), values (H, T, Dh) int8, fp32 scales (H, Tpad) for keys and (H, T) for values; Tpad is T rounded
    up to 16."""

    def __init__(self, layers: int, heads: int, length: int, head_dim: int):
        self.length = length
        padded = -(-length // KEY_BLOCK) * KEY_BLOCK
        self.tensors = [(torch.zeros(heads, padded * head_dim, dtype=torch.uint8),
                         torch.zeros(heads, length, head_dim, dtype=torch.int8),
                         torch.zeros(heads, padded), torch.zeros(heads, length)) for _ in range(layers)]
        self.table = (_Cache * layers)(*[_Cache(*(t.data_ptr() for t in cache)) for cache in self.tensors])


class TextKV:
    """A text's cross-attention keys and values in every layer, (H, T, Dh) fp32, and its valid-token mask."""

    def __init__(self, keys_values: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor):
        self.tensors = [(k.float().contiguous(), v.float().contiguous()) for k, v in keys_values]
        self.valid = valid.reshape(-1).to(torch.uint8).contiguous()
        self.length = self.tensors[0][0].shape[1]
        self.table = (_Cross * len(self.tensors))(*[_Cross(k.data_ptr(), v.data_ptr()) for k, v in self.tensors])


class FusedStack:
    """All decoder layers of the model, run as one C call per step over rows that each bring their own cache,
    position and text (or none)."""

    def __init__(self, kernel: "LowBitKernel", layers: list[FusedLayer]):
        self.kernel = kernel
        self._layers = layers
        self._table = (_LayerTable * len(layers))(*[layer.table for layer in layers])
        first = layers[0]
        self.shape = (first.hidden, first.heads, first.ffn, first.eps)

    def with_kernel(self, kernel: "LowBitKernel") -> "FusedStack":
        """The same layers run by another build of the kernel, which may read the fifth bits in its own layout."""
        return FusedStack(kernel, [FusedLayer(kernel, layer.matrices, layer.norms, layer.eps, layer.heads)
                                   for layer in self._layers])

    def __call__(self, x: torch.Tensor, caches: list[RowCache], positions: list[int],
                 texts: list["TextKV | None"]) -> None:
        hidden, heads, ffn, eps = self.shape
        b = x.shape[0]
        if not len(caches) == len(positions) == len(texts) == b:
            raise ValueError("one cache, position and text (or None) per row")
        for cache, position in zip(caches, positions):
            if not 0 <= position < cache.length:
                raise ValueError(f"position {position} is outside a cache of {cache.length}")
        pointer = ctypes.c_void_p
        cache_ptrs = (pointer * b)(*[ctypes.addressof(c.table) for c in caches])
        lengths = (ctypes.c_int * b)(*[c.length for c in caches])
        where = (ctypes.c_int * b)(*positions)
        cross = (pointer * b)(*[ctypes.addressof(t.table) if t is not None else None for t in texts])
        text_lengths = (ctypes.c_int * b)(*[t.length if t is not None else 0 for t in texts])
        valid = (pointer * b)(*[t.valid.data_ptr() if t is not None else None for t in texts])
        status = self.kernel._layers(x.data_ptr(), b, hidden, heads, ffn, ctypes.addressof(self._table),
                                      len(self._layers), eps, cache_ptrs, lengths, where, cross, text_lengths,
                                      valid, self.kernel.threads)
        if status != 0:
            raise MemoryError("the fused decoder layers could not allocate scratch memory")


def quantize_groups(groups: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of 32: the clip ratio (of the min-max range, around its middle) with the least squared error (the
    PyTorch reference; `LowBitKernel.quantize_groups` does the same in C)."""
    best_q = best_scale = best_offset = best_error = None
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    middle, half = (low + high) / 2, (high - low) / 2
    for ratio in CLIP_RATIOS:
        lo = middle - half * ratio
        scale = ((2 * half * ratio).clamp(min=1e-8) / levels).to(torch.float16)
        offset = lo.to(torch.float16)
        q = torch.round((groups - offset.float()) / scale.float()).clamp(0, levels)
        error = ((q * scale.float() + offset.float() - groups) ** 2).sum(dim=-1, keepdim=True)
        if best_error is None:
            best_q, best_scale, best_offset, best_error = q, scale, offset, error
        else:
            better = error < best_error
            best_q = torch.where(better, q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_offset = torch.where(better, offset, best_offset)
            best_error = torch.where(better, error, best_error)
    return best_q.to(torch.uint8), best_scale, best_offset


class PackedLowBit:
    """A weight matrix in the kernel's layout (4 or 5 bits): nibbles (out, in/2), for 5 bits the fifth-bit planes
    (out, in/8), and fp16 scales and offsets (out, in/32)."""

    __slots__ = ("weight", "high_bits", "scale", "offset", "out_features", "in_features", "bits", "high_bit_slices")
    TENSORS = ("weight", "high_bits", "scale", "offset")  # what `to_tensors` holds (high_bits for 5 bits only)

    def __init__(self, weight: torch.Tensor, bits: int = 5, kernel: "LowBitKernel | None" = None):
        n, k = weight.shape
        if k % SUPERBLOCK:
            raise ValueError(f"in_features {k} is not a multiple of {SUPERBLOCK}")
        if bits not in (4, 5):
            raise ValueError("bits must be 4 or 5")
        # the kernel's C search when there is one (a MusicGen-small load: 26 s of PyTorch temporaries → ~1 s)
        quantize = kernel.quantize_groups if kernel is not None else quantize_groups
        q, scale, offset = quantize(weight.detach().float().reshape(n, k // GROUP, GROUP), 2 ** bits - 1)
        s = k // SUPERBLOCK
        # (n, superblocks, lane, block, 4) → (n, superblocks, block, lane, 4): block b holds 4 weights per lane
        blocks = q.reshape(n, s, 16, 8, 4).permute(0, 1, 3, 2, 4).reshape(n, s, 8, 64)
        nibbles = blocks & 15
        self.weight = (nibbles[:, :, :4] | (nibbles[:, :, 4:] << 4)).reshape(n, k // 2).contiguous()
        self.high_bits = self.high_bit_slices = None
        if bits == 5:
            planes = np.packbits(((blocks >> 4) & 1).numpy(), axis=-1, bitorder="little")  # (n, s, 8 blocks, 8)
            self.high_bits = torch.from_numpy(np.ascontiguousarray(planes.reshape(n, k // 8)))
        self.scale = scale.reshape(n, -1).contiguous()
        self.offset = offset.reshape(n, -1).contiguous()
        self.out_features, self.in_features, self.bits = n, k, bits

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The bytes that are the matrix (what `packcache` stores); `from_tensors` rebuilds it."""
        return {name: getattr(self, name) for name in self.TENSORS if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PackedLowBit":
        packed = cls.__new__(cls)
        packed.weight, packed.scale, packed.offset = tensors["weight"], tensors["scale"], tensors["offset"]
        packed.high_bits = tensors.get("high_bits")
        packed.high_bit_slices = None
        packed.out_features, packed.in_features = packed.weight.shape[0], packed.weight.shape[1] * 2
        packed.bits = 5 if packed.high_bits is not None else 4
        return packed

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix these bytes represent (tests compare the kernel against it)."""
        n, k = self.out_features, self.in_features
        packed = self.weight.reshape(n, k // SUPERBLOCK, 4, 64)
        blocks = torch.cat([packed & 15, packed >> 4], dim=2).to(torch.int32)  # (n, s, 8 blocks, 64)
        if self.high_bits is not None:
            planes = self.high_bits.numpy().reshape(n, k // SUPERBLOCK, 8, 8)
            fifth = np.unpackbits(planes, axis=-1, bitorder="little")
            blocks = blocks | (torch.from_numpy(fifth.astype(np.int32)) << 4)
        q = blocks.reshape(n, k // SUPERBLOCK, 8, 16, 4).permute(0, 1, 3, 2, 4).reshape(n, k // GROUP, GROUP).float()
        return (q * self.scale.float()[..., None] + self.offset.float()[..., None]).reshape(n, k)

    @property
    def nbytes(self) -> int:
        # what the kernel reads per use: the fifth bits once, as planes or as their slices
        tensors = [self.weight, self.scale, self.offset] + ([self.high_bits] if self.high_bits is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def torch_openmp() -> Path | None:
    lib = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib.glob("libgomp*.so*")) + sorted(lib.glob("libiomp*.so*"))
    return candidates[0] if candidates else None


def cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def load_kernel(cache_dir: str) -> LowBitKernel | None:
    """Compile (once per source, CPU and OpenMP runtime) and load the kernel; None when that is not possible here.

    The library is cached under `cache_dir/kernels/` with the sha256 it had when this process built it; a file
    that no longer matches (tampered with, truncated, half-written) is rebuilt, never loaded."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    openmp = torch_openmp()
    if compiler is None or openmp is None or not SOURCE.is_file():
        log.info("low-bit kernel unavailable (compiler=%s, openmp=%s)", compiler, openmp)
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + cpu_signature().encode() + str(openmp).encode()).hexdigest()[:16]
    target = Path(cache_dir) / "kernels" / f"lowbit_matmul-{digest}.so"
    recorded = target.with_name(target.name + ".sha256")
    trusted = target.is_file() and recorded.is_file() and recorded.read_text().strip() == _file_sha256(target)
    if not trusted:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            try:
                compile_kernel(built, ["-O3", "-march=native"], compiler, openmp)
            except (subprocess.SubprocessError, OSError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                log.warning("low-bit kernel did not compile: %s", detail.decode(errors="replace")[-400:] or exc)
                return None
            checksum = _file_sha256(built)
            os.replace(built, target)
            recorded.write_text(checksum + "\n")
    try:
        kernel = LowBitKernel(ctypes.CDLL(str(target)), target)
    except OSError as exc:
        log.warning("low-bit kernel did not load: %s", exc)
        return None
    if kernel.isa == "scalar":
        return None  # slower than PyTorch's own kernel
    return kernel


def compile_kernel(target: Path, flags: list[str], compiler: str | None = None, openmp: Path | None = None) -> None:
    """Build the kernel's shared library at `target` with these optimisation / ISA flags, linked against PyTorch's
    OpenMP runtime (tests also build the portable AVX2 and scalar paths this way)."""
    compiler = compiler or shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    openmp = openmp or torch_openmp()
    if compiler is None or openmp is None:
        raise OSError("no C compiler or no OpenMP runtime in torch")
    command = [compiler, *flags, "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(target),
               f"-L{openmp.parent}", f"-Wl,-rpath,{openmp.parent}", f"-l:{openmp.name}", "-lm"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
