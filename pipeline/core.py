"""The one object the UI talks to: models and catalog loaded once, in the background, behind typed calls.

    pipe = get_pipeline()                 # cached per settings; starts loading in a background thread
    analysis = pipe.analyze(image)        # caption + mood + prompt + three song lists
    for chunk in pipe.stream(prompt, duration_s=8, seed=42): ...

Each component loads on its own: one that fails (no network, missing files) is reported by `status()` with the
reason and a fix, and everything that does not need it keeps working.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .catalog import Catalog, SongMatch
from .compute import compute_thread
from .errors import ComponentLoading, ComponentUnavailable, InputError, UserFacingError
from .images import ImageSource, LoadedImage, load_image
from .mood import MoodResult
from .prompt import GENRES, MusicPrompt, build_prompt, clean_user_prompt
from .settings import Settings

CAPTION, MOOD, MUSIC, CATALOG, EMBEDDER = "caption model", "mood model", "music model", "song catalog", \
    "sentence embedder"
COMPONENTS = (CATALOG, EMBEDDER, MOOD, CAPTION, MUSIC)  # loading order: cheapest and most useful first


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str  # waiting | loading | ready | failed
    detail: str = ""
    seconds: float | None = None


@dataclass(frozen=True)
class Analysis:
    caption: str
    mood: MoodResult
    prompt: MusicPrompt
    songs_by_features: list[SongMatch]
    songs_by_lyrics: list[SongMatch]
    songs_fused: list[SongMatch]
    notes: tuple[str, ...] = ()
    image_digest: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "caption": self.caption, "emotion": self.mood.emotion, "confidence": self.mood.confidence,
            "emotion_scores": self.mood.emotion_scores, "features": self.mood.features,
            "mood_predictor": self.mood.predictor, "prompt": self.prompt.text, "genre": self.prompt.genre,
            "songs_by_features": [s.to_dict() for s in self.songs_by_features],
            "songs_by_lyrics": [s.to_dict() for s in self.songs_by_lyrics],
            "songs_fused": [s.to_dict() for s in self.songs_fused],
            "notes": list(self.notes), "timings": self.timings,
        }


@dataclass
class _Slot:
    state: str = "waiting"
    value: object = None
    error: str = ""
    seconds: float | None = None
    detail: str = ""
    ready: threading.Event = field(default_factory=threading.Event)


class Pipeline:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self._slots = {name: _Slot() for name in COMPONENTS}
        self._thread: threading.Thread | None = None
        self._cache: OrderedDict[tuple, Analysis] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._compute = compute_thread()
        self.runtime = None

    # -- loading --------------------------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        """Begin loading every component in a background thread (idempotent)."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load_all, name="pipeline-loader", daemon=True)
                self._thread.start()
        return self

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self._slots.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not slot.ready.wait(remaining):
                return False
        return True

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
            slot.state, slot.error = "failed", _explain(exc, self.settings.hf_token)
        finally:
            slot.seconds = round(time.monotonic() - started, 2)
            slot.ready.set()

    def _demo_paths(self):
        from .demo_models import ensure_demo_models

        return ensure_demo_models(self.settings.cache_dir)

    def _model_path(self, kind: str, name: str) -> tuple[Path, str]:
        from .artifacts import ArtifactSpec, resolve

        model_id = getattr(self.settings, f"{kind}_model")
        if self.settings.demo and kind in ("caption", "clip", "music"):
            path = getattr(self._demo_paths(), kind)
            return path, f"tiny random-weight demo {kind} model"
        revision = self.settings.revision_for(kind)
        resolved = resolve(ArtifactSpec(name, model_id, revision), token=self.settings.hf_token or None)
        return resolved.path, f"{model_id} ({resolved.source})"

    def _load_catalog(self):
        catalog = Catalog.load(self.settings.index_dir, embedder_factory=lambda: self._get(EMBEDDER))
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
        from .musicgen import MusicGenerator

        path, detail = self._model_path("music", MUSIC)
        generator = MusicGenerator.load(
            path, device=self.runtime.device, dtype=self.runtime.dtype, weights=self.runtime.music_weights,
            decoder=self.settings.music_decoder, cache_dir=self.settings.cache_dir,
            native_kernels=self.settings.native_kernels, first_chunk_s=self.settings.first_chunk_s,
            stream_chunk_s=self.settings.stream_chunk_s, audio_dir=self.settings.audio_dir)
        return generator, f"{detail}, {generator.backend} decoder, {generator.weights} weights"

    def _await(self, *names: str) -> None:
        """Wait (off the compute thread, up to the load-wait setting) for components still loading."""
        self.start()
        deadline = time.monotonic() + self.settings.load_wait_s
        for name in names:
            self._slots[name].ready.wait(max(0.0, deadline - time.monotonic()))

    def _get(self, name: str, wait_s: float | None = None):
        self.start()
        slot = self._slots[name]
        if wait_s is None:
            # on the compute thread, waiting would hold up every other request: callers wait beforehand
            wait_s = 0.0 if self._compute.is_current() else self.settings.load_wait_s
        if not slot.ready.wait(wait_s):
            raise ComponentLoading(name)
        if slot.state == "failed":
            raise ComponentUnavailable(name, slot.error)
        return slot.value

    def status(self) -> list[ComponentStatus]:
        return [ComponentStatus(name=name, state=slot.state, detail=slot.error or slot.detail, seconds=slot.seconds)
                for name, slot in self._slots.items()]

    # -- single steps ---------------------------------------------------------------------------------------------
    def load_image(self, source: ImageSource) -> LoadedImage:
        s = self.settings
        return load_image(source, max_pixels=s.max_image_pixels, max_side=s.max_image_side,
                          max_bytes=int(s.max_upload_mb * 1e6))

    def _image(self, image: ImageSource | LoadedImage) -> LoadedImage:
        return image if isinstance(image, LoadedImage) else self.load_image(image)

    def caption(self, image: ImageSource | LoadedImage, prefix: str | None = None) -> str:
        loaded = self._image(image)
        captioner = self._get(CAPTION)
        return self._compute.run(captioner.caption, [loaded.image], prefix=prefix)[0]

    def mood(self, image: ImageSource | LoadedImage) -> MoodResult:
        loaded = self._image(image)
        encoder, predictor = self._get(MOOD)
        return self._compute.run(lambda: predictor.predict(encoder.embed([loaded.image]), [loaded.image])[0])

    def prompt(self, caption: str, mood: MoodResult, genre: str | None = None, extra: str | None = None) -> MusicPrompt:
        if genre and genre.strip().lower() not in GENRES:
            raise InputError(f"Unknown genre {genre!r}. Choose one of: {', '.join(GENRES)}.")
        return build_prompt(caption, mood, genre=genre, extra=extra, max_chars=self.settings.max_prompt_chars)

    def _check_k(self, k) -> int:
        try:
            value = float(k)
        except (TypeError, ValueError):
            raise InputError(f"k must be a whole number, got {k!r}.") from None
        if not math.isfinite(value) or value != int(value) or not 1 <= value <= self.settings.max_k:
            raise InputError(f"k must be a whole number from 1 to {self.settings.max_k}, got {k!r}.")
        return int(value)

    def recommend(self, text: str | None = None, k: int = 10,
                  features: Mapping[str, float] | Sequence[float] | None = None) -> dict[str, list[SongMatch]]:
        """Songs for free text (by lyrics) and, when features are given, by audio features and fused."""
        k = self._check_k(k)
        catalog: Catalog = self._get(CATALOG)
        cleaned, _ = clean_user_prompt(text or "", self.settings.max_prompt_chars)
        if not cleaned and features is None:
            raise InputError("Give some text (or audio features) to recommend songs for.")
        if cleaned:
            self._await(EMBEDDER)
        if features is None:
            return {"songs_by_lyrics": self._compute.run(catalog.search_lyrics, cleaned, k=k)}
        by_features, by_lyrics, fused = self._compute.run(catalog.recommend, features, cleaned or None, k=k)
        out = {"songs_by_features": by_features, "songs_fused": fused}
        if cleaned:
            out["songs_by_lyrics"] = by_lyrics
        return out

    # -- analyze --------------------------------------------------------------------------------------------------
    def analyze(self, image: ImageSource | LoadedImage, *, k: int = 10, genre: str | None = None,
                extra: str | None = None, caption: str | None = None) -> Analysis:
        """Caption, mood, prompt and the three song lists for a photo; cached per image content and options.

        `caption` replaces the model's caption (the user edited it)."""
        k = self._check_k(k)
        self._await(MOOD, CAPTION, CATALOG, EMBEDDER)
        return self._compute.run(self._analyze, image, k, genre, extra, caption)

    def _analyze(self, image, k: int, genre: str | None, extra: str | None, caption: str | None) -> Analysis:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        loaded = self._image(image)
        timings["image_s"] = round(time.perf_counter() - started, 4)
        caption_text = None
        if caption is not None:
            caption_text, _ = clean_user_prompt(caption, self.settings.max_prompt_chars)
            caption_text = caption_text or None
        key = (loaded.digest, k, (genre or "").lower(), extra or "", caption_text, self.settings.mood_predictor,
               self.settings.caption_model, self.settings.clip_model, self.settings.demo)
        if self.settings.analyze_cache_size:
            with self._cache_lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
        notes = list(loaded.notes)
        t = time.perf_counter()
        mood = self.mood(loaded)
        timings["mood_s"] = round(time.perf_counter() - t, 4)
        if caption_text is None:
            t = time.perf_counter()
            try:
                caption_text = self.caption(loaded)
            except (ComponentUnavailable, ComponentLoading) as exc:
                notes.append(f"{exc} The songs below come from the photo's mood alone.")
                caption_text = ""
            timings["caption_s"] = round(time.perf_counter() - t, 4)
        music_prompt = self.prompt(caption_text, mood, genre=genre, extra=extra)
        t = time.perf_counter()
        by_features, by_lyrics, fused = self._songs_for(caption_text, mood, k, notes)
        timings["recommend_s"] = round(time.perf_counter() - t, 4)
        timings["analyze_s"] = round(time.perf_counter() - started, 4)
        result = Analysis(caption=caption_text, mood=mood, prompt=music_prompt, songs_by_features=by_features,
                          songs_by_lyrics=by_lyrics, songs_fused=fused, notes=tuple(notes),
                          image_digest=loaded.digest, timings=timings)
        if self.settings.analyze_cache_size:
            with self._cache_lock:
                self._cache[key] = result
                while len(self._cache) > self.settings.analyze_cache_size:
                    self._cache.popitem(last=False)
        return result

    def songs_for_text(self, caption: str, mood: MoodResult, k: int = 10) -> tuple[list, list, list, list[str]]:
        """The three song lists for an edited caption ("regenerate from my text")."""
        k = self._check_k(k)
        notes: list[str] = []
        self._await(CATALOG, EMBEDDER)
        text = clean_user_prompt(caption, self.settings.max_prompt_chars)[0]
        return (*self._compute.run(self._songs_for, text, mood, k, notes), notes)

    def _songs_for(self, caption: str, mood: MoodResult, k: int, notes: list[str]):
        try:
            catalog: Catalog = self._get(CATALOG)
        except UserFacingError as exc:
            notes.append(str(exc))
            return [], [], []
        query = lyric_query(caption, mood)
        try:
            by_features, by_lyrics, fused = catalog.recommend(mood.features, query, k=k)
        except UserFacingError as exc:
            notes.append(f"Lyric search is unavailable: {exc}")
            by_features, by_lyrics, fused = catalog.recommend(mood.features, None, k=k)
        return by_features, by_lyrics, fused

    # -- music ----------------------------------------------------------------------------------------------------
    def music_request(self, prompt: str, duration_s, seed, temperature=1.0, top_k=250, top_p=0.0,
                      guidance_scale=3.0):
        from .musicgen import MusicRequest

        s = self.settings
        text, truncated = clean_user_prompt(prompt or "", s.max_prompt_chars)
        if not text:
            raise InputError("The music prompt is empty. Analyze a photo or type a description.")
        duration = _number("duration_s", duration_s)
        if not s.min_duration_s <= duration <= s.max_duration_s:
            raise InputError(f"duration_s must be between {s.min_duration_s:g} and {s.max_duration_s:g} seconds, "
                             f"got {duration:g}.")
        seed_value = _number("seed", seed)
        if seed_value != int(seed_value) or not 0 <= seed_value < 2 ** 63:
            raise InputError(f"seed must be a whole number from 0 to 2^63-1, got {seed!r}.")
        temperature = _number("temperature", temperature)
        if not 0.05 <= temperature <= 5.0:
            raise InputError(f"temperature must be between 0.05 and 5, got {temperature:g}.")
        top_k_value = _number("top_k", top_k)
        if top_k_value != int(top_k_value) or not 0 <= top_k_value <= 2048:
            raise InputError(f"top_k must be a whole number from 0 (off) to 2048, got {top_k!r}.")
        top_p = _number("top_p", top_p)
        if not 0.0 <= top_p <= 1.0:
            raise InputError(f"top_p must be between 0 (off) and 1, got {top_p:g}.")
        guidance = _number("guidance_scale", guidance_scale)
        if not 1.0 <= guidance <= 15.0:
            raise InputError(f"guidance_scale must be between 1 and 15, got {guidance:g}.")
        request = MusicRequest(prompt=text, duration_s=duration, seed=int(seed_value), temperature=temperature,
                               top_k=int(top_k_value), top_p=top_p, guidance_scale=guidance)
        return request, truncated

    def generate(self, prompt: str, duration_s=8.0, seed=0, *, temperature=1.0, top_k=250, top_p=0.0,
                 guidance_scale=3.0, cancel: threading.Event | None = None, write: bool = True):
        request, _ = self.music_request(prompt, duration_s, seed, temperature, top_k, top_p, guidance_scale)
        generator = self._get(MUSIC)
        self._prune_audio()
        return self._compute.run(generator.generate, request, cancel=cancel, write=write)

    def stream(self, prompt: str, duration_s=8.0, seed=0, *, temperature=1.0, top_k=250, top_p=0.0,
               guidance_scale=3.0, cancel: threading.Event | None = None) -> Iterator:
        request, _ = self.music_request(prompt, duration_s, seed, temperature, top_k, top_p, guidance_scale)
        generator = self._get(MUSIC)
        self._prune_audio()
        # chunk by chunk on the compute thread: an Analyze from another visitor can run between two chunks
        return self._compute.iterate(generator.stream(request, cancel=cancel))

    def save_audio(self, samples, sample_rate: int) -> Path:
        from .audio import write_wav

        return write_wav(samples, sample_rate, self.settings.audio_dir)

    def _prune_audio(self) -> None:
        from .audio import prune_folder

        prune_folder(self.settings.audio_dir, self.settings.temp_max_age_s, self.settings.temp_max_mb * 1_000_000)


def lyric_query(caption: str, mood: MoodResult) -> str:
    """What lyric search looks for: the caption plus the mood in words."""
    from .prompt import EMOTION_WORDS

    words = ", ".join((mood.emotion,) + EMOTION_WORDS.get(mood.emotion, ()))
    return f"{caption}. {words}" if caption else words


def _number(name: str, value) -> float:
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    return number


def _explain(exc: Exception, token: str | None) -> str:
    text = str(exc) or type(exc).__name__
    if token:
        text = text.replace(token, "<HF_TOKEN>")
    if not isinstance(exc, UserFacingError) and "Could not load" not in text:
        text = f"{type(exc).__name__}: {text}"
    return text[:1200]


_PIPELINES: dict[Settings, Pipeline] = {}
_PIPELINES_LOCK = threading.Lock()


def get_pipeline(settings: Settings | None = None, start: bool = True) -> Pipeline:
    """The shared pipeline for these settings (one per process and settings)."""
    settings = settings or Settings.from_env()
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(settings)
        if pipe is None:
            pipe = _PIPELINES[settings] = Pipeline(settings)
    return pipe.start() if start else pipe

