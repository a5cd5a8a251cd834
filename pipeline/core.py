"""The one object the UI talks to: models and catalog loaded once, in the background, behind typed calls.

    pipe = get_pipeline()                 # cached per settings; starts loading in a background thread
    analysis = pipe.analyze(image)        # caption + mood + prompt + three song lists
    for chunk in pipe.stream(prompt, duration_s=8, seed=42): ...

This file is the facade only: loading and status live in `components.py`, the checks of each request in its
domain type (`music.Sampling`, `music.MusicRequest`, `validate.check_k`), the work in the modules they name.
Every model call runs on the single compute thread (`compute.py`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .catalog import Catalog, SongMatch
from .components import CAPTION, CATALOG, EMBEDDER, MOOD, MUSIC, Components, ComponentStatus
from .compute import compute_thread
from .errors import ComponentLoading, ComponentUnavailable, InputError, UserFacingError
from .fairness import FairGate, Ticket
from .filters import Filters
from .images import ImageSource, LoadedImage, load_image
from .mood import MoodResult
from .music.request import DurationLimits, MusicRequest, Sampling
from .prompt import MusicPrompt, build_prompt, check_genre, clean_user_prompt
from .recommend import lyric_query
from .settings import Settings
from .validate import check_k

__all__ = ["Analysis", "ComponentStatus", "Description", "Pipeline", "get_pipeline"]


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


@dataclass(frozen=True)
class Description:
    """What a picture among several (an album's photo, a clip's scene) brings to their music: no song lists, which
    the caller searches once for all the pictures together."""

    caption: str
    mood: MoodResult
    prompt: MusicPrompt
    notes: tuple[str, ...] = ()  # what the pictures' music could not take into account (no captioner)


class _AnalysisCache:
    """Analyze results per image content and cleaned options, bounded by entries and by bytes (an entry's size is
    that of its JSON form), so that large free-text inputs cannot pin memory."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple, tuple[Analysis, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Analysis | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: tuple, value: Analysis) -> None:
        size = len(json.dumps(value.to_dict(), default=str)) + sum(len(str(part)) for part in key)
        if not self.max_entries or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


CLIPS_KEPT = 16  # recent clips that can be extended (each holds a few seconds of codes and a codec state: ~1 MB)


class _RecentClips:
    """Where recent clips ended (`music.generator.Continuation`), by clip id, least recently used dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, clip_id: str, continuation) -> None:
        if continuation is None:
            return
        with self._lock:
            self._items[clip_id] = continuation
            self._items.move_to_end(clip_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, clip_id: str):
        with self._lock:
            item = self._items.get(str(clip_id))
            if item is None:
                raise InputError("That clip can no longer be extended: the app keeps the last "
                                 f"{self.size} clips. Generate a new one.")
            self._items.move_to_end(str(clip_id))
            return item


class Pipeline:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self._compute = compute_thread()
        self._components = Components(self.settings, self._compute.is_current)
        self._cache = _AnalysisCache(self.settings.analyze_cache_size, int(self.settings.analyze_cache_mb * 1e6))
        self.durations = DurationLimits(self.settings.min_duration_s, self.settings.max_duration_s)
        self._clips = _RecentClips(CLIPS_KEPT)
        self._batching_lock = threading.Lock()
        # the fair line admits as many requests as the engine decodes together
        self._music_gate = FairGate(self.settings.max_batch, self.settings.client_max_jobs)

    # -- loading --------------------------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        """Begin loading every component in a background thread (idempotent)."""
        self._components.start()
        return self

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        return self._components.wait_until_ready(timeout)

    def component(self, name: str, wait_s: float | None = None):
        """A loaded component by name (`components.COMPONENTS`): the catalog, the music generator, ... — for
        benchmarks and tests that need to reach past the facade."""
        return self._components.get(name, wait_s)

    _get = component  # the facade's own short name

    def _await(self, *names: str) -> None:
        self._components.wait_for(*names)

    def status(self) -> list[ComponentStatus]:
        return self._components.status()

    @property
    def runtime(self):
        return self._components.runtime

    @property
    def cached_analyses(self) -> int:
        return len(self._cache)

    @property
    def cached_analysis_bytes(self) -> int:
        return self._cache.nbytes

    def clean_text(self, text: str | None) -> tuple[str, bool]:
        """Free text from a visitor: control characters out, whitespace collapsed, cut at the prompt limit."""
        return clean_user_prompt(text or "", self.settings.max_prompt_chars)

# -- single steps ---------------------------------------------------------------------------------------------
    def load_image(self, source: ImageSource) -> LoadedImage:
        s = self.settings
        return load_image(source, max_pixels=s.max_image_pixels, max_side=s.max_image_side,
                          max_bytes=s.max_upload_bytes)

    def load_image_url(self, url: str) -> LoadedImage:
        """A photo from a link: public addresses only, bounded in time and size, decoded like an upload
        (`url_fetch.py` says how)."""
        from .url_fetch import fetch_image

        return fetch_image(url, self.settings)

    def image_from(self, image: ImageSource | None, image_url: str | None) -> ImageSource | LoadedImage:
        """Exactly one of an uploaded image or a link, as API callers give them."""
        has_url = bool((image_url or "").strip())
        if has_url and image:
            raise InputError("Give either an image or an image_url, not both.")
        if not has_url and not image:
            raise InputError("No image was given. Send a photo (JPEG, PNG, WebP or GIF) or an image_url.")
        return self.load_image_url(image_url) if has_url else image

    def _image(self, image: ImageSource | LoadedImage) -> LoadedImage:
        return image if isinstance(image, LoadedImage) else self.load_image(image)

    def caption(self, image: ImageSource | LoadedImage, prefix: str | None = None) -> str:
        loaded = self._image(image)
        captioner = self._get(CAPTION)
        return self._compute.run(captioner.caption, [loaded.image], prefix=prefix)[0]

    def mood(self, image: ImageSource | LoadedImage) -> MoodResult:
        loaded = self._image(image)
        return self._compute.run(self._moods, [loaded.image])[0]

    def _moods(self, pictures: list) -> list[MoodResult]:
        """One mood per picture, each what the picture gets alone: the CLIP encoder batches only where that cannot
        change a result (`ClipImageEncoder.embed`); the head is fp32 (batch-size dependent in the last bits) and
        costs nothing, so it takes one picture a call."""
        encoder, predictor = self._get(MOOD)
        return [predictor.predict(row[None], [picture])[0]
                for row, picture in zip(encoder.embed(pictures), pictures)]

    def prompt(self, caption: str, mood: MoodResult, genre: str | None = None, extra: str | None = None) -> MusicPrompt:
        return build_prompt(caption, mood, genre=check_genre(genre), extra=extra, max_chars=self.settings.max_prompt_chars)

    def recommend(self, text: str | None = None, k: int = 10,
                  features: Mapping[str, float] | Sequence[float] | None = None, filters=None) -> dict[str, list]:
        """Songs for free text (by lyrics) and, when features are given, by audio features and fused; all among the
        songs that pass `filters` (`pipeline.filters`). `notes` says when the filters leave fewer than k."""
        k = check_k(k, self.settings.max_k)
        filters = Filters.from_json(filters)
        catalog: Catalog = self._get(CATALOG)
        cleaned, _ = self.clean_text(text)
        if not cleaned and features is None:
            raise InputError("Give some text (or audio features) to recommend songs for.")
        if cleaned:
            self._await(EMBEDDER)
        note = catalog.filter_note(filters, k, features=features is not None, lyrics=bool(cleaned))
        notes = {"notes": [note]} if note else {}
        if features is None:
            return {"songs_by_lyrics": self._compute.run(catalog.search_lyrics, cleaned, k=k, filters=filters),
                    **notes}
        by_features, by_lyrics, fused = self._compute.run(catalog.recommend, features, cleaned or None, k=k,
                                                          filters=filters)
        out = {"songs_by_features": by_features, "songs_fused": fused}
        if cleaned:
            out["songs_by_lyrics"] = by_lyrics
        return {**out, **notes}

    # -- analyze --------------------------------------------------------------------------------------------------
    def analyze(self, image: ImageSource | LoadedImage, *, k: int = 10, genre: str | None = None,
                extra: str | None = None, caption: str | None = None, filters=None) -> Analysis:
        """Caption, mood, prompt and the three song lists for a photo; cached per image content and options.

        `caption` replaces the model's caption (the user edited it); `filters` (`pipeline.filters`) narrow the
        song lists."""
        k = check_k(k, self.settings.max_k)
        filters = Filters.from_json(filters)
        # every free-text input is cleaned and cut here, before it reaches a cache key or a model
        genre = check_genre(self.clean_text(genre)[0])
        extra = self.clean_text(extra)[0] or None
        caption = self.clean_text(caption)[0] or None if caption is not None else None
        self._await(MOOD, CAPTION, CATALOG, EMBEDDER)
        return self._compute.run(self._analyze, image, k, genre, extra, caption, filters)

    def _analyze(self, image, k: int, genre: str | None, extra: str | None, caption_text: str | None,
                 filters: Filters) -> Analysis:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        loaded = self._image(image)
        timings["image_s"] = round(time.perf_counter() - started, 4)
        key = (loaded.digest, k, genre or "", extra or "", caption_text, filters, self.settings.mood_predictor,
               self.settings.caption_model, self.settings.clip_model, self.settings.demo)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
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
        by_features, by_lyrics, fused = self._songs_for(caption_text, mood, k, notes, filters)
        timings["recommend_s"] = round(time.perf_counter() - t, 4)
        timings["analyze_s"] = round(time.perf_counter() - started, 4)
        result = Analysis(caption=caption_text, mood=mood, prompt=music_prompt, songs_by_features=by_features,
                          songs_by_lyrics=by_lyrics, songs_fused=fused, notes=tuple(notes),
                          image_digest=loaded.digest, timings=timings)
        self._cache.put(key, result)
        return result

    def describe(self, images: Sequence[ImageSource | LoadedImage]) -> list[Description]:
        """Caption, mood and prompt for several pictures at once, each exactly what `analyze` gives it: the
        captioner and the mood encoder take them as one batch where that cannot change a result (see
        `Captioner.caption`, `ClipImageEncoder.embed`), and no song list is searched per picture."""
        if not images:
            return []
        self._await(MOOD, CAPTION)
        return self._compute.run(self._describe, list(images))

    def _describe(self, images: list) -> list[Description]:
        loaded = [self._image(image) for image in images]
        pictures = [item.image for item in loaded]
        moods = self._moods(pictures)
        notes: list[str] = []
        try:
            captions = self._get(CAPTION).caption(pictures)
        except (ComponentUnavailable, ComponentLoading) as exc:
            notes.append(f"{exc} The music follows the pictures' mood alone.")
            captions = [""] * len(pictures)
        return [Description(caption, mood, self.prompt(caption, mood), tuple(notes))
                for caption, mood in zip(captions, moods)]

    def songs_for_text(self, caption: str, mood: MoodResult, k: int = 10,
                       filters=None) -> tuple[list, list, list, list[str]]:
        """The three song lists for an edited caption ("regenerate from my text") or changed filters."""
        k = check_k(k, self.settings.max_k)
        filters = Filters.from_json(filters)
        notes: list[str] = []
        self._await(CATALOG, EMBEDDER)
        text = self.clean_text(caption)[0]
        return (*self._compute.run(self._songs_for, text, mood, k, notes, filters), notes)

    def _songs_for(self, caption: str, mood: MoodResult, k: int, notes: list[str], filters: Filters):
        try:
            catalog: Catalog = self._get(CATALOG)
        except UserFacingError as exc:
            notes.append(str(exc))
            return [], [], []
        # first: an unknown genre is the person's mistake, raised as such, not taken for a broken lyric search
        note = catalog.filter_note(filters, k)
        query = lyric_query(caption, mood.emotion)
        try:
            by_features, by_lyrics, fused = catalog.recommend(mood.features, query, k=k, filters=filters)
        except UserFacingError as exc:
            notes.append(f"Lyric search is unavailable: {exc}")
            by_features, by_lyrics, fused = catalog.recommend(mood.features, None, k=k, filters=filters)
        if note:
            notes.append(note)
        return by_features, by_lyrics, fused

    # -- music ----------------------------------------------------------------------------------------------------
    def music_request(self, prompt: str | None, duration_s=None, seed=0, *, endless: bool = False,
                      continue_from: str | None = None, **sampling) -> tuple[MusicRequest, bool]:
        """A checked request and whether the prompt was cut; `sampling` takes `Sampling`'s fields (temperature,
        top_k, top_p, guidance_scale), missing ones at their defaults.

        `endless`: until cancelled, at most `endless_max_s` (duration_s is ignored). `continue_from`: the id of a
        recent clip (`clip_id` of its chunks or of `generate`'s result, or the path or name of its saved WAV) that
        this one continues; an empty prompt then keeps that clip's prompt."""
        from .audio import clip_id_in

        earlier = self._clips.get(clip_id_in(continue_from)) if continue_from is not None else None
        text, truncated = self.clean_text(prompt)
        if not text and earlier is not None:
            text = earlier.prompt
        limits = DurationLimits(self.durations.low, self.settings.endless_max_s) if endless else self.durations
        duration = limits.high if endless else self.settings.default_duration_s if duration_s is None else duration_s
        request = MusicRequest.checked(text, duration, seed, Sampling.checked(**sampling), limits)
        return request.replace(continue_from=earlier), truncated

    def music_seconds(self, seconds: float) -> float:
        """How long music asked for `seconds` lasts: the model makes whole frames (50 a second for MusicGen), so
        an album's pictures can be timed to the music before it is made."""
        generator = self._get(MUSIC)
        return generator.n_frames(float(seconds)) / generator.frame_rate

    def music_ticket(self, client: str, seconds: float | None = None) -> Ticket:
        """A place in the fair line for music (`fairness.py`) asking for `seconds` of music (None: endless): hold it
        in a `with` block around the generation, touching it with the seconds made; raises ClientBusy when this
        client already holds its share."""
        return self._music_gate.enter(client, seconds)

    @property
    def music_line(self) -> dict[str, int]:
        """How many music requests are running and waiting (for the status panel and /status)."""
        return self._music_gate.counts

    def generate(self, prompt: str | None, duration_s=None, seed=0, *, cancel: threading.Event | None = None,
                 write: bool = True, continue_from: str | None = None, **sampling):
        """The whole clip (`GeneratedMusic`; its `clip_id` can be extended later)."""
        request, _ = self.music_request(prompt, duration_s, seed, continue_from=continue_from, **sampling)
        generator = self._music()
        self._prune_audio()
        if generator.engine is not None:  # decoded in the shared batch; model work goes to the compute thread
            music = generator.generate(request, cancel=cancel, write=write)
        else:
            music = self._compute.run(generator.generate, request, cancel=cancel, write=write)
        self._clips.put(music.clip_id, music.continuation)
        return music

    def stream(self, prompt: str | None, duration_s=None, seed=0, *, cancel: threading.Event | None = None,
               endless: bool = False, continue_from: str | None = None, **sampling) -> Iterator:
        """`AudioChunk`s as they are made; every chunk carries the clip's `clip_id`, which `extend` takes once the
        last chunk has arrived. `endless=True` streams until `cancel` is set (or `endless_max_s`)."""
        request, _ = self.music_request(prompt, duration_s, seed, endless=endless, continue_from=continue_from,
                                        **sampling)
        generator = self._music()
        self._prune_audio()
        if generator.engine is not None:  # decoded in the shared batch, step by step on the compute thread
            return self._remember_clip(generator.stream(request, cancel=cancel))
        # chunk by chunk on the compute thread: an Analyze from another visitor can run between two chunks
        return self._remember_clip(self._compute.iterate(generator.stream(request, cancel=cancel)))

    def extend(self, clip_id: str, seconds=None, prompt: str | None = None, seed=0, *,
               cancel: threading.Event | None = None, endless: bool = False, **sampling) -> Iterator:
        """Continue a recent clip by `seconds` (or endlessly), streamed: the music goes on from where the clip
        ended, without a seam; a new `prompt` moves it towards another mood (None = the clip's own prompt).
        The chunks carry a new clip_id, which can be extended in turn."""
        return self.stream(prompt, seconds, seed, cancel=cancel, endless=endless, continue_from=clip_id, **sampling)

    def music_queue(self):
        """How busy the music engine is: `EngineStatus(running, waiting, max_batch)` — requests decoding together
        now, requests in line for a place (the UI shows a newcomer its place: waiting + 1 when running ==
        max_batch) — or None while the model loads or where requests run one at a time (reference backend)."""
        try:
            generator = self._get(MUSIC, 0.0)
        except UserFacingError:
            return None
        engine = self._batched(generator).engine
        return engine.status() if engine is not None else None

    def _music(self):
        return self._batched(self._get(MUSIC))

    def _batched(self, generator):
        with self._batching_lock:
            if generator.engine is None and self.settings.max_batch > 0:
                generator.serve_batched(self.settings.max_batch, self._compute.run)
        return generator

    def _remember_clip(self, chunks: Iterator) -> Iterator:
        try:
            for chunk in chunks:
                if chunk.continuation is not None:
                    self._clips.put(chunk.clip_id, chunk.continuation)
                yield chunk
        finally:
            chunks.close()

    def save_audio(self, parts: Sequence, sample_rate: int, after: str | Path | None = None,
                   clip_id: str | None = None) -> Path:
        """Streamed chunks (in order) joined into one WAV file of their own in the audio folder; `after`, an
        earlier WAV of this folder (the clip an extension continues), goes first when it is still there; a whole
        clip's `clip_id` goes into the file name, so the file alone can be extended later."""
        import numpy as np

        from .audio import read_wav, write_wav

        samples = np.concatenate(list(parts))
        earlier = Path(after) if after else None
        if earlier is not None and earlier.parent.resolve() == self.settings.audio_dir.resolve() and earlier.is_file():
            samples = np.concatenate([read_wav(earlier, sample_rate), samples])
        return write_wav(samples, sample_rate, self.settings.audio_dir, clip_id=clip_id)

    # -- video ----------------------------------------------------------------------------------------------------
    # MP4s go to the audio folder, so the janitor bounds them with the WAVs (age and total size)
    def share_video(self, image: ImageSource, audio, *, square: bool = False, title: str | None = None,
                    caption: str | None = None, progress=None, cancel: threading.Event | None = None):
        """The photo with a slow pan/zoom for the length of `audio` (a WAV path or (samples, rate)), the title and
        caption over it when given: a shareable MP4 (`media.Rendered`). No music is made here."""
        from . import media

        self._prune_audio()
        return media.photo_video(image, audio, self.settings.audio_dir, square=square, title=title,
                                 caption=caption, limits=media.VideoLimits.from_settings(self.settings),
                                 progress=progress, cancel=cancel)

    def album(self, images: Sequence[ImageSource], duration_s, seed=0, *, square: bool = False,
              client: str = "local", progress=None, cancel: threading.Event | None = None, listen=None):
        """2–10 photos → a slideshow whose music follows each photo's prompt, moving on at each photo's turn
        without a cut (`soundtrack.Soundtrack`: the MP4, each photo's caption and prompt, songs for the whole
        album). The music waits in the fair line as `client`; `progress(fraction, message)`; `listen(samples,
        rate)` hears the music while it is made, before the MP4 is finished."""
        from . import soundtrack

        self._prune_audio()
        return soundtrack.album(self, images, duration_s, seed, square=square, client=client, progress=progress,
                                cancel=cancel, listen=listen)

    def video_soundtrack(self, video, seed=0, keep_original_audio: bool = False, *, client: str = "local",
                         progress=None, cancel: threading.Event | None = None, listen=None):
        """A clip (a path) with new music that changes at its scene cuts (`soundtrack.Soundtrack`); its own
        sound dropped or kept under the music; `listen` as for `album`. Refuses unusable clips with a message the
        visitor can act on."""
        from . import soundtrack

        self._prune_audio()
        return soundtrack.video_soundtrack(self, video, seed, keep_original_audio, client=client,
                                           progress=progress, cancel=cancel, listen=listen)

    def _prune_audio(self) -> None:
        from .storage import prune_folder

        prune_folder(self.settings.audio_dir, self.settings.temp_max_age_s, self.settings.temp_max_mb * 1_000_000)

    def janitor(self, upload_folder: Path):
        """Bounds for the generated clips and for the web server's upload folder (started by the app)."""
        from .storage import Bound, Janitor

        s = self.settings
        return Janitor([Bound(s.audio_dir, s.temp_max_age_s, s.temp_max_mb * 1_000_000),
                        Bound(Path(upload_folder), s.upload_max_age_s, int(s.upload_max_mb * 1_000_000))],
                       every_s=s.janitor_every_s)


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

