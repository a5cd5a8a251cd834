"""Torch device, float type and thread settings, resolved once from `Settings`."""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass

from .settings import Settings


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" or "cuda"
    dtype: "torch.dtype"  # float type of BLIP, CLIP and the T5 text encoder  # noqa: F821
    music_weights: str  # int5 | int4 | int8 | bf16 | fp16 | fp32


# transformers' from_pretrained is not thread-safe: while it builds a model it swaps process-wide state (torch's
# default dtype, patched torch functions, its weight-initialisation switches); two at once left one model's
# weights on the meta device. The app loads the music model beside the others, so every build takes this lock.
_BUILD_LOCK = threading.Lock()


def build_model(make, *args, **kwargs):
    """`make(*args, **kwargs)` (a `from_pretrained`, or a constructor that calls one), one build at a time."""
    with _BUILD_LOCK:
        return make(*args, **kwargs)


def quiet_libraries() -> None:
    """Keep model loading from printing progress bars and advisory warnings into the Space log."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")


def resolve_runtime(settings: Settings) -> Runtime:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    one_blas_thread()
    device = settings.resolved_device
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    if settings.dtype == "auto":
        dtype = torch.float16 if device == "cuda" else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # half precision matmuls are emulated and slow on CPU
    weights = settings.music_weights
    if weights == "auto":
        weights = "fp16" if device == "cuda" else "int5"
    if device == "cuda" and weights in ("int5", "int4", "int8"):
        weights = "fp16"  # the CPU packed kernels have no CUDA counterpart with this layout
    return Runtime(device=device, dtype=dtype, music_weights=weights)


def one_blas_thread() -> None:
    """numpy's BLAS on one thread, for the whole process. Its calls here are the song searches' matrix-vector
    products, a millisecond or two on one core; a team of BLAS threads kept the cores busy after each one, so the
    sentence embedder's torch threads, next in an Analyze, ran on cores they did not get. Measured on 2 cores, the
    three song lists of an Analyze (`Catalog.recommend`), alternating in one process: p50 39 → 21 ms, p95 119 →
    43 ms; an embedding right after a feature search 46 → 19 ms, what it takes alone. torch's own BLAS (MKL, inside
    libtorch) is not numpy's and keeps its threads. Libraries loaded later keep theirs too: faiss's is used only for
    batches of queries, and its single queries run on one thread (`vector_index.search`)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX), rather than emulating them."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
