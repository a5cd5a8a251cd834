"""Every knob of the app in one typed object, read from environment variables.

Each field declares its environment variable, default and meaning next to it; the README's settings table is
generated from these declarations (`python -m pipeline.settings`) and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent

# Pinned Hub revisions of the default checkpoints, so a Space rebuild never silently picks up new weights.
CAPTION_REVISIONS = {
    "Salesforce/blip-image-captioning-base": "82a37760796d32b1411fe092ab5d4e227313294b",
}
CLIP_REVISIONS = {
    "openai/clip-vit-base-patch32": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
}
MUSIC_REVISIONS = {
    "facebook/musicgen-small": "4c8334b02c6ec4e8664a91979669a501ec497792",
}
EMBEDDER_REVISIONS = {
    "sentence-transformers/all-MiniLM-L6-v2": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
}

MUSIC_MODEL_CHOICES = (
    "facebook/musicgen-small",
    "facebook/musicgen-medium",
    "facebook/musicgen-melody",
    "facebook/musicgen-stereo-small",
)


class SettingsError(ValueError):
    """An environment variable holds a value the app cannot use; the message names the variable."""


def _setting(env: str, default: Any, doc: str, *, choices: tuple[str, ...] | None = None,
             low: float | None = None, high: float | None = None, secret: bool = False):
    return field(default=default, repr=not secret,
                 metadata={"env": env, "doc": doc, "choices": choices, "low": low, "high": high, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Models
    demo: bool = _setting("I2M_DEMO", False, "Use tiny random-weight models built locally (no network). "
                          "`python app.py --demo` sets it.")
    caption_model: str = _setting("I2M_CAPTION_MODEL", "Salesforce/blip-image-captioning-base",
                                  "BLIP captioning checkpoint (Hub id or local folder); "
                                  "`Salesforce/blip-image-captioning-large` for better captions.")
    caption_revision: str = _setting("I2M_CAPTION_REVISION", "",
                                     "Hub revision of the caption model; empty = the pinned commit of the default "
                                     "checkpoint, `main` for any other.")
    clip_model: str = _setting("I2M_CLIP_MODEL", "openai/clip-vit-base-patch32", "CLIP checkpoint for the mood reader.")
    clip_revision: str = _setting("I2M_CLIP_REVISION", "", "Hub revision of the CLIP model (empty = pinned).")
    music_model: str = _setting("I2M_MUSIC_MODEL", "facebook/musicgen-small",
                                "MusicGen checkpoint: " + ", ".join(f"`{m}`" for m in MUSIC_MODEL_CHOICES)
                                + " or a local folder.")
    music_revision: str = _setting("I2M_MUSIC_REVISION", "", "Hub revision of the MusicGen model (empty = pinned).")
    embedder_model: str = _setting("I2M_EMBEDDER_MODEL", "sentence-transformers/all-MiniLM-L6-v2",
                                   "Sentence embedder for lyric search; must match the one the index was built with.")
    embedder_revision: str = _setting("I2M_EMBEDDER_REVISION", "",
                                      "Hub revision of the embedder (empty = pinned).")
    mood_predictor: str = _setting("I2M_MOOD_PREDICTOR", "zeroshot",
                                   "`zeroshot` (CLIP text prompts, no training) or `mlp` (trained FastMLP head).",
                                   choices=("zeroshot", "mlp"))
    mood_mlp: str = _setting("I2M_MOOD_MLP", "",
                             "FastMLP weights for `mlp`: a local `.safetensors` file or a Hub model repo id "
                             "holding `mood_mlp.safetensors`.")
    # Hardware
    device: str = _setting("I2M_DEVICE", "auto", "`auto` (CUDA when present), `cpu` or `cuda`.",
                           choices=("auto", "cpu", "cuda"))
    dtype: str = _setting("I2M_DTYPE", "auto", "Float type of BLIP/CLIP/T5: `auto` (fp16 on GPU, fp32 on CPU), "
                          "`float32`, `bfloat16`, `float16`.", choices=("auto", "float32", "bfloat16", "float16"))
    caption_int8: bool = _setting("I2M_CAPTION_INT8", True, "Dynamic int8 quantization of BLIP's linear layers on CPU.")
    music_weights: str = _setting("I2M_MUSIC_WEIGHTS", "auto",
                                  "MusicGen decoder weights: `auto` (int5 on CPU, fp16 on GPU), `int5`, `int4`, "
                                  "`int8`, `bf16`, `fp32` (the reference).",
                                  choices=("auto", "int5", "int4", "int8", "bf16", "fp32", "fp16"))
    music_backend: str = _setting("I2M_MUSIC_BACKEND", "fast",
                                  "Who samples the music codes: `fast` (the project's lean decode loop) or "
                                  "`reference` (transformers' `generate`).", choices=("fast", "reference"))
    native_kernels: bool = _setting("I2M_NATIVE_KERNELS", True,
                                    "Compile the project's int5/int4 CPU kernel with the system C compiler on first "
                                    "use; off = PyTorch's own kernels (int8 for int5).")
    packed_cache: bool = _setting("I2M_PACKED_CACHE", True,
                                  "Keep the packed music weights and the self-check's figures on them in the cache "
                                  "folder, keyed by checkpoint, code and CPU, so a later start loads them instead of "
                                  "packing and probing again (~3 s of a MusicGen-small start); a damaged entry is "
                                  "rebuilt.")
    music_selfcheck: bool = _setting("I2M_MUSIC_SELFCHECK", True,
                                     "At load, compare the fast music decoder with the fp32 reference on the loaded "
                                     "weights (teacher-forced, a fixed prompt) and fall back, to int8 weights and "
                                     "then the `reference` backend, when it disagrees; the figures are in the status.")
    selfcheck_max_kl_share: float = _setting("I2M_SELFCHECK_MAX_KL_SHARE", 0.1,
                                             "Self-check: largest next-token KL(reference ‖ fast) allowed for any "
                                             "codebook, as a share of the reference's own KL from a uniform guess.",
                                             low=0, high=10)
    selfcheck_min_top1: float = _setting("I2M_SELFCHECK_MIN_TOP1", 0.25,
                                         "Self-check: smallest share of positions where the fast decoder's most "
                                         "likely code equals the reference's, for every codebook.", low=0, high=1)
    threads: int = _setting("I2M_THREADS", 0, "Torch CPU threads; 0 = all cores.", low=0, high=256)
    # Limits
    min_duration_s: float = _setting("I2M_MIN_DURATION", 1.0, "Shortest clip in seconds.", low=0.5, high=30)
    max_duration_s: float = _setting("I2M_MAX_DURATION", 300.0,
                                     "Longest clip in seconds; beyond the model's window the music continues window "
                                     "by window (I2M_MUSIC_WINDOW, I2M_EXTEND_STRIDE).", low=1, high=3600)
    default_duration_s: float = _setting("I2M_DEFAULT_DURATION", 8.0, "Clip length preselected in the UI.",
                                         low=1, high=3600)
    music_window_s: float = _setting("I2M_MUSIC_WINDOW", 30.0,
                                     "Seconds of music the model attends to at once (MusicGen was trained on 30; "
                                     "the model's positions cap it near 40).", low=1, high=40)
    extend_stride_s: float = _setting("I2M_EXTEND_STRIDE", 18.0,
                                      "When a window is full, the music moves on by this many seconds; the window's "
                                      "last (window - stride) seconds prompt the next one (audiocraft's "
                                      "`extend_stride`).", low=0.5, high=39)
    endless_max_s: float = _setting("I2M_ENDLESS_MAX", 1800.0,
                                    "An Endless stream stops by itself after this many seconds.", low=10, high=86400)
    max_batch: int = _setting("I2M_MAX_BATCH", 4,
                              "Music requests decoded together in one batch; more wait in line.", low=1, high=64)
    stream_chunk_s: float = _setting("I2M_STREAM_CHUNK", 1.0, "Longest streamed audio chunk in seconds (chunks grow to it "
                                     "from the first by at most 1.25x each, so playback never waits while music is "
                                     "made at RTF <= 0.8).",
                                     low=0.2, high=5)
    first_chunk_s: float = _setting("I2M_FIRST_CHUNK", 0.5,
                                    "Length of the first streamed chunk (shorter = sooner first sound).",
                                    low=0.2, high=5)
    max_prompt_chars: int = _setting("I2M_MAX_PROMPT_CHARS", 400,
                                     "Music prompts and free text longer than this are cut, with a notice.",
                                     low=20, high=5000)
    max_image_pixels: int = _setting("I2M_MAX_IMAGE_PIXELS", 50_000_000,
                                     "Images declaring more pixels are refused before decoding "
                                     "(decompression-bomb guard).", low=1, high=500_000_000)
    max_image_side: int = _setting("I2M_MAX_IMAGE_SIDE", 1024,
                                   "Larger photos are downscaled to this longest side before the models see them.",
                                   low=64, high=8192)
    max_upload_mb: float = _setting("I2M_MAX_UPLOAD_MB", 20.0, "Largest accepted upload (or photo from a link) in MB.",
                                    low=0.1, high=500)
    video_max_s: float = _setting("I2M_VIDEO_MAX_SECONDS", 60.0,
                                  "Longest video clip accepted for a soundtrack, in seconds; also the longest "
                                  "audio a shared photo video or album may carry.", low=1, high=600)
    video_max_side: int = _setting("I2M_VIDEO_MAX_SIDE", 8192,
                                   "Videos wider or taller than this many pixels are refused before decoding.",
                                   low=64, high=16384)
    video_output_side: int = _setting("I2M_VIDEO_OUTPUT_SIDE", 1080,
                                      "Size of the MP4s the app makes: photo videos and albums at most this on "
                                      "their long side (720 is about 1.5× faster on CPU); a scored clip keeps its "
                                      "picture up to this many lines (1080 = 1920×1080), larger ones are scaled "
                                      "down.", low=128, high=1080)
    max_k: int = _setting("I2M_MAX_K", 50, "Most songs one recommendation list may ask for.", low=1, high=500)
    # Photos from a link
    url_connect_timeout_s: float = _setting("I2M_URL_CONNECT_TIMEOUT", 3.0,
                                            "Seconds to wait for a linked photo's server to accept the connection.",
                                            low=0.1, high=60)
    url_total_timeout_s: float = _setting("I2M_URL_TOTAL_TIMEOUT", 10.0,
                                          "Seconds a linked photo may take in all (lookup, redirects, download).",
                                          low=0.5, high=300)
    url_allowed_ports: str = _setting("I2M_URL_PORTS", "80,443",
                                      "Comma-separated ports a photo link may use.")
    url_allow_loopback: bool = _setting("I2M_URL_ALLOW_LOOPBACK", False,
                                        "Tests only: let photo links reach 127.0.0.1 (never any other loopback, "
                                        "private or link-local address).")
    # Serving
    queue_size: int = _setting("I2M_QUEUE_SIZE", 32,
                               "Requests waiting beyond this are answered 'busy, try again'.", low=1, high=10_000)
    analyze_concurrency: int = _setting("I2M_ANALYZE_CONCURRENCY", 2, "Analyze requests run at once.", low=1, high=64)
    client_max_jobs: int = _setting("I2M_CLIENT_MAX_JOBS", 2,
                                    "Music requests one client (address) may have running or waiting at once; "
                                    "more are refused with a message.", low=1, high=1000)
    trusted_proxies: int = _setting("I2M_TRUSTED_PROXIES", 1,
                                    "Proxies in front of the app (a Space has 1): the client's address is the one "
                                    "the outermost appended to X-Forwarded-For; 0 = use the socket's peer.",
                                    low=0, high=10)
    analyze_cache_size: int = _setting("I2M_ANALYZE_CACHE", 128, "Analyze results kept per image and settings (LRU).",
                                       low=0, high=100_000)
    analyze_cache_mb: float = _setting("I2M_ANALYZE_CACHE_MB", 32.0,
                                       "Most memory the Analyze cache may hold, in MB (oldest results go first).",
                                       low=0, high=100_000)
    load_wait_s: float = _setting("I2M_LOAD_WAIT", 45.0,
                                  "A request for a model still loading waits this long, then answers 'still loading'.",
                                  low=0, high=3600)
    temp_max_age_s: int = _setting("I2M_TEMP_MAX_AGE", 3600, "Generated files older than this are deleted.",
                                   low=60, high=7 * 86400)
    temp_max_mb: int = _setting("I2M_TEMP_MAX_MB", 512, "Generated files are pruned, oldest first, above this size.",
                                low=1, high=100_000)
    upload_max_age_s: int = _setting("I2M_UPLOAD_MAX_AGE", 900,
                                     "Uploaded photos are deleted from the server after this many seconds.",
                                     low=60, high=86400)
    upload_max_mb: float = _setting("I2M_UPLOAD_MAX_MB", 256.0,
                                    "Uploaded files are pruned, oldest first, above this total size in MB.",
                                    low=0.001, high=100_000)
    janitor_every_s: float = _setting("I2M_JANITOR_EVERY", 60.0,
                                      "How often (seconds) the upload and audio folders are pruned.", low=1, high=3600)
    # Locations
    index_dir: str = _setting("I2M_INDEX_DIR", str(REPO_ROOT / "index"), "Folder of the song catalog (`index/`).")
    catalog: str = _setting("I2M_CATALOG", "", "A song catalog on the Hub instead of `index/`: a dataset repo "
                            "written by `scripts/build_index.py --push-to-hub`, pinned as `user/songs@<commit>`. "
                            "Downloaded once and checked file by file; `index/` is used, with a note, when it "
                            "cannot be.")
    cache_dir: str = _setting("I2M_CACHE_DIR", str(Path.home() / ".cache" / "image-to-music"),
                              "Where demo models, generated audio, the compiled kernel, the packed music weights "
                              "and cached embeddings live (on a Space, a folder on persistent storage keeps them "
                              "across restarts).")
    hf_token: str = _setting("HF_TOKEN", "", "Hugging Face token for gated or private repos; read from the "
                             "environment only and never logged or shown.", secret=True)

    # -- derived values -------------------------------------------------------------------------------------------
    def revision_for(self, kind: str) -> str:
        model = getattr(self, f"{kind}_model")
        explicit = getattr(self, f"{kind}_revision")
        pins = {"caption": CAPTION_REVISIONS, "clip": CLIP_REVISIONS, "music": MUSIC_REVISIONS,
                "embedder": EMBEDDER_REVISIONS}[kind]
        return explicit or pins.get(model, "main")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # deferred: settings are read by the UI process before torch is needed
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def url_ports(self) -> frozenset[int]:
        return frozenset(int(part) for part in self.url_allowed_ports.split(",") if part.strip())

    @property
    def audio_dir(self) -> Path:
        return Path(self.cache_dir) / "audio"

    def replace(self, **changes: Any) -> "Settings":
        merged = {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes}
        return _validated(merged)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f, raw.strip())
        values.update(overrides)
        return _validated(values)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    env = f.metadata["env"]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        shown = "<hidden>" if f.metadata["secret"] else repr(raw)
        raise SettingsError(f"{env}={shown} is not a valid {kind}.") from None


def _validated(values: dict[str, Any]) -> Settings:
    settings = Settings(**values)
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        meta = f.metadata
        if meta["choices"] and value not in meta["choices"]:
            raise SettingsError(f"{meta['env']}={value!r} is not one of: {', '.join(meta['choices'])}.")
        if meta["low"] is not None and not (meta["low"] <= value <= meta["high"]):
            raise SettingsError(f"{meta['env']}={value!r} is outside [{meta['low']}, {meta['high']}].")
    ports = [part.strip() for part in settings.url_allowed_ports.split(",") if part.strip()]
    if not ports or not all(part.isdigit() and 1 <= int(part) <= 65535 for part in ports):
        raise SettingsError(f"I2M_URL_PORTS={settings.url_allowed_ports!r} is not a comma-separated list of ports "
                            "(1-65535).")
    if settings.min_duration_s > settings.max_duration_s:
        raise SettingsError("I2M_MIN_DURATION must not exceed I2M_MAX_DURATION.")
    if settings.extend_stride_s >= settings.music_window_s:
        raise SettingsError("I2M_EXTEND_STRIDE must be shorter than I2M_MUSIC_WINDOW (the rest of the window is "
                            "what the next one continues from).")
    if not settings.min_duration_s <= settings.default_duration_s <= settings.max_duration_s:
        raise SettingsError("I2M_DEFAULT_DURATION must lie between I2M_MIN_DURATION and I2M_MAX_DURATION.")
    return settings


def settings_table() -> str:
    """The Markdown table of every setting, as printed in the README."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        if f.name == "index_dir":
            default = "`index/` beside `app.py`"
        elif f.name == "cache_dir":
            default = "`~/.cache/image-to-music`"
        elif f.metadata["secret"] or default == "":
            default = "(empty)"
        else:
            default = f"`{default}`"
        rows.append(f"| `{f.metadata['env']}` | {default} | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
