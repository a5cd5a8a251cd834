"""Video in and out: a photo becomes a shareable MP4, an album a slideshow, a clip gets its scenes read and a new
soundtrack muxed on. No music is made here: callers hand in a finished WAV (or samples and a rate).

All media work is done by the `ffmpeg`/`ffprobe` binaries (Debian's, listed in `packages.txt`), called with
argument lists and never a shell, so no container or codec code lives in this project. Three rules hold for every
call:
- Inputs from visitors are opened only through a short list of demuxers and the `file` protocol: ffmpeg can
  otherwise be talked into reading playlists (HLS, concat) that name other files or URLs.
- Video is never loaded whole into memory: analysis streams small frames through a pipe at a low rate.
- Outputs are written to a temporary name and renamed when complete, so a half-written MP4 is never served;
  temporary files live in a per-call folder under the caller's folder and are removed when the call ends.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import queue
import re
import shutil
import subprocess
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageFilter

from .errors import Cancelled, ComponentUnavailable, InputError, UserFacingError
from .images import ImageSource, load_image
from .settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Assembly", "AudioSource", "MediaError", "MediaInfo", "Rendered", "Scene", "VideoLimits", "check_album",
           "even_boundaries", "photo_name", "photo_video", "probe", "scenes", "score_video", "slideshow",
           "start_scored_video", "start_slideshow"]

Progress = Callable[[float], None]
# A WAV (or any file libsndfile reads) or float samples with their rate: (samples, sample_rate).
AudioSource = Union[str, os.PathLike, Tuple[np.ndarray, int]]

FPS = 25  # of the videos made from photos: smooth enough for a slow pan, and 17 % fewer frames to encode than 30
MIN_PHOTOS, MAX_PHOTOS = 2, 10
MIN_SLIDE_S = 1.0  # a photo shown for less than this is a flash, not a slide
MAX_CROSSFADE_S = 1.0
MIN_SCENE_S = 2.0  # music cannot change meaningfully in less; shorter scenes merge into a neighbour
CUT_THRESHOLD = 0.3  # scene-change score (0..1) above which consecutive samples are a cut
ANALYSIS_FPS = 5.0  # samples per second for scene detection: cuts are placed within 0.1 s
MAX_ANALYSIS_SAMPLES = 600  # longer clips are sampled more sparsely, so analysis cost stays bounded
ORIGINAL_UNDER_DB = -12.0  # a kept original soundtrack sits this far under the music
ZOOM_HEADROOM = 2  # photos are prepared at this multiple of the output size, so pan/zoom steps are sub-pixel
RUN_TIMEOUT_S = 900.0  # no single ffmpeg run may hang the request forever
# niceness of a picture encoded while its music is made: the music streams to a listener and must not stall
BACKGROUND_NICE = 10

# Demuxers a visitor's file may be opened with: the containers phones and cameras write, and common audio
# containers (only so that an audio file is recognised and refused with a clear message).
_VIDEO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,wav,mp3,flac,aac"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")  # a path that needs no escaping inside a filter graph


class MediaError(UserFacingError, RuntimeError):
    """ffmpeg failed on input that had passed its checks (out of disk, a decoder error mid-file, ...)."""


@dataclass(frozen=True)
class VideoLimits:
    """The size limits every call applies; `from_settings` reads them from the app's settings."""

    max_seconds: float = Settings.video_max_s
    max_side: int = Settings.video_max_side
    output_side: int = Settings.video_output_side
    max_image_pixels: int = Settings.max_image_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> "VideoLimits":
        return cls(settings.video_max_s, settings.video_max_side, settings.video_output_side,
                   settings.max_image_pixels)


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file. `width`/`height` are as displayed (a phone's rotation applied);
    `duration_s` is the picture's length where the container states it (else the file's)."""

    path: Path
    format_name: str
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    video_codec: str | None = None
    pix_fmt: str | None = None
    audio_codec: str | None = None
    rotation: int = 0


@dataclass(frozen=True)
class Rendered:
    """A finished MP4 and what the person should know about how it was made."""

    path: Path
    info: MediaInfo
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scene:
    """One shot of a clip: [start_s, end_s) in seconds from the clip's start, a frame from its middle (RGB, at most
    `analysis_side` on its longest side) and how sharp the cut that opens it was (0..1; 1.0 for the first)."""

    start_s: float
    end_s: float
    frame: Image.Image
    cut_score: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


# -- tools ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ComponentUnavailable("video tools", f"`{name}` is not installed (apt-get install ffmpeg)")
    return path


def _input(path: Path) -> list[str]:
    """ffmpeg arguments that open a visitor's file as a local file through the allowed demuxers only."""
    return ["-protocol_whitelist", "file", "-format_whitelist", _VIDEO_FORMATS, "-i", f"file:{path.resolve()}"]


def _short(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no details"


class _Job:
    """One ffmpeg run, started at once and waited for later (`wait`), so that it can work while the caller does
    something else. Its progress comes from ffmpeg's `-progress` output; stderr goes to a file, so a chatty run can
    never block. With `stdin=True` the caller writes the input through `write` and ends it with `close_input`."""

    def __init__(self, args: list[str], *, cwd: Path, what: str, stdin: bool = False, nice: int = 0):
        self.what = what
        self.done_s = 0.0
        command = [_tool("ffmpeg"), "-hide_banner", *([] if stdin else ["-nostdin"]), "-y", "-v", "error",
                   "-nostats", "-progress", "pipe:1", "-stats_period", "0.2", *args]
        self._errors = open(cwd / f"ffmpeg-{uuid.uuid4().hex[:8]}.log", "w+", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=self._errors)
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, self.process.pid, nice)
            except OSError:  # not allowed here: it runs at the caller's priority
                pass
        self._deadline = time.monotonic() + RUN_TIMEOUT_S
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            if line.startswith("out_time_us=") and line[12:].strip().lstrip("-").isdigit():
                self.done_s = max(0.0, int(line[12:]) / 1e6)

    def write(self, data: bytes) -> bool:
        """Input for a `stdin=True` run; False once ffmpeg has stopped reading (`wait` then says why)."""
        try:
            self.process.stdin.write(data)
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close_input(self) -> None:
        try:
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def wait(self, *, duration_s: float, progress: Progress | None = None,
             cancel: threading.Event | None = None) -> None:
        """Until ffmpeg ends, reporting progress (0..1) on the caller's thread and stopping it when `cancel` is
        set; a failed run raises MediaError with ffmpeg's last line."""
        shown = -1.0
        try:
            while True:
                try:
                    self.process.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                if time.monotonic() > self._deadline:
                    raise MediaError(f"Making the {self.what} took longer than {RUN_TIMEOUT_S:.0f} s and was "
                                     "stopped.")
                if progress is not None and duration_s > 0:
                    fraction = min(0.99, self.done_s / duration_s)
                    if fraction > shown:
                        shown = fraction
                        progress(fraction)
        finally:
            self.stop()
        with self._errors:
            self._errors.seek(0)
            details = self._errors.read()
        if self.process.returncode != 0:
            log.warning("ffmpeg failed (%s) making the %s: %s", self.process.returncode, self.what,
                        details[-2000:])
            raise MediaError(f"The {self.what} could not be made (ffmpeg: {_short(details)}).")
        if progress is not None:
            progress(1.0)

    def stop(self) -> None:
        """Kill the run if it is still going (a cancelled or failed call); harmless once it has ended."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdin is not None:
            self.close_input()

    def discard(self) -> None:
        """Stop the run and let go of its files (the caller's work folder is about to be removed)."""
        self.stop()
        self._errors.close()


def _run(args: list[str], *, cwd: Path, duration_s: float, what: str, progress: Progress | None = None,
         cancel: threading.Event | None = None) -> None:
    """Run ffmpeg to the end (see `_Job`)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled()
    _Job(args, cwd=cwd, what=what).wait(duration_s=duration_s, progress=progress, cancel=cancel)


def _capture(args: list[str], *, timeout: float = 60.0) -> bytes | None:
    """Run ffmpeg for its stdout (one small frame); None when it fails or produces nothing."""
    try:
        result = subprocess.run([_tool("ffmpeg"), "-hide_banner", "-nostdin", "-v", "error", *args],
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout if result.returncode == 0 and result.stdout else None


class _Workspace:
    """A per-call folder under the caller's folder for temporary files, removed when the call ends; the finished
    file is moved next to it (into the caller's folder) under a unique name."""

    def __init__(self, out_dir: str | os.PathLike, stem: str):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stem = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:10]}"
        self.dir = self.out_dir / f".work-{self.stem}"

    def __enter__(self) -> "_Workspace":
        self.dir.mkdir()
        # a folder with a fresh file in it: the janitor removes empty folders and old files, never this one
        (self.dir / "in-use").touch()
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def publish(self, made: Path) -> Path:
        final = self.out_dir / f"{self.stem}.mp4"
        os.replace(made, final)
        return final


# -- probing -------------------------------------------------------------------------------------------------------

def _ratio(text: str | None) -> float:
    try:
        top, _, bottom = (text or "0/0").partition("/")
        value = float(top) / float(bottom or 1)
    except (ValueError, ZeroDivisionError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            try:
                return int(round(float(side["rotation"]))) % 360
            except (TypeError, ValueError):
                return 0
    try:
        return int((stream.get("tags") or {}).get("rotate", 0)) % 360
    except ValueError:
        return 0


def probe(path: str | os.PathLike, *, limits: VideoLimits = VideoLimits(), require_video: bool = True,
          check_decode: bool = True) -> MediaInfo:
    """Read a clip's facts, refusing with a message the visitor can act on anything this app cannot use: a corrupt
    or truncated file, an audio-only file, a file without video, an undecodable codec, a clip too long or too large.

    The header alone can lie (a truncated MP4 whose index sits at the front still declares its full length), so
    with `check_decode` one small frame is decoded at the start and one near the declared end."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise InputError(f"The file {name} could not be read.") from None
    if size == 0:
        raise InputError(f"The file {name} is empty.")
    try:
        result = subprocess.run(
            [_tool("ffprobe"), "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
             "-protocol_whitelist", "file", "-format_whitelist", _VIDEO_FORMATS, f"file:{path.resolve()}"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        facts = json.loads(result.stdout or b"{}") if result.returncode == 0 else {}
    except (subprocess.TimeoutExpired, ValueError):
        facts = {}
    fmt = facts.get("format") or {}
    streams = facts.get("streams") or []
    if not fmt or not streams:
        if _is_picture(path):
            raise InputError(f"{name} is a still picture, not a video; make a photo video or an album from it.")
        raise InputError(f"{name} could not be read as a video: it is corrupt, truncated or not a video file. "
                         "Try an MP4, MOV, MKV or WebM clip.")
    format_name = fmt.get("format_name", "")
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not (s.get("disposition") or {}).get("attached_pic")]  # an MP3's cover art is not a video
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    video = videos[0] if videos else None
    audio = audios[0] if audios else None
    # the picture's own length when the container states it: a longer soundtrack must not stretch the clip
    duration = _number((video or audio or {}).get("duration")) or _number(fmt.get("duration"))
    if video is None:
        if require_video:
            if audio is not None:
                raise InputError(f"{name} is an audio file; upload a video clip (the music is made for you).")
            raise InputError(f"{name} contains no video stream.")
        return MediaInfo(path, format_name, duration or 0.0, False, audio is not None,
                         audio_codec=audio.get("codec_name") if audio else None)
    codec = video.get("codec_name")
    if not codec or codec == "none":
        tag = video.get("codec_tag_string") or "unknown"
        raise InputError(f"{name} uses a video codec this app cannot decode ({tag}). Convert it to H.264 MP4 "
                         "and try again.")
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    rotation = _rotation(video)
    if rotation in (90, 270):
        width, height = height, width
    if width <= 0 or height <= 0:
        raise InputError(f"{name} declares no picture size; the file is probably damaged.")
    if max(width, height) > limits.max_side:
        raise InputError(f"The video is {width}×{height} pixels; the limit is {limits.max_side} px on a side. "
                         "Export it at a lower resolution and try again.")
    if duration is None:
        raise InputError(f"The length of {name} cannot be read; the file may be truncated or damaged.")
    if duration > limits.max_seconds:
        raise InputError(f"The video is {duration:.1f} s long; the limit is {limits.max_seconds:g} s. "
                         "Trim it and try again.")
    info = MediaInfo(path=path, format_name=format_name, duration_s=duration, has_video=True,
                     has_audio=audio is not None, width=width, height=height,
                     fps=_ratio(video.get("avg_frame_rate")) or _ratio(video.get("r_frame_rate")),
                     video_codec=codec, pix_fmt=video.get("pix_fmt"),
                     audio_codec=audio.get("codec_name") if audio else None, rotation=rotation)
    if check_decode:
        if _grab(info, 0.0, 16) is None:
            raise InputError(_undecodable(info))
        if duration > 1.0 and _grab(info, duration - 1.0, 16) is None:
            raise InputError(_ends_early(info))
    return info


def _undecodable(info: MediaInfo) -> str:
    return (f"{info.path.name} could not be decoded (video codec {info.video_codec}); the file is damaged or uses "
            "a variant this app cannot read. Convert it to H.264 MP4 and try again.")


def _ends_early(info: MediaInfo) -> str:
    return (f"{info.path.name} ends early: it declares {info.duration_s:.1f} s but its end cannot be decoded. The "
            "file is probably truncated; upload it again.")


def _is_picture(path: Path) -> bool:
    """Whether the file opens as a photo (header only; the video demuxers refuse picture formats)."""
    try:
        with Image.open(path, formats=("JPEG", "PNG", "WEBP", "GIF")):
            return True
    except Exception:  # noqa: BLE001 - anything PIL cannot open is simply not a picture
        return False


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    """Scale (width, height) so the longest side is at most `side` (never up), keeping at least one pixel."""
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _clip_box(width: int, height: int, side: int) -> tuple[int, int]:
    """A clip's size scaled down (never up) into the `side`p box (short side ≤ side, long side ≤ 16/9 of it); the
    size itself when it already fits."""
    short, long = min(width, height), max(width, height)
    scale = min(1.0, side / short, round(side * 16 / 9) / long)
    if scale == 1.0:
        return width, height
    return _even(width * scale), _even(height * scale)


def _even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def _grab(info: MediaInfo, at_s: float, side: int) -> Image.Image | None:
    """One frame at `at_s` seconds, at most `side` px on its longest side (input seeking: only the frames from the
    nearest keyframe are decoded)."""
    width, height = _fit(info.width, info.height, side)
    raw = _capture(["-ss", f"{max(0.0, at_s):.3f}", *_input(info.path), "-map", "0:v:0", "-frames:v", "1",
                    "-vf", f"scale={width}:{height}:flags=area", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
    if raw is None or len(raw) < width * height * 3:
        return None
    return Image.frombuffer("RGB", (width, height), raw[:width * height * 3], "raw", "RGB", 0, 1).copy()


# -- audio ---------------------------------------------------------------------------------------------------------

def _music_length(audio: AudioSource, max_seconds: float) -> float:
    """The music's length in seconds; empty, invalid, unreadable or too long music is refused."""
    import soundfile as sf

    if isinstance(audio, tuple):
        samples, rate = audio
        samples = np.asarray(samples, dtype=np.float32)
        if samples.size == 0 or int(rate) <= 0:
            raise InputError("The music is empty.")
        if not np.all(np.isfinite(samples)):
            raise InputError("The music contains invalid samples (NaN or infinity).")
        duration = samples.shape[0] / int(rate)
    else:
        path = Path(audio)
        try:
            facts = sf.info(str(path))
        except (RuntimeError, OSError, sf.LibsndfileError):
            raise InputError(f"The audio file {path.name} could not be read; upload a WAV, FLAC, OGG or MP3 "
                             "file.") from None
        if facts.frames <= 0 or facts.samplerate <= 0:
            raise InputError(f"The audio file {path.name} is empty.")
        duration = facts.frames / facts.samplerate
    if duration > max_seconds:
        raise InputError(f"The music is {duration:.1f} s long; the limit for a video is {max_seconds:g} s.")
    return duration


def _audio(audio: AudioSource, work: Path, max_seconds: float) -> tuple[Path, float]:
    """A path ffmpeg can read and its length in seconds; samples are written to a float WAV in `work`."""
    import soundfile as sf

    duration = _music_length(audio, max_seconds)
    if not isinstance(audio, tuple):
        return Path(audio), duration
    samples, rate = audio
    path = work / "music.wav"
    sf.write(path, np.asarray(samples, dtype=np.float32), int(rate), subtype="FLOAT")
    return path, duration


def _audio_args() -> list[str]:
    # 48 kHz stereo AAC: what every phone, browser and social network plays without converting
    return ["-c:a", "aac", "-b:a", "192k", "-ar", "48000", "-ac", "2"]


def _video_args(faststart: bool = True) -> list[str]:
    # a picture made to be joined to its music later skips +faststart: the join moves the index once, for both
    return ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", "-profile:v", "high",
            *(["-movflags", "+faststart"] if faststart else []), "-map_metadata", "-1", "-map_chapters", "-1"]


# -- photos --------------------------------------------------------------------------------------------------------

def _output_size(aspect: float, side: int, source_long: int, square: bool) -> tuple[int, int]:
    """Even output dimensions with the given aspect (width/height), the long side at most `side` and never larger
    than the photo itself (upscaling adds bytes, not detail)."""
    long_side = max(16, min(side, source_long))
    if square:
        return _even(long_side), _even(long_side)
    if aspect >= 1:
        return _even(long_side), _even(long_side / aspect)
    return _even(long_side * aspect), _even(long_side)


def _load_photo(source: ImageSource, limits: VideoLimits) -> Image.Image:
    return load_image(source, max_pixels=limits.max_image_pixels, max_side=ZOOM_HEADROOM * limits.output_side).image


def _canvas(photo: Image.Image, width: int, height: int) -> Image.Image:
    """The photo on a (width×height)·ZOOM_HEADROOM canvas: cropped to fill when the aspects nearly match, else
    whole over a blurred, darkened copy of itself (so an album of mixed portrait and landscape photos shows every
    photo entire)."""
    big = (width * ZOOM_HEADROOM, height * ZOOM_HEADROOM)
    target, source = big[0] / big[1], photo.width / photo.height
    if abs(math.log(source / target)) < 0.08:
        return _cover(photo, big)
    background = _cover(photo, (max(8, big[0] // 8), max(8, big[1] // 8)))
    background = background.filter(ImageFilter.GaussianBlur(3)).point(lambda v: v * 6 // 10).resize(
        big, Image.Resampling.BILINEAR)
    scale = min(big[0] / photo.width, big[1] / photo.height)
    inner = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                         Image.Resampling.LANCZOS)
    background.paste(inner, ((big[0] - inner.width) // 2, (big[1] - inner.height) // 2))
    return background


def _save_canvas(canvas: Image.Image, path: Path) -> None:
    # JPEG at full chroma and q95: invisible after the downscale to the output, and a tenth of a PNG's bytes in
    # the cache folder while an album of ten photos is made
    canvas.save(path, quality=95, subsampling=0)


def _cover(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    scale = max(size[0] / photo.width, size[1] / photo.height)
    width, height = math.ceil(photo.width * scale), math.ceil(photo.height * scale)
    resized = photo.resize((width, height), Image.Resampling.LANCZOS)
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    return resized.crop((left, top, left + size[0], top + size[1]))


# (zoom at start, zoom at end, x centre at start, x at end, y at start, y at end): gentle moves, varied per photo
_MOVES = (
    (1.00, 1.10, 0.50, 0.52, 0.50, 0.47),  # slow push in
    (1.10, 1.00, 0.45, 0.50, 0.50, 0.50),  # slow pull out
    (1.07, 1.07, 0.30, 0.70, 0.50, 0.50),  # drift right
    (1.07, 1.07, 0.70, 0.30, 0.45, 0.55),  # drift left
)


def _zoompan(frames: int, width: int, height: int, move: int) -> str:
    z0, z1, x0, x1, y0, y1 = _MOVES[move % len(_MOVES)]
    span = max(1, frames - 1)
    p = f"min(on/{span},1)"  # inside quotes: no filter-graph escaping needed
    zoom = f"{z0}+({z1 - z0:.4f})*{p}"
    x = f"(iw-iw/zoom)*({x0}+({x1 - x0:.4f})*{p})"
    y = f"(ih-ih/zoom)*({y0}+({y1 - y0:.4f})*{p})"
    return f"zoompan=z='{zoom}':x='{x}':y='{y}':d={frames}:s={width}x{height}:fps={FPS},setsar=1,format=yuv420p"


@functools.lru_cache(maxsize=None)
def _font() -> str | None:
    """A DejaVu font file (fonts-dejavu-core ships with Debian's ffmpeg), or None; its path must need no escaping
    in a filter graph."""
    candidates = []
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans:bold"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            candidates.append(found)
        except (OSError, subprocess.TimeoutExpired):
            pass
    candidates += ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                   "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
    for candidate in candidates:
        if candidate and _SAFE_PATH.match(candidate) and Path(candidate).is_file():
            return candidate
    return None


def _clean_text(text: str | None, limit: int) -> str:
    if not text:
        return ""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _overlay(work: Path, width: int, height: int, title: str | None, caption: str | None) -> tuple[str, list[str]]:
    """drawtext filters for the title (top) and caption (bottom), one centred line each. The text reaches ffmpeg
    only through files (`textfile=` with expansion off), so quotes, colons, percent signs or backslashes in a
    caption can neither break nor extend the filter graph."""
    title, caption = _clean_text(title, 80), _clean_text(caption, 200)
    if not title and not caption:
        return "", []
    font = _font()
    if font is None:
        return "", ["No font was found for the title and caption, so the video has no text on it."]
    filters = []
    short = min(width, height)
    for kind, text, size, max_lines in (("title", title, max(10, short // 14), 2),
                                        ("caption", caption, max(8, short // 22), 3)):
        if not text:
            continue
        chars = max(8, int(width * 0.9 / (size * 0.6)))
        lines = textwrap.wrap(text, chars)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][:max(1, chars - 1)].rstrip() + "…"
        step = int(size * 1.35)
        top = int(height * 0.06) if kind == "title" else int(height * 0.94) - step * len(lines)
        for number, line in enumerate(lines):
            name = f"{kind}{number}.txt"
            (work / name).write_text(line, encoding="utf-8")
            filters.append(
                f"drawtext=fontfile={font}:textfile={name}:expansion=none:fontsize={size}:fontcolor=white"
                f":box=1:boxcolor=black@0.45:boxborderw={max(2, size // 4)}:x=(w-text_w)/2:y={top + number * step}"
                f":alpha='min(t/0.6,1)'")
    return ",".join(filters), []


# -- public operations ---------------------------------------------------------------------------------------------

def photo_video(image: ImageSource, audio: AudioSource, out_dir: str | os.PathLike, *, square: bool = False,
                title: str | None = None, caption: str | None = None, limits: VideoLimits = VideoLimits(),
                progress: Progress | None = None, cancel: threading.Event | None = None) -> Rendered:
    """One photo with a slow pan/zoom for exactly the music's length (within one frame), the music as AAC, and
    the title and caption over it when given: an MP4 (H.264 yuv420p, +faststart) a phone or social network plays
    as is, ≤ `limits.output_side` on its long side, in the photo's aspect ratio or square."""
    with _Workspace(out_dir, "photo") as work:
        audio_path, duration = _audio(audio, work.dir, limits.max_seconds)
        photo = _load_photo(image, limits)
        width, height = _output_size(photo.width / photo.height, limits.output_side, max(photo.size), square)
        _save_canvas(_canvas(photo, width, height), work.dir / "photo.jpg")
        frames = max(1, round(duration * FPS))
        text, notes = _overlay(work.dir, width, height, title, caption)
        graph = _zoompan(frames, width, height, 0) + ("," + text if text else "")
        made = work.dir / "out.mp4"
        _run(["-i", "photo.jpg", "-i", f"file:{audio_path.resolve()}", "-filter_complex", f"[0:v]{graph}[v]",
              "-map", "[v]", "-map", "1:a:0", "-t", f"{duration:.6f}",
              *_video_args(), "-tune", "stillimage", *_audio_args(), "out.mp4"],
             cwd=work.dir, duration_s=duration, what="video", progress=progress, cancel=cancel)
        final = work.publish(made)
    return Rendered(final, probe(final, check_decode=False, limits=_own(limits)), tuple(notes))


def even_boundaries(count: int, duration_s: float) -> list[float]:
    """The `count - 1` times at which an album of `count` photos moves on, when each gets an equal share."""
    return [duration_s * k / count for k in range(1, count)]


def _given(count: int) -> str:
    return f"{count} {'was' if count == 1 else 'were'} given"


def check_album(images: Sequence, boundaries_s: Sequence[float], duration: float) -> list[float]:
    """The change times as floats, or an InputError: 2–10 photos, one time fewer than photos, each photo shown at
    least MIN_SLIDE_S within `duration`. Cheap: call it before the music is made, to fail fast."""
    count = len(images)
    if not MIN_PHOTOS <= count <= MAX_PHOTOS:
        raise InputError(f"An album needs {MIN_PHOTOS} to {MAX_PHOTOS} photos; {_given(count)}.")
    bounds = [float(b) for b in boundaries_s]
    if len(bounds) != count - 1:
        raise InputError(f"{count} photos need {count - 1} change times; {_given(len(bounds))}.")
    edges = [0.0, *bounds, duration]
    if not all(math.isfinite(b) for b in bounds) or any(b - a < MIN_SLIDE_S for a, b in zip(edges, edges[1:])):
        raise InputError(f"Each photo must be shown for at least {MIN_SLIDE_S:g} s within the music's "
                         f"{duration:.1f} s (change times {', '.join(f'{b:g}' for b in bounds)}).")
    return bounds


def photo_name(source, number: int) -> str:
    """How a message names the album's photo `number` (1-based): with its file name when it has one."""
    if isinstance(source, (str, os.PathLike)):
        return f"photo {number} ({Path(source).name})"
    return f"photo {number}"


class Assembly:
    """A video put together while its music is still being made (`start_slideshow`, `start_scored_video`).

    The picture is encoded from the start, in the background and below the music's priority (a clip whose picture
    can be copied needs nothing); the music is encoded to AAC as it arrives (`add_music`, any number of chunks, or
    `use_music_file`); `finish` waits for both and joins them without re-encoding either, so what is left after
    the music's last chunk is the end of the AAC encode and a stream copy. Leaving the `with` block stops whatever
    still runs and removes the temporary files."""

    def __init__(self, out_dir: str | os.PathLike, stem: str, duration_s: float, what: str, limits: VideoLimits):
        self.duration_s, self.what, self.limits = duration_s, what, limits
        self.notes: list[str] = []
        self._workspace = _Workspace(out_dir, stem)
        self.dir = self._workspace.__enter__().dir
        self._picture: _Job | None = None
        self._picture_input: list[str] = ["-i", "picture.mp4"]
        self._music_graph = "[{m}:a]anull[a]"
        self._music_inputs: list[str] = []
        self._audio: _Job | None = None
        self._feed: queue.Queue | None = None
        self._feeder: threading.Thread | None = None
        self._music_format: tuple[int, int] | None = None
        self._jobs: list[_Job] = []

    def __enter__(self) -> "Assembly":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._feed is not None:
            self._feed.put(None)
        for job in self._jobs:
            job.discard()
        if self._feeder is not None:
            self._feeder.join(timeout=5)
        self._workspace.__exit__(None, None, None)

    def _start_picture(self, args: list[str]) -> None:
        # the music streams to a listener meanwhile: on a machine with few cores it must not wait for the encoder
        self._picture = _Job([*args, "-an", "-sn", "-dn", "-t", f"{self.duration_s:.6f}", "picture.mp4"],
                             cwd=self.dir, what=self.what, nice=BACKGROUND_NICE)
        self._jobs.append(self._picture)

    def _start_audio(self, music_input: list[str], stdin: bool) -> None:
        graph = self._music_graph.format(m=self._music_inputs.count("-i"))  # the music follows those inputs
        self._audio = _Job([*self._music_inputs, *music_input, "-filter_complex", graph, "-map", "[a]",
                            "-t", f"{self.duration_s:.6f}", *_audio_args(), "-vn", "-sn", "-dn", "-f", "mp4",
                            "music.mp4"], cwd=self.dir, what=self.what, stdin=stdin)
        self._jobs.append(self._audio)

    def add_music(self, samples: np.ndarray, rate: int) -> None:
        """The next chunk of the music (float samples, mono or (n, channels)); it is encoded as it arrives, on a
        thread of its own, so a slow encoder never holds up the caller."""
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if samples.size and not np.all(np.isfinite(samples)):
            raise InputError("The music contains invalid samples (NaN or infinity).")
        channels = 1 if samples.ndim == 1 else samples.shape[1]
        if self._audio is None:
            if int(rate) <= 0:
                raise InputError("The music is empty.")
            self._music_format = (int(rate), channels)
            self._start_audio(["-f", "f32le", "-ar", str(int(rate)), "-ac", str(channels), "-i", "pipe:0"],
                              stdin=True)
            self._feed = queue.Queue()
            self._feeder = threading.Thread(target=self._write_music, args=(self._audio, self._feed), daemon=True,
                                            name="music-encoder-feed")
            self._feeder.start()
        elif self._music_format != (int(rate), channels):
            raise ValueError(f"the music changed format mid-way: {self._music_format} → {(int(rate), channels)}")
        if samples.size:
            self._feed.put(samples.tobytes())

    @staticmethod
    def _write_music(job: _Job, feed: queue.Queue) -> None:
        while True:
            data = feed.get()
            if data is None:
                job.close_input()
                return
            if not job.write(data):  # ffmpeg stopped; `finish` reports why, or the call was cancelled
                job.close_input()
                return

    def use_music_file(self, audio: AudioSource) -> None:
        """All the music at once: a file (WAV, FLAC, OGG, MP3) or (samples, rate)."""
        if isinstance(audio, tuple):
            self.add_music(*audio)
            return
        self._start_audio(["-i", f"file:{Path(audio).resolve()}"], stdin=False)

    def finish(self, progress: Progress | None = None, cancel: threading.Event | None = None) -> Rendered:
        """Wait for the picture and the music, then join them into the finished MP4."""
        if self._audio is None:
            raise InputError("The music is empty.")
        if self._feed is not None:
            self._feed.put(None)
        share = 0.85 if self._picture is not None else 0.5
        if self._picture is not None:
            self._picture.wait(duration_s=self.duration_s, cancel=cancel,
                               progress=(lambda done: progress(share * done)) if progress else None)
        self._audio.wait(duration_s=self.duration_s, cancel=cancel,
                         progress=(lambda done: progress(share * done)) if progress and not self._picture else None)
        made = self.dir / "out.mp4"
        _run([*self._picture_input, "-i", "music.mp4", "-map", "0:v:0", "-map", "1:a:0", "-c", "copy",
              "-t", f"{self.duration_s:.6f}", "-movflags", "+faststart", "-map_metadata", "-1",
              "-map_chapters", "-1", "-sn", "-dn", "out.mp4"],
             cwd=self.dir, duration_s=self.duration_s, what=self.what, cancel=cancel,
             progress=(lambda done: progress(share + (1 - share) * done)) if progress else None)
        final = self._workspace.publish(made)
        return Rendered(final, probe(final, check_decode=False, limits=_own(self.limits)), tuple(self.notes))


def start_slideshow(images: Sequence[ImageSource], boundaries_s: Sequence[float], duration_s: float,
                    out_dir: str | os.PathLike, *, square: bool = False,
                    limits: VideoLimits = VideoLimits()) -> Assembly:
    """The picture of a slideshow (see `slideshow`) starts encoding now; the music is added to the returned
    Assembly as it is made. Bad photos and change times are refused here, before any music."""
    bounds = check_album(images, boundaries_s, duration_s)
    photos = []
    for number, source in enumerate(images, 1):
        try:
            photos.append(_load_photo(source, limits))
        except InputError as exc:
            raise InputError(f"The album's {photo_name(source, number)} cannot be used: {exc}") from None
    assembly = Assembly(out_dir, "album", duration_s, "slideshow", limits)
    try:
        first = photos[0]
        width, height = _output_size(first.width / first.height, limits.output_side,
                                     max(max(p.size) for p in photos), square)
        total = max(len(photos), round(duration_s * FPS))
        edges = [0, *(round(b * FPS) for b in bounds), total]
        shortest = min(b - a for a, b in zip(edges, edges[1:]))
        # even, so half of it falls on each side of the boundary; MIN_SLIDE_S keeps it at 8 frames or more
        fade = max(2, min(round(MAX_CROSSFADE_S * FPS), int(shortest * 0.4)) // 2 * 2)
        inputs, chains = [], []
        for k, photo in enumerate(photos):
            _save_canvas(_canvas(photo, width, height), assembly.dir / f"photo{k}.jpg")
            start = edges[k] - (fade // 2 if k else 0)
            end = edges[k + 1] + (fade // 2 if k < len(photos) - 1 else 0)
            inputs += ["-i", f"photo{k}.jpg"]
            chains.append(f"[{k}:v]{_zoompan(end - start, width, height, k)}[s{k}]")
        label = "s0"
        for k in range(1, len(photos)):
            offset = (edges[k] - fade // 2) / FPS
            chains.append(f"[{label}][s{k}]xfade=transition=fade:duration={fade / FPS:.4f}"
                          f":offset={offset:.4f}[x{k}]")
            label = f"x{k}"
        assembly._start_picture([*inputs, "-filter_complex", ";".join(chains), "-map", f"[{label}]",
                                 *_video_args(faststart=False), "-tune", "stillimage"])
    except BaseException:
        assembly.close()
        raise
    return assembly


def slideshow(images: Sequence[ImageSource], boundaries_s: Sequence[float], audio: AudioSource,
              out_dir: str | os.PathLike, *, square: bool = False, limits: VideoLimits = VideoLimits(),
              progress: Progress | None = None, cancel: threading.Event | None = None) -> Rendered:
    """2–10 photos, photo k shown from `boundaries_s[k-1]` (0 for the first) to `boundaries_s[k]` (the music's end
    for the last), each with its own gentle move, crossfading into the next centred on the boundary — where the
    music changes prompt — under one audio track; the video lasts the music's length within one frame.

    The frame takes the first photo's aspect ratio (or square); photos of another shape are shown whole over a
    blurred copy of themselves. A photo that cannot be read is named in the message."""
    if cancel is not None and cancel.is_set():
        raise Cancelled()
    duration = _music_length(audio, limits.max_seconds)
    with start_slideshow(images, boundaries_s, duration, out_dir, square=square, limits=limits) as assembly:
        assembly.use_music_file(audio)
        return assembly.finish(progress, cancel)


def _own(limits: VideoLimits) -> VideoLimits:
    """Limits for re-reading a file this module made (it may be as long as the music allowed)."""
    return dataclasses.replace(limits, max_seconds=max(limits.max_seconds, 1.0) + 1.0)


def start_scored_video(info: MediaInfo, out_dir: str | os.PathLike, *, keep_original_audio: bool,
                       limits: VideoLimits = VideoLimits()) -> Assembly:
    """A clip's new soundtrack (see `score_video`), assembled while its music is made: a picture that needs
    re-encoding starts now; the music is added to the returned Assembly as it is made."""
    assembly = Assembly(out_dir, "scored", info.duration_s, "scored video", limits)
    try:
        length = info.duration_s
        fade = min(1.0, length / 10)
        music = (f"[{{m}}:a]aresample=48000,aformat=channel_layouts=stereo,apad=whole_dur={length:.6f},"
                 f"atrim=end={length:.6f},afade=t=out:st={length - fade:.6f}:d={fade:.6f}")
        if keep_original_audio and info.has_audio:
            assembly._music_inputs = _input(info.path)
            assembly._music_graph = (
                f"{music}[m];[0:a:0]aresample=48000,aformat=channel_layouts=stereo,"
                f"volume={ORIGINAL_UNDER_DB}dB,apad=whole_dur={length:.6f},atrim=end={length:.6f}[o];"
                "[m][o]amix=inputs=2:duration=first:normalize=0,alimiter=limit=0.97:level=0:latency=1[a]")
        else:
            assembly._music_graph = f"{music}[a]"
            if keep_original_audio:
                assembly.notes.append("The clip has no sound of its own; the video carries the music only.")
        box = _clip_box(info.width, info.height, limits.output_side)
        if info.video_codec == "h264" and info.pix_fmt == "yuv420p" and box == (info.width, info.height):
            assembly._picture_input = _input(info.path)  # copied untouched by the final join
        else:
            width, height = _even(box[0]), _even(box[1])  # yuv420p needs even sides
            assembly._start_picture([*_input(info.path), "-map", "0:v:0",
                                     "-vf", f"scale={width}:{height},setsar=1,format=yuv420p",
                                     *_video_args(faststart=False), "-fpsmax", "60"])
            assembly.notes.append(f"The picture was re-encoded to H.264 {width}×{height}.")
    except BaseException:
        assembly.close()
        raise
    return assembly


def score_video(video: str | os.PathLike | MediaInfo, audio: AudioSource, out_dir: str | os.PathLike, *,
                keep_original_audio: bool, limits: VideoLimits = VideoLimits(), progress: Progress | None = None,
                cancel: threading.Event | None = None) -> Rendered:
    """The clip with the music as its soundtrack, as an MP4 as long as the clip: the music is cut (with a short
    fade) or padded with silence to fit; the clip's own sound is dropped, or kept 12 dB under the music.

    The picture is copied untouched when it is already H.264 yuv420p and fits `limits.output_side`p (1080p: short
    side ≤ 1080, long side ≤ 1920; fast, no quality loss), else re-encoded to fit: a person's own clip keeps its
    resolution up to that box, whereas pictures made from photos stay within `output_side` on their long side.
    Metadata (a phone's GPS position, names) is never carried over."""
    info = video if isinstance(video, MediaInfo) else probe(video, limits=limits)
    if cancel is not None and cancel.is_set():
        raise Cancelled()
    _music_length(audio, limits.max_seconds + 1.0)
    with start_scored_video(info, out_dir, keep_original_audio=keep_original_audio, limits=limits) as assembly:
        assembly.use_music_file(audio)
        return assembly.finish(progress, cancel)


# -- scenes --------------------------------------------------------------------------------------------------------

_THUMB = 64  # side of the square thumbnails scene detection compares


def _features(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bin colour histogram (4 levels per channel, normalised) and a 16×16 luma thumbnail of one frame."""
    quantised = (frame >> 6).astype(np.int32)
    codes = quantised[..., 0] * 16 + quantised[..., 1] * 4 + quantised[..., 2]
    histogram = np.bincount(codes.ravel(), minlength=64).astype(np.float32) / codes.size
    luma = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    thumb = luma.reshape(16, _THUMB // 16, 16, _THUMB // 16).mean(axis=(1, 3))
    return histogram, thumb


def _cut_scores(info: MediaInfo, rate: float, progress: Progress | None,
                cancel: threading.Event | None) -> tuple[np.ndarray, float]:
    """Change score (0..1) between consecutive samples taken `rate` times a second, streaming tiny frames through
    a pipe (memory stays constant whatever the clip's size or length). Returns (scores, seconds per sample)."""
    frame_bytes = _THUMB * _THUMB * 3
    command = [_tool("ffmpeg"), "-hide_banner", "-nostdin", "-v", "error", "-skip_loop_filter", "all",
               *_input(info.path), "-map", "0:v:0", "-an", "-sn", "-dn",
               "-vf", f"fps={rate:.4f},scale={_THUMB}:{_THUMB}:flags=area", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "pipe:1"]
    expected = max(1, int(info.duration_s * rate))
    scores: list[float] = []
    previous = None
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(RUN_TIMEOUT_S, process.kill)  # a decoder stuck on a hostile file ends the read
    watchdog.start()
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            raw = process.stdout.read(frame_bytes)
            if len(raw) < frame_bytes:
                if watchdog.finished.is_set():
                    raise MediaError("Reading the video's scenes took too long and was stopped.")
                break
            current = _features(np.frombuffer(raw, dtype=np.uint8).reshape(_THUMB, _THUMB, 3))
            if previous is not None:
                colour = 0.5 * float(np.abs(current[0] - previous[0]).sum())
                layout = float(np.abs(current[1] - previous[1]).mean()) / 128.0
                # a cut changes the colours or the layout; a pan changes the layout only a little at 5 fps
                scores.append(min(1.0, max(colour, 0.5 * (colour + layout))))
            previous = current
            if progress is not None:
                progress(min(0.95, len(scores) / expected))
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
    if previous is None:
        raise InputError(_undecodable(info))
    # the same test as probe's check_decode: the picture must decode until a second before its declared end
    if info.duration_s > 1.0 and (len(scores) + 1) / rate < info.duration_s - 1.0:
        raise InputError(_ends_early(info))
    return np.asarray(scores, dtype=np.float32), 1.0 / rate


def scenes(video: str | os.PathLike | MediaInfo, *, max_scenes: int = 8, analysis_side: int = 384,
           limits: VideoLimits = VideoLimits(), progress: Progress | None = None,
           cancel: threading.Event | None = None) -> list[Scene]:
    """The clip's shots, in order, covering it from 0 to its end: cuts are found by comparing small frames sampled
    a few times a second; shots under MIN_SCENE_S merge into the neighbour across the weaker cut, and the weakest
    cuts go until at most `max_scenes` remain. Each scene carries a frame from its middle for captioning."""
    if max_scenes < 1:
        raise InputError("max_scenes must be at least 1.")
    info = video if isinstance(video, MediaInfo) else probe(video, limits=limits, check_decode=False)
    rate = min(ANALYSIS_FPS, MAX_ANALYSIS_SAMPLES / max(info.duration_s, 1e-3))
    scores, step = _cut_scores(info, rate, progress, cancel)
    padded = np.concatenate([[0.0], scores, [0.0]])
    peaks = (scores >= CUT_THRESHOLD) & (scores >= padded[:-2]) & (scores >= padded[2:])
    # score i compares sample i with sample i+1: the cut lies between them, so it is placed half-way
    cuts = [((i + 0.5) * step, float(scores[i])) for i in np.flatnonzero(peaks)]
    cuts = [(t, s) for t, s in cuts if 0 < t < info.duration_s]
    cuts = _merge(cuts, info.duration_s, max_scenes)
    edges = [0.0, *(t for t, _ in cuts), info.duration_s]
    strengths = [1.0, *(s for _, s in cuts)]
    found = []
    for k, (start, end) in enumerate(zip(edges, edges[1:])):
        frame = _grab(info, (start + end) / 2, analysis_side) or _grab(info, start, analysis_side)
        if frame is None:
            raise InputError(f"A frame at {start:.1f} s of {info.path.name} could not be decoded; the file is "
                             "damaged.")
        found.append(Scene(round(start, 3), round(end, 3), frame, round(strengths[k], 3)))
    if progress is not None:
        progress(1.0)
    return found


def _merge(cuts: list[tuple[float, float]], duration: float, max_scenes: int) -> list[tuple[float, float]]:
    """Drop cuts until every scene lasts MIN_SCENE_S (the shortest scene loses its weaker edge; a clip shorter
    than that is one scene) and at most `max_scenes` remain (the weakest cuts go first)."""
    cuts = sorted(cuts)
    while cuts:
        edges = [0.0, *(t for t, _ in cuts), duration]
        lengths = [b - a for a, b in zip(edges, edges[1:])]
        shortest = min(range(len(lengths)), key=lengths.__getitem__)
        if lengths[shortest] >= MIN_SCENE_S:
            break
        # scene k is bounded by cut k-1 (before) and cut k (after)
        around = [j for j in (shortest - 1, shortest) if 0 <= j < len(cuts)]
        del cuts[min(around, key=lambda j: cuts[j][1])]
    while len(cuts) > max_scenes - 1:
        del cuts[min(range(len(cuts)), key=lambda j: cuts[j][1])]
    return cuts
