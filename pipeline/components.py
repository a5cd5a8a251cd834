"""Loading the app's parts (catalog, embedder, mood, caption and music models) in the background, each on its own.

A part that fails (no network, missing files) is reported by `status()` with the reason and a fix, and everything
that does not need it keeps working. `get(name)` hands a part to the facade, waiting (up to the load-wait setting)
for one still loading.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ComponentLoading, ComponentUnavailable, InputError, UserFacingError
from .settings import Settings

CATALOG, EMBEDDER, MOOD, CAPTION, MUSIC = "song catalog", "sentence embedder", "mood model", "caption model", \
    "music model"
COMPONENTS = (CATALOG, EMBEDDER, MOOD, CAPTION, MUSIC)  # loading order: cheapest and most useful first


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str  # waiting | loading | ready | failed
    detail: str = ""
    seconds: float | None = None
    source: str | None = None  # local | package | cache | hub | demo (models); index | hub | cache (the catalog)
    weights: str | None = None  # the format the part runs in: fp32, int8 (dynamic), int5-native, ...
    device: str | None = None
    selfcheck: dict | None = None  # the music model's load-time comparison with its fp32 reference
    progress: dict | None = None  # a download under way or done: bytes, total, bytes_per_s, files, ...
    counts: dict | None = None  # the catalog's songs, with features, with lyrics
    offline: bool = False  # failed because its files are missing and the Hub is out of reach


@dataclass
class _Slot:
    state: str = "waiting"
    value: object = None
    error: str = ""
    seconds: float | None = None
    detail: str = ""
    ready: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=dict)  # ComponentStatus fields the loader learns (source, weights, ...)
    download: object = None  # an artifacts.DownloadProgress while (or after) its files come from the Hub
    offline: bool = False


class Components:
    def __init__(self, settings: Settings, on_compute_thread: Callable[[], bool]):
        self.settings = settings
        self.runtime = None
        self._slots = {name: _Slot() for name in COMPONENTS}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._on_compute_thread = on_compute_thread

    def start(self) -> None:
        """Begin loading every part in a background thread (idempotent)."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load_all, name="pipeline-loader", daemon=True)
                self._thread.start()

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self._slots.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not slot.ready.wait(remaining):
                return False
        return True

    def wait_for(self, *names: str) -> None:
        """Wait (off the compute thread, up to the load-wait setting) for parts still loading."""
        self.start()
        deadline = time.monotonic() + self.settings.load_wait_s
        for name in names:
            self._slots[name].ready.wait(max(0.0, deadline - time.monotonic()))

    def get(self, name: str, wait_s: float | None = None):
        """The loaded part, or ComponentLoading / ComponentUnavailable with a message for the user."""
        self.start()
        slot = self._slots[name]
        if wait_s is None:
            # on the compute thread, waiting would hold up every other request: callers wait beforehand
            wait_s = 0.0 if self._on_compute_thread() else self.settings.load_wait_s
        if not slot.ready.wait(wait_s):
            raise ComponentLoading(name)
        if slot.state == "failed":
            raise ComponentUnavailable(name, slot.error)
        return slot.value

    def status(self) -> list[ComponentStatus]:
        statuses = []
        for name, slot in self._slots.items():
            progress = slot.download.snapshot() if slot.download is not None else None
            detail = slot.error or slot.detail
            if slot.state == "loading" and progress is not None:
                from .artifacts import describe_progress

                detail = describe_progress(progress)  # instead of a silent "loading" during a first-run download
            statuses.append(ComponentStatus(name=name, state=slot.state, detail=detail, seconds=slot.seconds,
                                            progress=progress, offline=slot.offline, **slot.info))
        return statuses

    # -- loading --------------------------------------------------------------------------------------------------
    def _load_all(self) -> None:
        from .memory import loading_allocations
        from .runtime import quiet_libraries, resolve_runtime

        quiet_libraries()
        self.runtime = resolve_runtime(self.settings)
        loaders: dict[str, Callable[[], tuple[object, str]]] = {
            CATALOG: self._load_catalog, EMBEDDER: self._load_embedder, MOOD: self._load_mood,
            CAPTION: self._load_caption, MUSIC: self._load_music,
        }
        with loading_allocations():
            # the music model beside the rest: with its packed weights cached, its load is mostly waiting on files
            # and single-threaded Python, which the other core can overlap (models build one at a time: see
            # `runtime.build_model`)
            music = threading.Thread(target=self._load_one, args=(MUSIC, loaders[MUSIC]), name="music-loader")
            music.start()
            for name in COMPONENTS:
                if name != MUSIC:
                    self._load_one(name, loaders[name])
            music.join()

    def _load_one(self, name: str, loader: Callable[[], tuple[object, str]]) -> None:
        slot = self._slots[name]
        slot.state = "loading"
        started = time.monotonic()
        try:
            slot.value, slot.detail = loader()
            slot.state = "ready"
        except Exception as exc:  # every failure is reported to the user; the app keeps serving the rest
            from .artifacts import ArtifactError

            slot.offline = isinstance(exc, ArtifactError) and exc.offline
            slot.state, slot.error = "failed", explain(exc, self.settings.hf_token)
        finally:
            slot.seconds = round(time.monotonic() - started, 2)
            slot.ready.set()

    def _note(self, name: str, **info) -> None:
        """Record status fields a loader learns (source, weights, device, self-check, counts)."""
        slot = self._slots[name]
        slot.info = {**slot.info, **info}  # replaced, not updated: status() may be reading it from another thread

    def _model_path(self, kind: str, name: str) -> tuple[Path, str]:
        from .artifacts import ArtifactSpec, DownloadProgress, resolve

        model_id = getattr(self.settings, f"{kind}_model")
        if self.settings.demo and kind in ("caption", "clip", "music"):
            from .demo_models import ensure_demo_models

            self._note(name, source="demo")
            return getattr(ensure_demo_models(self.settings.cache_dir), kind), f"tiny random-weight demo {kind} model"
        revision = self.settings.revision_for(kind)
        slot = self._slots[name]
        slot.download = DownloadProgress()
        resolved = resolve(ArtifactSpec(name, model_id, revision), token=self.settings.hf_token or None,
                           progress=slot.download)
        self._note(name, source=resolved.source)
        return resolved.path, f"{model_id} ({resolved.source})"

    def _load_catalog(self):
        from .artifacts import DownloadProgress
        from .hub_catalog import load_catalog

        slot = self._slots[CATALOG]
        slot.download = DownloadProgress() if self.settings.catalog else None
        loaded = load_catalog(self.settings, embedder_factory=lambda: self.get(EMBEDDER), progress=slot.download)
        c = loaded.catalog.counts
        self._note(CATALOG, source=loaded.source, counts={key: int(value) for key, value in c.items()})
        detail = f"{c['songs']:,} songs ({c['with_features']:,} with audio features, {c['with_lyrics']:,} with lyrics)"
        return loaded.catalog, f"{detail}. {loaded.note}" if loaded.note else detail

    def _load_embedder(self):
        from .embedder import SentenceEmbedder

        path, detail = self._model_path("embedder", EMBEDDER)
        embedder = SentenceEmbedder(path, self.settings.embedder_model, self.settings.revision_for("embedder"))
        self._note(EMBEDDER, device="cpu", weights="fp32")
        catalog = self._slots[CATALOG].value
        if catalog is not None:
            catalog.attach_embedder(embedder)  # refuses an embedder whose fingerprint differs from the index's
        return embedder, detail

    def _load_mood(self):
        from .mood import ClipImageEncoder, FastMLPMood, ZeroShotMood

        path, detail = self._model_path("clip", MOOD)
        zero_shot = self.settings.mood_predictor == "zeroshot"
        encoder = ClipImageEncoder(path, device=self.runtime.device, dtype=self.runtime.dtype,
                                   prompts=ZeroShotMood.prompts() if zero_shot else ())
        if zero_shot:
            predictor = ZeroShotMood(encoder.text_embeddings, encoder.logit_scale)
        else:
            predictor = FastMLPMood(self._mood_head_path())
        self._note(MOOD, device=self.runtime.device, weights=_dtype_name(self.runtime.dtype))
        return (encoder, predictor), f"{detail}, {predictor.name} predictor"

    def _mood_head_path(self) -> Path:
        from .artifacts import ArtifactSpec, resolve

        ref = self.settings.mood_mlp
        if not ref:
            raise InputError("I2M_MOOD_PREDICTOR=mlp needs I2M_MOOD_MLP (a .safetensors file or a Hub repo id).")
        if Path(ref).expanduser().is_file():
            return Path(ref).expanduser()
        return resolve(ArtifactSpec("mood head", ref, "main", filename="mood_mlp.safetensors"),
                       token=self.settings.hf_token or None).path

    def _load_caption(self):
        from .captioner import Captioner

        path, detail = self._model_path("caption", CAPTION)
        captioner = Captioner(path, device=self.runtime.device, dtype=self.runtime.dtype,
                              int8=self.settings.caption_int8)
        self._note(CAPTION, device=self.runtime.device,
                   weights="int8 (dynamic)" if captioner.quantized else _dtype_name(self.runtime.dtype))
        return captioner, detail + (", int8" if captioner.quantized else "")

    def _load_music(self):
        from .music.selfcheck import Thresholds, load_checked

        path, detail = self._model_path("music", MUSIC)
        s = self.settings
        # before it serves, the fast decode loop is compared with the fp32 reference on these very weights, and
        # falls back (int8, then the reference backend) when it disagrees
        generator, check = load_checked(path, Thresholds(s.selfcheck_max_kl_share, s.selfcheck_min_top1),
                                        check=s.music_selfcheck, packed_cache=s.packed_cache,
                                        device=self.runtime.device, dtype=self.runtime.dtype,
                                        weights=self.runtime.music_weights, backend=s.music_backend,
                                        cache_dir=s.cache_dir, native_kernels=s.native_kernels,
                                        first_chunk_s=s.first_chunk_s, stream_chunk_s=s.stream_chunk_s,
                                        audio_dir=s.audio_dir)
        self._note(MUSIC, device=self.runtime.device, weights=generator.weights,
                   selfcheck=check.as_dict() if check is not None else None)
        text = f"{detail}, {generator.backend} backend, {generator.weights} weights"
        return generator, text + (f"; {check.summary}" if check is not None else "")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("float", "fp")


def explain(exc: Exception, token: str | None) -> str:
    """An exception as a message for the status panel: the token redacted, a type name where it helps, bounded."""
    from .artifacts import redact

    text = redact(str(exc) or type(exc).__name__, token)
    if not isinstance(exc, UserFacingError) and "Could not load" not in text:
        text = f"{type(exc).__name__}: {text}"
    return text[:1200]


# what a visitor loses when a part is missing, for the offline banner
_NEEDED_FOR = {CATALOG: "song recommendations", EMBEDDER: "lyric search", MOOD: "Analyze (the photo's mood)",
               CAPTION: "Analyze (the photo's caption)", MUSIC: "Generate (music)"}


def missing_models_message(statuses: list[ComponentStatus]) -> str | None:
    """One banner for parts whose files are missing while the Hub is out of reach (instead of an error per part),
    or None when nothing failed that way."""
    missing = [s.name for s in statuses if s.state == "failed" and s.offline]
    if not missing:
        return None
    names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    verb = "is" if len(missing) == 1 else "are"
    lost = "; ".join(dict.fromkeys(_NEEDED_FOR[name] for name in missing if name in _NEEDED_FOR))
    working = [s.name for s in statuses if s.state == "ready"]
    still = f" Still working: {', '.join(working)}." if working else ""
    return (f"Offline: the {names} {verb} not downloaded and the Hugging Face Hub cannot be reached, so these are "
            f"unavailable: {lost}.{still} To fix: connect this machine to the internet and restart, copy the Hugging "
            "Face cache folder (HF_HOME) from a connected machine, or run `python app.py --demo` for the small "
            "offline demo models.")


def status_report(statuses: list[ComponentStatus], settings: Settings, *, device: str | None = None,
                  queue_length: int | None = None) -> dict:
    """The JSON health report of `/status`: overall state, then each part's state, source, load time, weights,
    device, self-check figures, download progress and catalog counts. Safe to publish: no token, and no path
    outside the app (cache folders become labels, other absolute paths "<path>")."""
    from .artifacts import redact, redact_paths
    from .settings import REPO_ROOT

    labels = {settings.cache_dir: "<app-cache>", str(Path(settings.cache_dir).expanduser().resolve()): "<app-cache>"}
    try:
        from huggingface_hub import constants

        labels[constants.HF_HUB_CACHE] = "<hf-cache>"
    except ImportError:
        pass
    labels[str(Path.home())] = "~"

    def clean(value):
        if isinstance(value, str):
            return redact_paths(redact(value, settings.hf_token or None), REPO_ROOT, labels)
        if isinstance(value, bool) or value is None or isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if value == value and value not in (float("inf"), float("-inf")) else None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return clean(str(value))

    states = [s.state for s in statuses]
    overall = ("ready" if all(state == "ready" for state in states) else
               "loading" if any(state in ("waiting", "loading") for state in states) else "degraded")
    parts = [{"name": s.name, "state": s.state, "detail": s.detail, "load_s": s.seconds, "source": s.source,
              "weights": s.weights, "device": s.device, "selfcheck": s.selfcheck, "download": s.progress,
              "offline": s.offline} for s in statuses]
    counts = next((s.counts for s in statuses if s.name == CATALOG and s.counts), None)
    report = {"state": overall, "mode": "demo" if settings.demo else "full", "device": device,
              "components": parts, "catalog": counts, "banner": missing_models_message(statuses)}
    if queue_length is not None:
        report["queue_length"] = queue_length
    return clean(report)
