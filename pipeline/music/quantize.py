"""Weight-only quantized matrix products for the MusicGen decoder.

Decoding one audio frame reads every decoder weight once, so on a CPU it is bound by memory bandwidth: fewer
bytes per weight means faster steps. `pack_linear` turns an fp32 weight matrix into a `PackedLinear` (`x -> x @ W.T`)
in one of these formats (`resolve_format` picks what the machine supports):

* `int5-native` / `int4-native`: the project's kernel (`pipeline.music.native`): 5- or 4-bit weights in groups
  of 32 with fp16 scale and offset, int8 activations, VNNI dot products; fp32 in and out;
* `int4-aten`: PyTorch's packed CPU kernel `_weight_int4pack_mm_for_cpu` (groups of 64), bf16 activations;
* `int8`: 8-bit weights with a scale per output row (`_weight_int8pack_mm`), bf16 activations;
* `bf16` / `fp16` / `fp32`: plain `F.linear` in that type (`fp32` is the reference).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

INT4_ATEN_GROUPS = (64, 32)  # the first that divides the input size is used
ACTIVATION_DTYPE = {"int5-native": torch.float32, "int4-native": torch.float32, "int4-aten": torch.bfloat16,
                    "int8": torch.bfloat16,
                    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.lru_cache(maxsize=None)
def int4_aten_supported() -> bool:
    try:
        packed, scales = _pack_int4_aten(torch.randn(64, 128), 64)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(2, 128, dtype=torch.bfloat16), packed, 64, scales)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def resolve_format(weights: str, device: str, cache_dir: str | None = None, native: bool = True):
    """Settings value (int5 | int4 | int8 | bf16 | fp16 | fp32) → (format actually used, native kernel or None)."""
    if device != "cpu":
        return ("fp32" if weights == "fp32" else "fp16" if weights in ("int5", "int4", "int8", "fp16") else weights), \
            None
    if weights in ("int5", "int4"):
        if native and cache_dir is not None:
            from .native import load_kernel

            kernel = load_kernel(str(cache_dir))
            if kernel is not None:
                return f"{weights}-native", kernel
        if weights == "int5":
            return "int8", None  # without the kernel, int8 is the closest accurate format PyTorch has
        return ("int4-aten" if int4_aten_supported() else "int8"), None
    if weights == "fp16":
        return "bf16", None  # fp16 matmuls are emulated on CPU; bf16 has the same size and native support
    return weights, None


def _pack_int4_aten(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    grouped = weight.float().reshape(n, k // group, group)
    low = grouped.amin(dim=-1, keepdim=True)
    high = grouped.amax(dim=-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    q = torch.round((grouped - low) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # the kernel computes (q - 8) * scale + zero, so the zero point is the group minimum shifted by 8 steps
    scales_and_zeros = torch.stack([scale.reshape(n, -1), (low + 8 * scale).reshape(n, -1)], dim=-1)
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


class PackedLinear:
    """`x (m, in) -> x @ W.T (m, out)` with W stored in one format. The decode loop swaps these in for the
    checkpoint's linear layers and never asks which format it holds (quantization by swapping modules)."""

    native = False  # True when the project's C kernel can run it inside a fused layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weight data one call reads (the benchmark's bandwidth roofline adds these up)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return []


class DenseLinear(PackedLinear):
    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x):
        return F.linear(x, self.weight)

    def _tensors(self):
        return [self.weight]


class Int8Linear(PackedLinear):
    """8-bit weights with one scale per output row (`_weight_int8pack_mm`), bf16 activations."""

    def __init__(self, weight: torch.Tensor):
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        self.q = torch.round(weight.float() / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.scales = scale.to(torch.bfloat16)

    def __call__(self, x):
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scales)

    def _tensors(self):
        return [self.q, self.scales]


class Int4AtenLinear(PackedLinear):
    """PyTorch's packed int4 CPU kernel (`_weight_int4pack_mm_for_cpu`), bf16 activations."""

    def __init__(self, weight: torch.Tensor, group: int):
        self.packed, self.scales = _pack_int4_aten(weight, group)
        self.group = group

    def __call__(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.scales)

    def _tensors(self):
        return [self.packed, self.scales]


class NativeLowBitLinear(PackedLinear):
    """The project's 4/5-bit kernel (`pipeline.music.native`): fp32 in and out."""

    native = True

    def __init__(self, weight: torch.Tensor | None, bits: int, kernel, packed=None):
        from .native import PackedLowBit

        # `packed`: the same matrix packed at an earlier start (`packcache`), so `weight` is never read
        self.packed = packed if packed is not None else PackedLowBit(weight, bits=bits, kernel=kernel)
        self.kernel = kernel

    def __call__(self, x):
        return self.kernel.linear(x, self.packed)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


class Float32Output(PackedLinear):
    """Another packed linear behind fp32 activations, for layers the native kernel cannot tile."""

    def __init__(self, inner: PackedLinear):
        self.inner = inner

    def __call__(self, x):
        return self.inner(x.to(torch.bfloat16)).to(torch.float32)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def pack_linear(weight: torch.Tensor, fmt: str, device: str = "cpu", kernel=None) -> PackedLinear:
    """`weight` is (out_features, in_features); the result maps (m, in) activations to (m, out)."""
    weight = weight.detach()
    n, k = weight.shape
    if fmt in ("int5-native", "int4-native") and kernel is not None:
        from .native import SUPERBLOCK

        if k % SUPERBLOCK == 0:
            return NativeLowBitLinear(weight, bits=int(fmt[3]), kernel=kernel)
        # shapes the kernel does not tile (tiny test models) use PyTorch's kernels
        fallback = "int8" if fmt == "int5-native" or not int4_aten_supported() else "int4-aten"
        return Float32Output(pack_linear(weight, fallback, device))
    group = next((g for g in INT4_ATEN_GROUPS if k % g == 0), None)
    if fmt == "int4-aten" and group and n % 16 == 0:
        return Int4AtenLinear(weight, group)
    if fmt in ("int4-aten", "int4-native", "int5-native", "int8"):
        return Int8Linear(weight)
    return DenseLinear(weight.to(device=device, dtype=ACTIVATION_DTYPE[fmt]).contiguous())
