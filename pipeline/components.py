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


@dataclass
class _Slot:
    state: str = "waiting"
    value: object = None
    error: str = ""
    seconds: float | None = None
    detail: str = ""
    ready: threading.Event = field(default_factory=threading.Event)


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
        return [ComponentStatus(name=name, state=slot.state, detail=slot.error or slot.detail, seconds=slot.seconds)
                for name, slot in self._slots.items()]

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
            for name in COMPONENTS:
                self._load_one(name, loaders[name])

    def _load_one(self, name: str, loader: Callable[[], tuple[object, str]]) -> None:
        slot = self._slots[name]
        slot.state = "loading"
        started = time.monotonic()
        try:
            slot.value, slot.detail = loader()
            slot.state = "ready"
        except Exception as exc:  # every failure is reported to the user; the app keeps serving the rest
            slot.state, slot.error = "failed", explain(exc, self.settings.hf_token)
        finally:
            slot.seconds = round(time.monotonic() - started, 2)
            slot.ready.set()

    def _model_path(self, kind: str, name: str) -> tuple[Path, str]:
        from .artifacts import ArtifactSpec, resolve

        model_id = getattr(self.settings, f"{kind}_model")
        if self.settings.demo and kind in ("caption", "clip", "music"):
            from .demo_models import ensure_demo_models

            return getattr(ensure_demo_models(self.settings.cache_dir), kind), f"tiny random-weight demo {kind} model"
        revision = self.settings.revision_for(kind)
        resolved = resolve(ArtifactSpec(name, model_id, revision), token=self.settings.hf_token or None)
        return resolved.path, f"{model_id} ({resolved.source})"

    def _load_catalog(self):
        from .catalog import Catalog

        catalog = Catalog.load(self.settings.index_dir, embedder_factory=lambda: self.get(EMBEDDER))
        c = catalog.counts
        return catalog, f"{c['songs']:,} songs ({c['with_features']:,} with audio features, " \
                        f"{c['with_lyrics']:,} with lyrics)"

    def _load_embedder(self):
        from .embedder import SentenceEmbedder

        path, detail = self._model_path("embedder", EMBEDDER)
        embedder = SentenceEmbedder(path, self.settings.embedder_model, self.settings.revision_for("embedder"))
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
        return captioner, detail + (", int8" if captioner.quantized else "")

    def _load_music(self):
        from .music import load_model

        path, detail = self._model_path("music", MUSIC)
        s = self.settings
        generator = load_model(path, device=self.runtime.device, dtype=self.runtime.dtype,
                               weights=self.runtime.music_weights, backend=s.music_backend, cache_dir=s.cache_dir,
                               native_kernels=s.native_kernels, first_chunk_s=s.first_chunk_s,
                               stream_chunk_s=s.stream_chunk_s, audio_dir=s.audio_dir)
        return generator, f"{detail}, {generator.backend} backend, {generator.weights} weights"


def explain(exc: Exception, token: str | None) -> str:
    """An exception as a message for the status panel: the token redacted, a type name where it helps, bounded."""
    from .artifacts import redact

    text = redact(str(exc) or type(exc).__name__, token)
    if not isinstance(exc, UserFacingError) and "Could not load" not in text:
        text = f"{type(exc).__name__}: {text}"
    return text[:1200]
