"""The music stack: text prompt → audio codes → audio, streamed while it is made.

Vocabulary (one word per concept):

* **request** (`request.py`): what is asked for — prompt, duration, seed and `Sampling` (the one home of the
  sampling defaults, ranges and checks).
* **backend**: who samples the codes — `fast` (`lm.FastMusicLM`, the project's decode loop, readable in one file) or
  `reference` (transformers' `generate`), setting `I2M_MUSIC_BACKEND`.
* **lm**: MusicGen's language model over audio codes; a **step** samples one code per codebook.
* **weights**: the format the lm's matrices are stored in — the setting asks (`auto`, `int5`, ...), and
  `quantize.resolve_format` answers what this machine runs (`int5-native`: 5-bit groups through the project's C
  kernel, `native.py` + `kernels/lowbit_matmul.c`; `int8`, `bf16`, `fp32`: PyTorch's kernels).
* **codec**: EnCodec, codes → samples; `codec.StreamingCodec` decodes a few frames at a time, exactly.
* **generator** (`generator.MusicGenerator`): ties them together and yields loudness-normalised chunks.
* **engine** (`engine.py`): many requests decoded as one batch, joining and leaving at step boundaries; a request
  longer than the model's window goes on window by window (**continuation**), so music can run for minutes.
* **self-check** (`selfcheck.py`): at load, the fast backend is compared with the fp32 reference on the loaded
  checkpoint; below the thresholds the generator falls back to safer weights and says so.

    from pipeline.music import MusicRequest, load_model
    generator = load_model("path/to/facebook-musicgen-small")
    for chunk in generator.stream(MusicRequest("calm piano", duration_s=8, seed=1)): ...
"""

from __future__ import annotations

from pathlib import Path

from .request import DurationLimits, MusicRequest, Sampling

__all__ = ["DurationLimits", "MusicRequest", "Sampling", "load_model"]


def load_model(path: str | Path, **options):
    """A `MusicGenerator` for a checkpoint folder; options as `MusicGenerator.__init__` (device, weights, backend,
    cache_dir, native_kernels, first_chunk_s, stream_chunk_s, audio_dir). Imports torch on first call."""
    from .generator import MusicGenerator

    return MusicGenerator.load(Path(path), **options)
