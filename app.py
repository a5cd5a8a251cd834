"""Picture Soundtrack: a photo in, a caption, a mood, an original music clip and real songs out.

    python app.py            # the Space UI on http://127.0.0.1:7860 with the real models
    python app.py --demo     # tiny random-weight models built locally: runs with no network

This file is the UI and nothing else: the layout (`build_layout`), the handlers the page calls (`Handlers`), the
typed API and MCP tools (`Api`), and the wiring between them (`wire`). Everything they call is `pipeline/`'s
facade, `pipeline.core.Pipeline`.
"""

from __future__ import annotations

import argparse
import functools
import html
import inspect
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gradio as gr
import plotly.graph_objects as go
from gradio.components.api_component import Api as ApiParameter
from gradio.data_classes import FileData

from pipeline import catalog_schema
from pipeline.audio import joined_wav_bytes, wav_bytes
from pipeline.components import missing_models_message, status_report
from pipeline.core import Pipeline, get_pipeline
from pipeline.errors import Cancelled, ComponentLoading, ComponentUnavailable, UserFacingError
from pipeline.features import BOUNDS
from pipeline.filters import POPULARITY, YEARS
from pipeline.genres import families as genre_families
from pipeline.mood import MoodResult
from pipeline.music import Sampling
from pipeline.prompt import GENRES
from pipeline.settings import Settings
from pipeline.url_fetch import refuse_remote_path

try:  # ZeroGPU: model calls borrow a GPU for their duration; elsewhere spaces.GPU is a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    def gpu(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda fn: fn)

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = sorted(str(p) for p in (ASSETS / "examples").glob("*.jpg"))
ALBUM_EXAMPLE = [str(ASSETS / "examples" / name) for name in ("coffee.jpg", "cat.jpg", "rocket_launch.jpg")]
CLIP_EXAMPLE = str(ASSETS / "examples" / "three-scenes.mp4")
PART_HEADERS = ["#", "From (s)", "To (s)", "Caption", "Mood", "Music prompt"]
PART_WIDTHS = ["6%", "9%", "9%", "33%", "10%", "33%"]  # long captions wrap instead of pushing the prompt away
SONG_HEADERS = ["#", "Song", "Artist", "Year", "Genre", "Score", "Why"]
SONG_TYPES = ["number", "markdown", "str", "str", "str", "number", "str"]
SONG_LISTS = (("features", "By sound", "songs-features"), ("lyrics", "By lyrics", "songs-lyrics"),
              ("fused", "Best of both", "songs-fused"))
RADAR_AXES = ("valence", "energy", "danceability", "acousticness", "instrumentalness", "speechiness", "liveness",
              "tempo", "loudness")
RADAR_LABELS = {"danceability": "dance", "acousticness": "acoustic", "instrumentalness": "instrumental",
                "speechiness": "speech", "liveness": "live", "loudness": "loud"}
# ZeroGPU lends a GPU for a declared time: model start-up plus a few seconds per second of music, capped
ZERO_GPU_BASE_S, ZERO_GPU_PER_AUDIO_S, ZERO_GPU_MAX_S = 20, 4, 300
DEFAULT_SAMPLING = Sampling()
LINE_POLL_S = 0.5  # how often a request waiting for the music engine yields (and so notices a gone client)
READER_GONE_S = 20.0  # video work whose progress nobody has read for this long stops (the fair line's lease)
VIDEO_CONCURRENCY = 2  # videos made at once: each ffmpeg encode already uses every core
log = logging.getLogger("app")


class UploadedImage(gr.Image):
    """gr.Image that hands the uploaded file to the pipeline undecoded, so that a corrupt or oversized image gets
    the pipeline's clear message (UI and API alike) instead of a decoding error inside Gradio.

    It also refuses file paths that are links: Gradio downloads a file input whose path is an http(s) URL (in
    `async_move_resource_to_block_cache`, before `preprocess`) with no size cap and only a per-read timeout.
    Photos from links go through `image_url` and the app's own fetcher (pipeline.url_fetch)."""

    is_template = True  # renders with the stock Image frontend (Gradio names it after the direct base class)

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        _refuse_link(url_or_file_path)
        return await super().async_move_resource_to_block_cache(url_or_file_path)

    def move_resource_to_block_cache(self, url_or_file_path):
        _refuse_link(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)

    def preprocess(self, payload):
        if payload is not None:
            _refuse_link(getattr(payload, "path", None))
        if payload is not None and getattr(payload, "path", None) and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return super().preprocess(payload)
        except Exception:
            raise gr.Error("The image could not be read. Upload a JPEG, PNG, WebP or GIF photo.",
                           print_exception=False) from None


def _refuse_link(path) -> None:
    try:
        refuse_remote_path(path)
    except UserFacingError as exc:
        raise gr.Error(str(exc), print_exception=False) from None


# -- error handling ------------------------------------------------------------------------------------------------

def friendly(fn):
    """Turn the pipeline's user-facing errors into gr.Error (shown in the UI, returned by the API) and anything
    unexpected into a short apology, never a traceback."""

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, UserFacingError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error("Something went wrong on our side. Please try again.", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - translated for the user
                raise translate(exc) from None
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated for the user
            raise translate(exc) from None
    return wrapper


def user_error(message: str) -> gr.Error:
    return gr.Error(message, print_exception=False)


def gpu_seconds(prompt=None, duration_s=None, *args, **kwargs) -> int:
    """ZeroGPU's time budget for one generation request (same arguments as the call it decorates)."""
    try:
        return int(min(ZERO_GPU_MAX_S, ZERO_GPU_BASE_S + ZERO_GPU_PER_AUDIO_S * float(duration_s)))
    except (TypeError, ValueError):
        return ZERO_GPU_MAX_S


# -- presentation helpers ------------------------------------------------------------------------------------------

def song_rows(songs) -> list[list]:
    rows = []
    for rank, song in enumerate(songs, start=1):
        d = song if isinstance(song, dict) else song.to_dict()
        title = _escape_markdown(d["title"])
        link = f"[{title}]({d['spotify_url']})" if spotify_id(d) else title
        rows.append([rank, link, d["artist"], d["year"] or "", genre_label(d), round(d["score"], 3), d["why"]])
    return rows


def genre_label(song: dict) -> str:
    """'album rock (rock)': the song's first fine genre and its families, each said once."""
    genre, families = song.get("genre") or "", [f for f in song.get("families") or [] if f != song.get("genre")]
    return f"{genre} ({', '.join(families)})" if genre and families else genre or ", ".join(families)


# The year sliders' span; a slider at its end means "no limit" on that side (a song of unknown year then passes).
YEAR_SLIDER = (1950, 2025)


def filters_from_controls(family, year_from, year_to, popularity_from, popularity_to) -> dict:
    """The filter controls of the Options accordion as the `filters` object of the API (`pipeline.filters`):
    a control left at its widest says nothing."""
    filters = {}
    if family:
        filters["genre"] = family
    low, high = (int(year_from or YEAR_SLIDER[0]), int(year_to or YEAR_SLIDER[1]))
    if (low, high) != YEAR_SLIDER:
        filters["years"] = [low if low > YEAR_SLIDER[0] else int(YEARS.low),
                            high if high < YEAR_SLIDER[1] else int(YEARS.high)]
    span = (float(popularity_from or 0), float(POPULARITY.high if popularity_to is None else popularity_to))
    if span != (POPULARITY.low, POPULARITY.high):
        filters["popularity"] = list(span)
    return filters


def spotify_id(song: dict | None) -> str | None:
    """The song's Spotify id if it has the shape Spotify uses (22 base-62 characters), else None: whatever a
    rebuilt catalog holds, only such an id ever reaches a link or the embedded player."""
    return catalog_schema.spotify_id((song or {}).get("spotify_id"))


def _escape_markdown(text: str) -> str:
    return "".join("\\" + ch if ch in "[]()*_`<>#|\\" else ch for ch in str(text))


def _radar_value(name: str, value) -> float | None:
    if value is None:
        return None
    lo, hi = BOUNDS[name]
    return float(min(1.0, max(0.0, (value - lo) / (hi - lo))))


def radar(features: dict | None, song: dict | None = None) -> go.Figure:
    figure = go.Figure()
    axes = list(RADAR_AXES) + [RADAR_AXES[0]]
    labels = [RADAR_LABELS.get(a, a) for a in axes]
    if features:
        values = [_radar_value(a, features.get(a)) for a in axes]
        figure.add_trace(go.Scatterpolar(r=values, theta=labels, fill="toself", name="your photo",
                                         line={"color": "#7c3aed"}))
    if song:
        values = [_radar_value(a, (song.get("features") or {}).get(a)) for a in axes]
        figure.add_trace(go.Scatterpolar(r=values, theta=labels, fill="toself", name=song["title"][:32],
                                         line={"color": "#f59e0b"}, opacity=0.7))
    # transparent, with see-through grey grid lines: the chart sits on the block's own colour in light and dark
    # mode alike (style.css gives its text the page's text colour in dark mode)
    grid = {"gridcolor": "rgba(128, 128, 128, 0.35)", "linecolor": "rgba(128, 128, 128, 0.35)"}
    figure.update_layout(polar={"radialaxis": {"visible": True, "range": [0, 1], "showticklabels": False, **grid},
                                "angularaxis": grid, "bgcolor": "rgba(128, 128, 128, 0.08)"},
                         paper_bgcolor="rgba(0, 0, 0, 0)", plot_bgcolor="rgba(0, 0, 0, 0)",
                         margin={"l": 70, "r": 70, "t": 30, "b": 30}, height=320, showlegend=True,
                         legend={"orientation": "h", "y": -0.1})
    return figure


def status_markdown(pipe: Pipeline, settings: Settings) -> str:
    icons = {"ready": "✅", "loading": "⏳", "waiting": "…", "failed": "⚠️"}
    lines = ["| part | state | details |", "|---|---|---|"]
    for item in pipe.status():
        detail = item.detail.replace("\n", " ").replace("|", "/")
        timing = f" ({item.seconds:.1f} s)" if item.seconds is not None and item.state == "ready" else ""
        lines.append(f"| {item.name} | {icons.get(item.state, '')} {item.state}{timing} | {detail[:400]} |")
    runtime = pipe.runtime
    device = f"{runtime.device}" if runtime else "starting"
    mode = "demo (random-weight models)" if settings.demo else "full models"
    return f"**Status** · mode: {mode} · device: {device}\n\n" + "\n".join(lines)


def limits_markdown(settings: Settings) -> str:
    return (f"**Limits.** Images up to {settings.max_upload_mb:g} MB and {settings.max_image_pixels / 1e6:g} "
            f"megapixels (bigger photos are downscaled to {settings.max_image_side} px before the models see them); "
            f"prompts up to {settings.max_prompt_chars} characters (longer ones are cut, with a notice); clips "
            f"{settings.min_duration_s:g}–{settings.max_duration_s:g} s; up to {settings.max_k} songs per list. "
            f"**Privacy.** Photos are analyzed in memory; the uploaded file stays on the server for at most "
            f"{settings.upload_max_age_s // 60} minutes (so that Analyze can run again) and is then deleted, as are "
            f"generated clips after {settings.temp_max_age_s // 60} minutes. A photo link is fetched once, from "
            "public addresses only. Song previews load Spotify only when you ask for them.")


def _sampling(temperature, top_k, top_p, guidance) -> dict:
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "guidance_scale": guidance}


def keep_place(ticket, chunk=None) -> None:
    """Tell the fair line this request is still being read (and, given its latest chunk, how much music it has
    made, from which the line estimates the wait of those behind); one whose place was reclaimed (its reader
    vanished for longer than the lease) stops here."""
    if ticket.expired:
        raise Cancelled("This request was dropped: nothing read its music for too long.")
    ticket.touch(None if chunk is None else chunk.start_s + chunk.samples.shape[0] / chunk.sample_rate)


class Background:
    """Long video work (`work(*args, progress=, cancel=, **kwargs)`) on a thread of its own, for a generator
    handler: iterating yields (fraction, message) as the work reports and at least every LINE_POLL_S, so the
    handler can show progress and Gradio can close it when the visitor leaves; leaving the `with` block early
    cancels the work. After the loop, `result` holds what the work returned (its exception is raised instead).

    Work whose reports nobody has taken for READER_GONE_S (a server that stopped reading without closing the
    handler) is cancelled, as the fair line reclaims an untouched ticket.

    `music=True` also hands the work a `listen(samples, rate)` callback; `take_music` then gives what it heard
    since the last call. Unlike progress reports, no chunk of music is ever dropped."""

    def __init__(self, work, *args, music: bool = False, **kwargs):
        self.cancel = threading.Event()
        self.result = None
        self._updates: queue.Queue = queue.Queue()
        self._music: queue.Queue = queue.Queue()
        if music:
            kwargs["listen"] = self._hear
        self._error: BaseException | None = None
        self._pulled = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(work, args, kwargs), daemon=True,
                                        name="video-work")

    def _report(self, fraction: float, message: str | None = None) -> None:
        if time.monotonic() - self._pulled > READER_GONE_S:
            self.cancel.set()
        self._updates.put((float(fraction), message or f"Making the video: {100 * fraction:.0f} %"))

    def _hear(self, samples, rate: int) -> None:
        self._music.put((samples, rate))

    def take_music(self) -> bytes | None:
        """The music heard since the last call as one WAV, or None."""
        chunks, rate = [], None
        while not self._music.empty():
            samples, rate = self._music.get_nowait()
            chunks.append(samples)
        return joined_wav_bytes(chunks, rate) if chunks else None

    def _run(self, work, args, kwargs) -> None:
        try:
            self.result = work(*args, progress=self._report, cancel=self.cancel, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised again on the handler's thread
            self._error = exc
        finally:
            self._updates.put(None)

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.cancel.set()

    def __iter__(self) -> Iterator[tuple[float, str]]:
        latest = (0.0, "Starting…")
        while True:
            try:
                item = self._updates.get(timeout=LINE_POLL_S)
            except queue.Empty:
                item = latest
            # only the newest report is shown: ffmpeg reports five times a second
            done = item is None
            while not done and not self._updates.empty():
                newer = self._updates.get_nowait()
                done, item = newer is None, item if newer is None else newer
            if item is not None:
                latest = item
                yield latest
                self._pulled = time.monotonic()
            if done:
                break
        self._thread.join()
        if self._error is not None:
            raise self._error


def line_status(ticket) -> str:
    """What a waiting visitor sees: how many requests are ahead (being made and waiting) and the expected wait."""
    return f"⏳ {ticket.line().text()} It starts by itself; keep this page open."


def client_id(request: gr.Request | None, trusted_proxies: int = 1) -> str:
    """Who is asking, for the fair line. Behind `trusted_proxies` proxies (a Space has one) the client's address is
    the one the outermost of them appended to X-Forwarded-For — hops further left were written by the client and
    could be forged; without the header, the socket's peer."""
    if request is None:
        return "local"
    forwarded = (request.headers or {}).get("x-forwarded-for", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    if hops and trusted_proxies > 0:
        return hops[-min(trusted_proxies, len(hops))]
    return getattr(request.client, "host", None) or "unknown"


def notes_markdown(notes) -> str:
    return "\n".join(f"- {n}" for n in notes)


def _file_path(value) -> str | None:
    """An API file argument (FileData, its dict form or a plain path) → the server-side path Gradio stored."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "path", None) or str(value)


# -- handlers: what the page calls ---------------------------------------------------------------------------------

class Handlers:
    """The page's event handlers. Thin: validation and work happen in the pipeline."""

    def __init__(self, pipe: Pipeline, settings: Settings):
        self.pipe, self.settings = pipe, settings

    @gpu(duration=60)
    def run_analyze(self, image_path, genre, extra, k, caption=None, filters=None):
        return self.pipe.analyze(image_path, k=k, genre=genre or None, extra=extra or None, caption=caption,
                                 filters=filters)

    @friendly
    def analyze(self, image_path, genre, extra, k, family="", year_from=None, year_to=None, popularity_from=None,
                popularity_to=None, progress=gr.Progress()):
        if not image_path:
            raise user_error("Add a photo first: upload one, paste it, use the webcam, or pick an example.")
        progress(0.1, desc="Reading the photo")
        filters = filters_from_controls(family, year_from, year_to, popularity_from, popularity_to)
        try:
            analysis = self.run_analyze(image_path, genre, extra, k, filters=filters)
        except (ComponentUnavailable, ComponentLoading) as exc:
            # one clear message where the notes go (the banner says the rest), not an error badge on every output
            return tuple(gr.skip() for _ in AnalyzeView.FIELDS[:-2]) + (f"⚠️ {exc}", gr.skip())
        result = analysis.to_dict()
        state = {"features": result["features"], "emotion": result["emotion"], "prompt": result["prompt"],
                 "caption": result["caption"], "mood": result,
                 "lists": {"features": result["songs_by_features"], "lyrics": result["songs_by_lyrics"],
                           "fused": result["songs_fused"]}}
        return AnalyzeView(caption=result["caption"], emotion=result["emotion_scores"],
                           radar=radar(result["features"]), prompt=result["prompt"],
                           features=song_rows(analysis.songs_by_features),
                           lyrics=song_rows(analysis.songs_by_lyrics), fused=song_rows(analysis.songs_fused),
                           notes=notes_markdown(analysis.notes), state=state).values()

    @friendly
    def fetch_link(self, url):
        """The photo behind a link, shown in the photo box; its change event then analyzes it like an upload."""
        if not (url or "").strip():
            raise user_error("Paste a link to a photo first (https://…).")
        return self.pipe.load_image_url(url).image

    def new_image(self, image_path, genre, extra, k, family="", year_from=None, year_to=None, popularity_from=None,
                  popularity_to=None, progress=gr.Progress()):
        if not image_path:  # the photo was cleared
            return tuple(gr.skip() for _ in AnalyzeView.FIELDS)
        return self.analyze(image_path, genre, extra, k, family, year_from, year_to, popularity_from, popularity_to,
                            progress)

    @friendly
    def regenerate_songs(self, caption, prompt_text, genre, extra, k, state, family="", year_from=None,
                         year_to=None, popularity_from=None, popularity_to=None):
        if not state:
            raise user_error("Analyze a photo first, then edit its caption or prompt.")
        mood = self._mood(state)
        filters = filters_from_controls(family, year_from, year_to, popularity_from, popularity_to)
        by_features, by_lyrics, fused, notes = self.pipe.songs_for_text(caption, mood, k=k, filters=filters)
        # the prompt follows the edited caption unless the user rewrote the prompt themselves
        if (prompt_text or "").strip() == (state.get("prompt") or "").strip():
            prompt_text = self.pipe.prompt(caption, mood, genre=genre or None, extra=extra or None).text
        state = self._with_lists({**state, "caption": caption, "prompt": prompt_text}, by_features, by_lyrics, fused)
        return (prompt_text, song_rows(by_features), song_rows(by_lyrics), song_rows(fused), notes_markdown(notes),
                state)

    @friendly
    def refilter_songs(self, caption, k, state, family="", year_from=None, year_to=None, popularity_from=None,
                       popularity_to=None):
        """The three song lists again after a filter changed (the music is left alone); nothing before a photo."""
        if not state:
            return tuple(gr.skip() for _ in range(5))
        filters = filters_from_controls(family, year_from, year_to, popularity_from, popularity_to)
        by_features, by_lyrics, fused, notes = self.pipe.songs_for_text(caption, self._mood(state), k=k,
                                                                        filters=filters)
        state = self._with_lists(state, by_features, by_lyrics, fused)
        return song_rows(by_features), song_rows(by_lyrics), song_rows(fused), notes_markdown(notes), state

    @staticmethod
    def _mood(state) -> MoodResult:
        m = state["mood"]
        return MoodResult(features=m["features"], emotion=m["emotion"], confidence=m["confidence"],
                          emotion_scores=m["emotion_scores"], predictor=m["mood_predictor"])

    @staticmethod
    def _with_lists(state, by_features, by_lyrics, fused) -> dict:
        return {**state, "lists": {"features": [s.to_dict() for s in by_features],
                                   "lyrics": [s.to_dict() for s in by_lyrics], "fused": [s.to_dict() for s in fused]}}

    @gpu(duration=gpu_seconds)
    def run_stream(self, prompt, duration_s, seed, sampling, endless=False, continue_from=None):
        yield from self.pipe.stream(prompt, duration_s, seed, endless=endless, continue_from=continue_from,
                                    **sampling)

    @friendly
    def generate(self, prompt, duration_s, seed, temperature, top_k, top_p, guidance, endless, clip,
                 request: gr.Request):
        yield from self._music(prompt, duration_s, seed, _sampling(temperature, top_k, top_p, guidance), endless,
                               None, request)

    @friendly
    def extend(self, prompt, duration_s, seed, temperature, top_k, top_p, guidance, endless, clip,
               request: gr.Request):
        """Continue the last clip by the chosen duration (or endlessly); a prompt edited since moves the music
        toward it, without a cut."""
        if not clip:
            raise user_error("Make a clip first (Generate music), then extend it.")
        yield from self._music(prompt, duration_s, seed, _sampling(temperature, top_k, top_p, guidance), endless,
                               clip, request)

    def _music(self, prompt, duration_s, seed, sampling, endless, clip, request):
        continue_from = clip["id"] if clip else None
        if clip and (prompt or "").strip() == clip["prompt"]:
            prompt = None  # unchanged: the clip goes on with its own prompt
        music, truncated = self.pipe.music_request(prompt, duration_s, seed, endless=endless,
                                                   continue_from=continue_from, **sampling)
        limit = self.settings.max_prompt_chars
        note = f" (prompt cut to {limit} characters)" if truncated else ""
        if truncated:
            gr.Warning(f"The prompt was cut to {limit} characters.")
        hidden = gr.update(visible=False, value=None)
        seconds = None if endless else music.duration_s
        with self.pipe.music_ticket(client_id(request, self.settings.trusted_proxies), seconds) as ticket:
            # waiting is a loop of yields: a visitor who leaves the page is dropped from the line at once
            while not ticket.wait(LINE_POLL_S):
                yield None, hidden, line_status(ticket), gr.skip()
            try:
                yield None, hidden, f"⏳ Starting… seed {music.seed}{note}", gr.skip()
                parts, rate, clip_id = [], None, ""
                for chunk in self.run_stream(prompt, duration_s, seed, sampling, endless, continue_from):
                    keep_place(ticket, chunk)
                    parts.append(chunk.samples)
                    rate, clip_id = chunk.sample_rate, chunk.clip_id
                    made = chunk.start_s + chunk.samples.shape[0] / chunk.sample_rate
                    speed = made / chunk.elapsed_s if chunk.elapsed_s else 0.0
                    length = "endless, Stop ends it" if endless else f"{music.duration_s:g} s"
                    yield (wav_bytes(chunk.samples, chunk.sample_rate), gr.skip(),
                           f"🎶 {made:.1f} s / {length} · {speed:.2f}× real time{note}", gr.skip())
            except (ComponentUnavailable, ComponentLoading) as exc:
                yield None, hidden, f"⚠️ {exc}", gr.skip()
                return
        # the download holds the whole piece: an extension is appended to the clip it continues
        path = self.pipe.save_audio(parts, rate, after=clip["wav"] if clip else None, clip_id=clip_id)
        made = sum(part.shape[0] for part in parts) / rate
        what = f"extended by {made:.1f} s" if clip else f"{made:.1f} s"
        clip = {"id": clip_id, "prompt": music.prompt, "wav": str(path)}
        yield (gr.skip(), gr.update(visible=True, value=str(path)),
               f"✅ Done: {what}, seed {music.seed}. Download the WAV below, or Extend it.{note}", clip)

    # -- video & album ---------------------------------------------------------------------------------------------
    @friendly
    def share_video(self, image_path, clip, square, title, show_caption, caption, progress=gr.Progress()):
        """The current photo and the last generated clip as an MP4 (one click after Generate)."""
        if not image_path:
            raise user_error("Add a photo first (at the top of the page), then generate music for it.")
        if not clip or not clip.get("wav"):
            raise user_error("Generate music first (Your soundtrack, above); the video carries the last clip.")
        if not Path(clip["wav"]).is_file():
            raise user_error("The last clip's file has been cleaned up (clips are kept for "
                             f"{self.settings.temp_max_age_s // 60} minutes). Generate it again.")
        hidden = gr.update(visible=False, value=None)
        with Background(self.pipe.share_video, image_path, clip["wav"], square=bool(square), title=title or None,
                        caption=caption if show_caption else None) as job:
            for fraction, message in job:
                progress(fraction, desc=message)
                yield gr.skip(), hidden, f"⏳ {message}"
        rendered = job.result
        notes = "".join(f" {note}" for note in rendered.notes)
        info = rendered.info
        yield (str(rendered.path), gr.update(visible=True, value=str(rendered.path)),
               f"✅ {info.width}×{info.height}, {info.duration_s:.1f} s. Download the MP4 below.{notes}")

    @friendly
    def album(self, files, duration_s, seed, square, request: gr.Request, progress=gr.Progress()):
        paths = [_file_path(f) for f in files or []]
        yield from self._soundtrack(self.pipe.album, (paths, duration_s, seed), {"square": bool(square)},
                                    request, progress)

    @friendly
    def video_soundtrack(self, video_path, seed, keep_original_audio, request: gr.Request, progress=gr.Progress()):
        if not video_path:
            raise user_error("Upload a video clip first (MP4, MOV, MKV or WebM).")
        yield from self._soundtrack(self.pipe.video_soundtrack, (video_path, seed, bool(keep_original_audio)), {},
                                    request, progress)

    def _soundtrack(self, work, args, kwargs, request, progress):
        """Outputs: the music player, the video, its download, the status line, the parts table, the songs table.
        The music plays as it is made; the MP4 follows a few seconds after its end."""
        hidden = gr.update(visible=False, value=None)
        client = client_id(request, self.settings.trusted_proxies)
        yield None, None, hidden, "⏳ Starting…", gr.skip(), gr.skip()
        with Background(work, *args, client=client, music=True, **kwargs) as job:
            for fraction, message in job:
                progress(fraction, desc=message)
                music = job.take_music()
                yield (gr.skip() if music is None else music), gr.skip(), hidden, f"⏳ {message}", gr.skip(), \
                    gr.skip()
        made = job.result
        path = str(made.video.path)
        rows = [[k, round(p.start_s, 2), round(p.end_s, 2), p.caption, p.emotion, p.prompt]
                for k, p in enumerate(made.parts, 1)]
        notes = "".join(f" {note}" for note in made.notes)
        status = (f"✅ {made.video.info.duration_s:.1f} s, {len(made.parts)} part{'s' if len(made.parts) != 1 else ''}"
                  f", seed {made.seed}. The music moves to each part's prompt at its start, without a cut.{notes}")
        music = job.take_music()  # the last chunks, when they came with the work's final report
        yield ((gr.skip() if music is None else music), path, gr.update(visible=True, value=path), status, rows,
               song_rows(made.songs.get("songs_fused", [])))

    def select_song(self, state, which, evt: gr.SelectData):
        if not state or evt is None:
            return gr.skip(), None, gr.update(visible=False)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        songs = state["lists"].get(which) or []
        if not 0 <= row < len(songs):
            return gr.skip(), None, gr.update(visible=False)
        song = songs[row]
        label = f"▶ Play “{song['title']}” on Spotify (loads open.spotify.com)"
        return radar(state["features"], song), song, gr.update(visible=spotify_id(song) is not None, value=label)

    @staticmethod
    def spotify_player(song):
        track = spotify_id(song)
        if track is None:
            return ""
        src = html.escape(f"https://open.spotify.com/embed/track/{track}", quote=True)
        return (f'<iframe title="Spotify player" src="{src}" height="152" allow="encrypted-media" loading="lazy" '
                'sandbox="allow-scripts allow-same-origin allow-popups"></iframe>')

    def status(self):
        statuses = self.pipe.status()
        ready = all(item.state in ("ready", "failed") for item in statuses)
        banner = missing_models_message(statuses)
        return (status_markdown(self.pipe, self.settings), gr.Timer(active=not ready),
                gr.update(value=f"⚠️ {banner}" if banner else "", visible=bool(banner)))


@dataclass
class AnalyzeView:
    """What an Analyze fills in on the page, in the order of `Layout.analyze_outputs`."""

    FIELDS = ("caption", "emotion", "radar", "prompt", "features", "lyrics", "fused", "notes", "state")
    caption: object
    emotion: object
    radar: object
    prompt: object
    features: object
    lyrics: object
    fused: object
    notes: object
    state: object

    def values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.FIELDS)


# -- the API and MCP tools -------------------------------------------------------------------------------------------

def build_api(pipe: Pipeline, settings: Settings, handlers: Handlers):
    """The typed endpoints (`gr.api`): names, parameters, defaults and descriptions come from these signatures and
    docstrings, for `gradio_client`, the "Use via API" page and MCP clients alike."""

    @friendly
    def analyze(image: FileData | None = None, k: int = 10, genre: str = "", extra: str = "",
                image_url: str = "", filters: dict | str | None = None) -> dict:
        """Caption, mood (emotion, confidence, 13 audio features), music prompt and three song lists for a photo.

        Args:
            image: the photo (JPEG, PNG, WebP or GIF); or leave it empty and give image_url.
            k: songs per list, 1 to the app's limit (50 by default).
            genre: a genre for the music prompt instead of the one chosen from the mood (empty = from the mood).
            extra: words to add to the music prompt, e.g. "with a cello solo".
            image_url: a public http(s) link to the photo, instead of image.
            filters: optional, narrows the song lists: an object such as {"genre": "jazz", "years": [1980, 1989],
                "popularity": [0, 40]} (genre: a family or a fine genre; years and popularity 0-100: inclusive
                ranges; any subset). The lists hold the best songs that pass; notes say when fewer than k pass.
        """
        # the link is fetched here, outside the GPU-decorated call: a slow server never holds a GPU slot
        source = pipe.image_from(_file_path(image), image_url)
        return handlers.run_analyze(source, genre, extra, k, filters=filters or None).to_dict()

    @friendly
    def caption(image: FileData | None = None, image_url: str = "") -> str:
        """The BLIP caption of a photo.

        Args:
            image: the photo (JPEG, PNG, WebP or GIF); or leave it empty and give image_url.
            image_url: a public http(s) link to the photo, instead of image.
        """
        return pipe.caption(pipe.image_from(_file_path(image), image_url))

    @gpu(duration=gpu_seconds)
    def _chunks(prompt, duration_s, seed, sampling, endless=False, continue_from=None):
        yield from pipe.stream(prompt, duration_s, seed, endless=endless, continue_from=continue_from, **sampling)

    def _in_line(request, make_chunks, per_chunk, seconds):
        """Wait in the fair line, then run the chunks: a generator that yields while it waits and works, so that
        Gradio can drop it (freeing its place and its compute) as soon as the caller disconnects. `seconds`: the
        music asked for (None when endless), for the wait others are shown."""
        with pipe.music_ticket(client_id(request, settings.trusted_proxies), seconds) as ticket:
            while not ticket.wait(LINE_POLL_S):
                yield None
            for chunk in make_chunks():
                keep_place(ticket, chunk)
                yield per_chunk(chunk)

    def _checked(prompt, duration_s, seed, sampling, endless=False, **kwargs) -> float | None:
        """Check a music request before it waits in line; the seconds of music it asks for (None when endless)."""
        music, truncated = pipe.music_request(prompt, duration_s, seed, endless=endless, **kwargs, **sampling)
        if truncated:
            gr.Warning(f"The prompt was cut to {settings.max_prompt_chars} characters.")
        return None if endless else music.duration_s

    @friendly
    def generate(prompt: str, duration_s: float = settings.default_duration_s, seed: int = 0,
                 temperature: float = DEFAULT_SAMPLING.temperature, top_k: int = DEFAULT_SAMPLING.top_k,
                 top_p: float = DEFAULT_SAMPLING.top_p, guidance_scale: float = DEFAULT_SAMPLING.guidance_scale,
                 request: gr.Request = None) -> Iterator[FileData | None]:
        """A WAV file (32 kHz, 16-bit, loudness-normalised) of original music for a text prompt; pass the file (its
        path or name) to /extend as `clip_id` to continue the music.

        Args:
            prompt: what the music should sound like, e.g. the prompt /analyze returns.
            duration_s: length in seconds, within the app's limits (1–300 by default; past 30 s the music goes on
                window by window without a seam).
            seed: a whole number; the same seed, prompt and settings give the same audio.
            temperature: sampling temperature (< 1 safer, > 1 more adventurous).
            top_k: draw among the k most likely codes (0 = off).
            top_p: nucleus sampling threshold (0 = off).
            guidance_scale: classifier-free guidance, how strongly the prompt steers (1 = off).
        """
        sampling = _sampling(temperature, top_k, top_p, guidance_scale)
        seconds = _checked(prompt, duration_s, seed, sampling)
        parts, last = [], []
        for _ in _in_line(request, lambda: _chunks(prompt, duration_s, seed, sampling),
                          lambda chunk: (parts.append(chunk.samples), last.append(chunk)), seconds):
            yield None  # `predict` returns the final file
        yield FileData(path=str(pipe.save_audio(parts, last[-1].sample_rate, clip_id=last[-1].clip_id)))

    def _streamed(make_chunks, request, seconds):
        """Chunk events for /stream and /extend: each a small WAV; the last also carries the whole clip's WAV and
        its clip_id, which /extend continues."""
        parts = []

        def event(chunk):
            parts.append(chunk.samples)
            item = {"clip_id": chunk.clip_id, "index": chunk.index, "start_s": round(chunk.start_s, 3),
                    "seconds": round(chunk.samples.shape[0] / chunk.sample_rate, 3), "is_last": chunk.is_last,
                    "audio": FileData(path=str(pipe.save_audio([chunk.samples], chunk.sample_rate)))}
            if chunk.is_last:
                item["wav"] = FileData(path=str(pipe.save_audio(parts, chunk.sample_rate, clip_id=chunk.clip_id)))
            return item

        for item in _in_line(request, make_chunks, event, seconds):
            if item is not None:
                yield item

    @friendly
    def stream(prompt: str, duration_s: float = settings.default_duration_s, seed: int = 0,
               temperature: float = DEFAULT_SAMPLING.temperature, top_k: int = DEFAULT_SAMPLING.top_k,
               top_p: float = DEFAULT_SAMPLING.top_p, guidance_scale: float = DEFAULT_SAMPLING.guidance_scale,
               endless: bool = False, request: gr.Request = None) -> Iterator[dict]:
        """Music streamed while it is made, for `client.submit(..., api_name="/stream")`: one event per chunk
        (the first after about half a second of audio, then one per second) with `audio` (that chunk's WAV),
        `clip_id`, `index`, `start_s`, `seconds` and `is_last`; the last event also has `wav`, the whole clip.

        Args:
            prompt: what the music should sound like.
            duration_s: length in seconds (ignored when endless).
            seed: a whole number; the same seed, prompt and settings give the same audio.
            temperature: sampling temperature.
            top_k: draw among the k most likely codes (0 = off).
            top_p: nucleus sampling threshold (0 = off).
            guidance_scale: classifier-free guidance (1 = off).
            endless: keep streaming until the job is cancelled (at most the app's endless limit).
        """
        sampling = _sampling(temperature, top_k, top_p, guidance_scale)
        seconds = _checked(prompt, duration_s, seed, sampling, endless=endless)
        yield from _streamed(lambda: _chunks(prompt, duration_s, seed, sampling, endless), request, seconds)

    @friendly
    def extend(clip_id: str, duration_s: float = settings.default_duration_s, prompt: str = "", seed: int = 0,
               temperature: float = DEFAULT_SAMPLING.temperature, top_k: int = DEFAULT_SAMPLING.top_k,
               top_p: float = DEFAULT_SAMPLING.top_p, guidance_scale: float = DEFAULT_SAMPLING.guidance_scale,
               endless: bool = False, request: gr.Request = None) -> Iterator[dict]:
        """Continue a clip that /stream, /extend or /generate returned (its `clip_id`, or /generate's WAV) by
        `duration_s` seconds, streamed like /stream: the music goes on from where the clip ended, without a seam.
        A new `prompt` moves it toward another mood (empty = the clip's own prompt). The app keeps the last 16 clips
        extendable.

        Args:
            clip_id: the clip_id of a clip's last event from /stream or /extend, or the WAV that /generate returned
                (its path or file name).
            duration_s: how many seconds to add (ignored when endless).
            prompt: a new description to move toward, or empty to keep the clip's.
            seed: a whole number; the same seed and settings give the same continuation.
            temperature: sampling temperature.
            top_k: draw among the k most likely codes (0 = off).
            top_p: nucleus sampling threshold (0 = off).
            guidance_scale: classifier-free guidance (1 = off).
            endless: keep streaming until the job is cancelled.
        """
        sampling = _sampling(temperature, top_k, top_p, guidance_scale)
        seconds = _checked(prompt or None, duration_s, seed, sampling, endless=endless, continue_from=clip_id)
        yield from _streamed(lambda: _chunks(prompt or None, duration_s, seed, sampling, endless, clip_id), request,
                             seconds)

    @friendly
    def recommend(text: str = "", k: int = 10, features: dict | list | str | None = None,
                  filters: dict | str | None = None) -> dict:
        """Real songs whose lyrics match free text; with audio features, also songs that sound alike and a fused list.

        Args:
            text: what the songs should be about, e.g. "driving through the city at night".
            k: songs per list, 1 to the app's limit (50 by default).
            features: optional audio features in Spotify units: an object such as {"valence": 0.3, "energy": 0.8}
                (any subset of the 13) or a list of all 13 numbers.
            filters: optional, narrows every list: an object such as {"genre": "jazz", "years": [1980, 1989],
                "popularity": [0, 40]} (genre: a family or a fine genre; years and popularity 0-100: inclusive
                ranges; any subset). The lists hold the best songs that pass; notes say when fewer than k pass.
        """
        if isinstance(features, str):
            import json

            try:
                features = json.loads(features) if features.strip() else None
            except ValueError:
                raise user_error("features must be a JSON object of audio features or a list of 13 numbers.") \
                    from None
        lists = pipe.recommend(text, k=k, features=features or None, filters=filters or None)
        notes = lists.pop("notes", [])
        result = {name: [s.to_dict() for s in songs] for name, songs in lists.items()}
        if pipe.clean_text(text)[1]:
            notes = [f"The text was cut to {settings.max_prompt_chars} characters.", *notes]
        if notes:
            result["notes"] = notes
        return result

    def _video_file(work, *args, **kwargs) -> Iterator[FileData | None]:
        """Yield while the work runs (so a caller who disconnects stops it), then the MP4."""
        with Background(work, *args, **kwargs) as job:
            for _ in job:
                yield None
        made = job.result
        yield FileData(path=str(getattr(made, "video", made).path))

    @friendly
    def share_video(image: FileData, audio: FileData, square: bool = False, title: str = "",
                    caption: str = "") -> Iterator[FileData | None]:
        """An MP4 (H.264 + AAC, at most 1080 px on the long side) of a photo with a slow pan/zoom, carrying the
        audio for its whole length, e.g. a WAV from /generate; optionally square and with a title and caption.

        Args:
            image: the photo (JPEG, PNG, WebP or GIF).
            audio: the music (WAV, FLAC, OGG or MP3), at most the app's video length limit (60 s by default).
            square: a square video instead of the photo's own aspect ratio.
            title: a line of text at the top (empty = none).
            caption: a line of text at the bottom (empty = none).
        """
        if not _file_path(image) or not _file_path(audio):
            raise user_error("Give both an image and an audio file.")
        yield from _video_file(pipe.share_video, _file_path(image), _file_path(audio), square=bool(square),
                               title=title or None, caption=caption or None)

    @friendly
    def album(images: list[FileData], duration_s: float = 12.0, seed: int = 0, square: bool = False,
              request: gr.Request = None) -> Iterator[FileData | None]:
        """A slideshow MP4 of 2–10 photos whose music follows them: each photo gets an equal share of the
        duration and its own prompt (from its caption and mood); the music moves to the next photo's prompt at
        its turn without a cut, while the pictures crossfade.

        Args:
            images: 2 to 10 photos, in the order they are shown.
            duration_s: the video's length in seconds (at most the app's video limit, 60 s by default).
            seed: a whole number; the same photos, seed and length give the same music.
            square: a square video instead of the first photo's aspect ratio.
        """
        paths = [_file_path(image) for image in images or []]
        yield from _video_file(pipe.album, paths, duration_s, seed, square=bool(square),
                               client=client_id(request, settings.trusted_proxies))

    @friendly
    def video_soundtrack(video: FileData, seed: int = 0, keep_original_audio: bool = False,
                         request: gr.Request = None) -> Iterator[FileData | None]:
        """The clip as an MP4 with new music made for it: scene changes are found, each scene's frame gets a
        caption, mood and prompt, and the music moves to each scene's prompt at its cut, without a seam.

        Args:
            video: a clip (MP4, MOV, MKV, WebM, AVI) of at most the app's limit (60 s by default).
            seed: a whole number; the same clip and seed give the same music.
            keep_original_audio: keep the clip's own sound, 12 dB under the music (else it is dropped).
        """
        if not _file_path(video):
            raise user_error("No video was given. Send a clip (MP4, MOV, MKV or WebM).")
        yield from _video_file(pipe.video_soundtrack, _file_path(video), seed, bool(keep_original_audio),
                               client=client_id(request, settings.trusted_proxies))

    def status() -> dict:
        """The app's health, for uptime monitors and embedding sites: overall state (ready, loading or degraded),
        mode and device; per part its state, source (local, package, cache, Hub, demo), load time, weights format,
        self-check figures and download progress; the catalog's counts; the music line (running and waiting
        requests). Never shows a token or a path outside the app."""
        runtime = pipe.runtime
        line = pipe.music_line
        report = status_report(pipe.status(), settings, device=runtime.device if runtime else None,
                               queue_length=line["waiting"])
        report["music_line"] = line
        return report

    return {"analyze": analyze, "caption": caption, "generate": generate, "stream": stream, "extend": extend,
            "recommend": recommend, "status": status, "share_video": share_video, "album": album,
            "video_soundtrack": video_soundtrack}


# -- layout ----------------------------------------------------------------------------------------------------------

class Layout:
    """The page's components, built by `build_layout`, named so that the wiring reads as sentences."""

    @property
    def analyze_outputs(self) -> list:
        return [getattr(self, name) if name not in ("features", "lyrics", "fused") else self.tables[name]
                for name in AnalyzeView.FIELDS]

    @property
    def filter_controls(self) -> list:
        return [self.filter_genre, self.filter_year_from, self.filter_year_to, self.filter_popularity_from,
                self.filter_popularity_to]

    @property
    def generate_inputs(self) -> list:
        return [self.prompt, self.duration, self.seed, self.temperature, self.top_k, self.top_p, self.guidance,
                self.endless, self.clip]

    @property
    def generate_outputs(self) -> list:
        return [self.audio_out, self.download, self.gen_status, self.clip]


def _slider(name: str, label: str, elem_id: str) -> gr.Slider:
    r = Sampling.RANGES[name]
    return gr.Slider(r.low, r.high, value=getattr(DEFAULT_SAMPLING, name), step=r.step, label=label, elem_id=elem_id)


def build_layout(pipe: Pipeline, settings: Settings) -> tuple[gr.Blocks, Layout]:
    ui = Layout()
    with gr.Blocks(title="Picture Soundtrack", analytics_enabled=False) as demo:
        gr.Markdown("# 🎵 Picture Soundtrack\nDrop in a photo: get its caption and mood, an original music clip "
                    "made for it, and real songs that match — by sound and by lyrics.", elem_id="app-title")
        gr.Markdown("⚠️ **Demo mode**: captions and music come from tiny *random-weight* models built offline, so "
                    "they are noise by design. Mood features, song search and the whole interface are real.",
                    elem_id="demo-banner", visible=settings.demo)
        ui.offline_banner = gr.Markdown(visible=False, elem_id="offline-banner")
        ui.state = gr.State(None)
        ui.selected_song = gr.State(None)
        ui.clip = gr.State(None)  # the last finished clip: its id (for Extend), prompt and WAV
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                ui.image = UploadedImage(label="Your photo", type="filepath", sources=["upload", "webcam", "clipboard"],
                                         elem_id="image-input", height=320)
                with gr.Row(equal_height=True):
                    ui.image_url = gr.Textbox(label="Photo from a link", placeholder="https://…/photo.jpg",
                                              elem_id="image-url", scale=4, max_lines=1, max_length=2048)
                    ui.image_url_btn = gr.Button("Fetch", elem_id="image-url-btn", scale=1, min_width=70)
                with gr.Row():
                    ui.analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn", scale=2)
                with gr.Accordion("Options", open=False):
                    ui.genre = gr.Dropdown(choices=[("pick from the mood", "")] + [(g, g) for g in GENRES], value="",
                                           label="Genre", elem_id="genre")
                    ui.extra = gr.Textbox(label="Add words to the music prompt", placeholder="e.g. with a cello solo",
                                          max_length=settings.max_prompt_chars, elem_id="extra-words")
                    ui.k = gr.Slider(3, settings.max_k, value=10, step=1, label="Songs per list", elem_id="k")
                    ui.filter_genre = gr.Dropdown(choices=[("any genre", "")] + [(f, f) for f in genre_families()],
                                                  value="", label="Only songs of this genre family",
                                                  elem_id="filter-genre")
                    with gr.Row():
                        ui.filter_year_from = gr.Slider(*YEAR_SLIDER, value=YEAR_SLIDER[0], step=1,
                                                        label="Released from", elem_id="filter-year-from")
                        ui.filter_year_to = gr.Slider(*YEAR_SLIDER, value=YEAR_SLIDER[1], step=1, label="to",
                                                      elem_id="filter-year-to")
                    with gr.Row():
                        ui.filter_popularity_from = gr.Slider(POPULARITY.low, POPULARITY.high, value=POPULARITY.low,
                                                              step=1, label="Popularity from (hidden gems)",
                                                              elem_id="filter-popularity-from")
                        ui.filter_popularity_to = gr.Slider(POPULARITY.low, POPULARITY.high, value=POPULARITY.high,
                                                            step=1, label="to (hits)", elem_id="filter-popularity-to")
                gr.Examples(examples=[[p] for p in EXAMPLES], inputs=[ui.image], label="Or try an example photo",
                            examples_per_page=6)
            with gr.Column(scale=7, min_width=300):
                ui.caption = gr.Textbox(label="Caption (editable)", elem_id="caption", lines=2,
                                        max_length=settings.max_prompt_chars)
                with gr.Row(equal_height=False):
                    ui.emotion = gr.Label(label="Mood", num_top_classes=3, elem_id="emotion", min_width=200)
                    ui.radar = gr.Plot(label="Audio features: your photo vs. the selected song", elem_id="mood-radar",
                                       min_width=260)
                ui.prompt = gr.Textbox(label="Music prompt (editable)", elem_id="prompt", lines=3,
                                       max_length=settings.max_prompt_chars)
                ui.regenerate_btn = gr.Button("Regenerate songs and music from my text", elem_id="regenerate-btn")
                ui.notes = gr.Markdown(elem_id="analyze-notes")

        gr.Markdown("### Your soundtrack")
        with gr.Row():
            with gr.Column(scale=5, min_width=280):
                model_name = "demo model" if settings.demo else settings.music_model
                gr.Dropdown(choices=[model_name], value=model_name, label="Model", interactive=False,
                            elem_id="music-model", info="Set I2M_MUSIC_MODEL to use medium, melody or stereo variants.")
                ui.duration = gr.Slider(settings.min_duration_s, settings.max_duration_s,
                                        value=settings.default_duration_s, step=0.5, label="Duration (s)",
                                        elem_id="duration", info="Longer than 30 s: the music goes on window by "
                                        "window, without a seam. Extend adds this much to the last clip.")
                ui.endless = gr.Checkbox(False, label="Endless: keep playing until Stop", elem_id="endless")
                with gr.Row():
                    ui.seed = gr.Number(value=42, precision=0, minimum=0, label="Seed", elem_id="seed", scale=4)
                    ui.dice = gr.Button("🎲", elem_id="dice-btn", scale=1, min_width=50)
                with gr.Accordion("Sampling", open=False):
                    ui.temperature = _slider("temperature", "Temperature", "temperature")
                    ui.top_k = _slider("top_k", "Top-k (0 = off)", "top-k")
                    ui.top_p = _slider("top_p", "Top-p (0 = off)", "top-p")
                    ui.guidance = _slider("guidance_scale", "Guidance (classifier-free, 1 = off)", "guidance")
                with gr.Row():
                    ui.generate_btn = gr.Button("Generate music", variant="primary", elem_id="generate-btn", scale=3)
                    ui.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
                ui.extend_btn = gr.Button("➕ Extend the last clip (edit the prompt to change its mood)",
                                          elem_id="extend-btn", size="sm")
            with gr.Column(scale=7, min_width=280):
                ui.audio_out = gr.Audio(label="Streaming as it is made", streaming=True, autoplay=True,
                                        interactive=False, elem_id="audio-out")
                # the status first: its "Done" line points at the download button below it
                ui.gen_status = gr.Markdown(elem_id="generate-status")
                ui.download = gr.DownloadButton("Download WAV", visible=False, elem_id="download-wav")

        gr.Markdown("### Songs that match")
        ui.tables = {}
        with gr.Tabs():
            for key, title, elem in SONG_LISTS:
                with gr.Tab(title, id=elem):
                    ui.tables[key] = gr.Dataframe(headers=SONG_HEADERS, value=[], interactive=False, wrap=True,
                                                  datatype=SONG_TYPES, elem_id=elem, elem_classes=["songs-table"])
        ui.spotify_btn = gr.Button("▶ Play on Spotify", visible=False, elem_id="spotify-btn", size="sm")
        ui.spotify_html = gr.HTML(elem_id="spotify-player")
        with gr.Tabs(elem_id="media-tabs"):
            with gr.Tab("Video & album", id="video-album"):
                build_media_tab(ui, settings)

        with gr.Accordion("About, limits and privacy", open=False):
            gr.Markdown(limits_markdown(settings), elem_id="limits")
            gr.Markdown("Recommendations come from a catalog built from TidyTuesday Spotify songs (CC0), MusicOSet "
                        "(CC BY 4.0), the Spotify Tracks Dataset (M. Pandya, 2022; ODbL 1.0: the catalog is a "
                        "database under the ODbL), Billboard year-end lyrics 1965–2015 and the Music Dataset "
                        "1950–2019 (Moura et al., CC BY 4.0). Lyrics are never stored or shown: only embeddings and "
                        "keywords. Genre families: pipeline/genre_families.json. *By sound* puts songs of the "
                        "photo's mood (calm, energetic, happy, sad) first; the moods are four centroids fitted on "
                        "343 tracks labelled by people (pipeline/song_moods.json).")
        ui.footer = gr.Markdown(status_markdown(pipe, settings), elem_id="status-footer")
        ui.timer = gr.Timer(1.5)
    return demo, ui


def build_media_tab(ui: Layout, settings: Settings) -> None:
    """Share as video, Album and Score a video: music that follows pictures, as MP4s to post."""
    longest = min(settings.video_max_s, settings.max_duration_s)
    with gr.Tabs():
        with gr.Tab("Share as video", id="share-tab"):
            gr.Markdown("The photo above with a slow pan and zoom, carrying the last clip you generated: an MP4 "
                        "(H.264 + AAC) that phones and social networks play as is.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=280):
                    ui.share_square = gr.Checkbox(False, label="Square (1:1) instead of the photo's shape",
                                                  elem_id="share-square")
                    ui.share_title = gr.Textbox(label="Title on the video (optional)", max_lines=1, max_length=80,
                                                elem_id="share-title")
                    ui.share_caption = gr.Checkbox(False, label="Show the caption at the bottom",
                                                   elem_id="share-caption")
                    ui.share_btn = gr.Button("🎬 Make a video of the photo and the last clip", variant="primary",
                                             elem_id="share-btn")
                with gr.Column(scale=7, min_width=280):
                    ui.share_video, ui.share_download, ui.share_status = _made_video("share", "Photo video")
        with gr.Tab("Album", id="album-tab"):
            gr.Markdown("2–10 photos become a slideshow whose music follows them: each photo gets its own prompt "
                        "and an equal share of the time, and the music moves to the next photo's mood as the "
                        "pictures crossfade, without a cut. The music plays as it is made; the MP4 follows a few "
                        "seconds after it ends.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=280):
                    ui.album_files = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                             label="Photos, in order (2–10)", elem_id="album-files", height=180)
                    ui.album_duration = gr.Slider(2, longest, value=min(12.0, longest), step=0.5,
                                                  label="Length (s)", elem_id="album-duration")
                    with gr.Row():
                        ui.album_seed = gr.Number(value=42, precision=0, minimum=0, label="Seed",
                                                  elem_id="album-seed", min_width=100)
                        ui.album_square = gr.Checkbox(False, label="Square", elem_id="album-square", min_width=100)
                    ui.album_btn = gr.Button("🎞 Make the album", variant="primary", elem_id="album-btn")
                    gr.Examples(examples=[[ALBUM_EXAMPLE, 9, 7]], inputs=[ui.album_files, ui.album_duration,
                                                                           ui.album_seed],
                                label="Or try three example photos")
                with gr.Column(scale=7, min_width=280):
                    ui.album_music = _music_player("album")
                    ui.album_video, ui.album_download, ui.album_status = _made_video("album", "Slideshow")
            ui.album_parts, ui.album_songs = _parts_and_songs("album", "photo", "album")
        with gr.Tab("Score a video", id="score-tab"):
            gr.Markdown(f"A clip of up to {settings.video_max_s:g} s gets new music: its scenes are found, each "
                        "gets a caption, a mood and a prompt, and the music changes at the cuts, without a seam. "
                        "The music plays as it is made; the MP4 follows a few seconds after it ends.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=280):
                    ui.clip_in = gr.Video(label="Your clip", sources=["upload"], elem_id="clip-in", height=240)
                    ui.clip_keep = gr.Checkbox(False, label="Keep the clip's own sound under the music",
                                               elem_id="clip-keep")
                    ui.clip_seed = gr.Number(value=42, precision=0, minimum=0, label="Seed", elem_id="clip-seed")
                    ui.clip_btn = gr.Button("🎼 Score the video", variant="primary", elem_id="clip-btn")
                    gr.Examples(examples=[[CLIP_EXAMPLE, 7, False]], inputs=[ui.clip_in, ui.clip_seed, ui.clip_keep],
                                label="Or try an example clip")
                with gr.Column(scale=7, min_width=280):
                    ui.clip_music = _music_player("clip")
                    ui.clip_video, ui.clip_download, ui.clip_status = _made_video("clip", "Scored video")
            ui.clip_parts, ui.clip_songs = _parts_and_songs("clip", "scene", "clip")


def _music_player(prefix: str) -> gr.Audio:
    """The music of an album or clip, played while it is made (the MP4 comes a few seconds after its end)."""
    return gr.Audio(label="Music, playing as it is made", streaming=True, autoplay=True, interactive=False,
                    elem_id=f"{prefix}-music")


def _made_video(prefix: str, label: str) -> tuple:
    """Where a made MP4 shows: its player, a status line, then a download button that appears when it is ready
    (the status's "Download the MP4 below" points at it). Returned as (video, download, status)."""
    video = gr.Video(label=label, interactive=False, elem_id=f"{prefix}-video", height=360)
    status = gr.Markdown(elem_id=f"{prefix}-status")
    return video, gr.DownloadButton("Download MP4", visible=False, elem_id=f"{prefix}-download"), status


def _parts_and_songs(prefix: str, part: str, whole: str) -> tuple:
    """Each part's caption, mood and prompt, then the songs for the whole album or clip."""
    return (gr.Dataframe(headers=PART_HEADERS, value=[], interactive=False, wrap=True, label=f"Each {part}'s part",
                         elem_id=f"{prefix}-parts", column_widths=PART_WIDTHS),
            gr.Dataframe(headers=SONG_HEADERS, value=[], interactive=False, wrap=True, datatype=SONG_TYPES,
                         label=f"Songs for the whole {whole}", elem_id=f"{prefix}-songs",
                         elem_classes=["songs-table"]))


# -- wiring ----------------------------------------------------------------------------------------------------------

def wire(demo: gr.Blocks, ui: Layout, handlers: Handlers, api: dict, settings: Settings) -> None:
    """Events of the page (all private: the API is `api`'s typed endpoints only)."""
    private = {"api_visibility": "private"}
    analyze_limits = {"concurrency_limit": settings.analyze_concurrency, "concurrency_id": "analyze", **private}
    # generation handlers wait in the pipeline's fair line (pipeline/fairness.py), which admits
    # I2M_MAX_BATCH at a time (the engine decodes them together); Gradio only bounds how many may wait there
    line = {"concurrency_limit": settings.queue_size, "concurrency_id": "generate"}
    generate_limits = {**line, **private}
    instant = {"queue": False, **private}
    # the music of albums and clips waits in the fair line like any other; this bounds the ffmpeg encodes
    video = {"concurrency_limit": VIDEO_CONCURRENCY, "concurrency_id": "video"}
    analyze_inputs = [ui.image, ui.genre, ui.extra, ui.k, *ui.filter_controls]
    with demo:
        # the API first: a private event named like an endpoint would otherwise take its name
        gr.api(api["analyze"], api_name="analyze", concurrency_limit=settings.analyze_concurrency,
               concurrency_id="analyze")
        gr.api(api["caption"], api_name="caption", concurrency_limit=settings.analyze_concurrency,
               concurrency_id="analyze")
        for name in ("generate", "stream", "extend"):
            gr.api(api[name], api_name=name, **line)
        gr.api(api["recommend"], api_name="recommend", concurrency_limit=4, concurrency_id="recommend")
        gr.api(api["status"], api_name="status", queue=False)
        for name in ("share_video", "album", "video_soundtrack"):
            gr.api(api[name], api_name=name, **video)

        ui.analyze_btn.click(handlers.analyze, analyze_inputs, ui.analyze_outputs, **analyze_limits)
        # a new photo (uploaded, pasted, taken or an example clicked) is analyzed at once; results are cached per
        # image content, so an example clicked again, by anyone, answers instantly
        ui.image.change(handlers.new_image, analyze_inputs, ui.analyze_outputs, **analyze_limits)
        for trigger in (ui.image_url.submit, ui.image_url_btn.click):
            trigger(handlers.fetch_link, [ui.image_url], [ui.image], concurrency_limit=settings.analyze_concurrency,
                    concurrency_id="link", **private)
        generation = ui.generate_btn.click(handlers.generate, ui.generate_inputs, ui.generate_outputs,
                                           **generate_limits)
        extension = ui.extend_btn.click(handlers.extend, ui.generate_inputs, ui.generate_outputs, **generate_limits)
        regeneration = ui.regenerate_btn.click(
            handlers.regenerate_songs, [ui.caption, ui.prompt, ui.genre, ui.extra, ui.k, ui.state,
                                        *ui.filter_controls],
            [ui.prompt, ui.tables["features"], ui.tables["lyrics"], ui.tables["fused"], ui.notes, ui.state],
            **analyze_limits).success(handlers.generate, ui.generate_inputs, ui.generate_outputs, **generate_limits)
        # a changed filter re-runs the song lists from the current caption (not the photo, not the music)
        refilter = ([ui.caption, ui.k, ui.state, *ui.filter_controls],
                    [ui.tables["features"], ui.tables["lyrics"], ui.tables["fused"], ui.notes, ui.state])
        ui.filter_genre.change(handlers.refilter_songs, *refilter, **analyze_limits)
        for slider in ui.filter_controls[1:]:
            slider.release(handlers.refilter_songs, *refilter, **analyze_limits)
        # the status is written again one round trip later: a progress line the stopped stream had already sent
        # can reach the page after the first write and would otherwise stay there
        ui.stop_btn.click(lambda: "⏹ Stopped.", None, ui.gen_status, cancels=[generation, extension, regeneration],
                          **instant).then(lambda: "⏹ Stopped.", None, ui.gen_status, **instant)
        ui.dice.click(lambda: random.randint(0, 2 ** 31 - 1), None, ui.seed, **instant)
        for key, table in ui.tables.items():
            table.select(_select_for(handlers, key), [ui.state],
                         [ui.radar, ui.selected_song, ui.spotify_btn], **instant)
        ui.spotify_btn.click(handlers.spotify_player, [ui.selected_song], ui.spotify_html, **instant)
        ui.share_btn.click(handlers.share_video, [ui.image, ui.clip, ui.share_square, ui.share_title,
                                                  ui.share_caption, ui.caption],
                           [ui.share_video, ui.share_download, ui.share_status], **video, **private)
        ui.album_btn.click(handlers.album, [ui.album_files, ui.album_duration, ui.album_seed, ui.album_square],
                           [ui.album_music, ui.album_video, ui.album_download, ui.album_status, ui.album_parts,
                            ui.album_songs],
                           **video, **private)
        ui.clip_btn.click(handlers.video_soundtrack, [ui.clip_in, ui.clip_seed, ui.clip_keep],
                          [ui.clip_music, ui.clip_video, ui.clip_download, ui.clip_status, ui.clip_parts,
                           ui.clip_songs],
                          **video, **private)
        ui.timer.tick(handlers.status, None, [ui.footer, ui.timer, ui.offline_banner], **instant)
        demo.load(handlers.status, None, [ui.footer, ui.timer, ui.offline_banner], **instant)


def _select_for(handlers: Handlers, which: str):
    """A select handler for one song table (Gradio reads `evt`'s annotation, so this is a plain function)."""
    def select(state, evt: gr.SelectData):
        return handlers.select_song(state, which, evt)

    return select


def refuse_links_in_api_parameters(demo: gr.Blocks) -> None:
    """gr.api builds its parameter blocks itself, so they get the photo box's door (see UploadedImage) per
    instance; so do the video and file boxes, which Gradio would otherwise let download a link in the same way."""
    for block in demo.blocks.values():
        if isinstance(block, (ApiParameter, gr.Video, gr.File)):
            block.async_move_resource_to_block_cache = functools.partial(_refusing_async, block)
            block.move_resource_to_block_cache = functools.partial(_refusing_sync, block)


async def _refusing_async(block, url_or_file_path):
    _refuse_link(url_or_file_path)
    return await type(block).async_move_resource_to_block_cache(block, url_or_file_path)


def _refusing_sync(block, url_or_file_path):
    _refuse_link(url_or_file_path)
    return type(block).move_resource_to_block_cache(block, url_or_file_path)


def build_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings.from_env()
    pipe = get_pipeline(settings)
    handlers = Handlers(pipe, settings)
    demo, ui = build_layout(pipe, settings)
    wire(demo, ui, handlers, build_api(pipe, settings, handlers), settings)
    refuse_links_in_api_parameters(demo)
    # uploads (any client may post files) and generated clips are bounded by age and size, oldest first
    demo.janitor = pipe.janitor(upload_folder()).start()
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=2)
    return demo


def upload_folder() -> Path:
    """Where Gradio keeps uploaded files and the files it serves (GRADIO_TEMP_DIR)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def launch_options(settings: Settings) -> dict:
    """Keyword arguments for `demo.launch()` that belong to the app rather than to the host and port."""
    settings.audio_dir.mkdir(parents=True, exist_ok=True)
    return {
        "theme": gr.themes.Soft(primary_hue="violet", secondary_hue="amber"),
        "css_paths": [ASSETS / "style.css"],
        "allowed_paths": [str(settings.audio_dir)],  # generated WAVs live in the cache folder, not in /tmp
        "max_file_size": f"{settings.max_upload_mb:g}mb",
        "show_error": True,
        "mcp_server": True,  # the four API endpoints as MCP tools at /gradio_api/mcp/
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Picture Soundtrack: photo → caption, mood, music and songs.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--demo", action="store_true", help="tiny random-weight models, no network needed")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(**({"demo": True} if args.demo else {}))
    demo = build_app(settings)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(settings))


if __name__ == "__main__":
    main()
