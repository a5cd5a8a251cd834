"""Music that follows pictures: an album of photos or the scenes of a clip, each with its own prompt, made as one
continuous piece whose mood moves at the boundaries (the continuation engine: no cut), then put into a video by
`media.py`. Reached through the facade (`Pipeline.album`, `Pipeline.video_soundtrack`); it calls only the facade's
public methods (the facade imports this module only when one of them is called).

Progress callbacks take (fraction 0..1, a short sentence for the person waiting) and are called on the caller's
thread. `cancel` stops the work at the next chunk of music or the next ffmpeg poll.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import media
from .catalog import SongMatch
from .core import Description, Pipeline
from .errors import Cancelled, InputError
from .images import ImageSource
from .recommend import lyric_query
from .music.request import SEED_LIMIT, DurationLimits, check_seed

__all__ = ["Part", "Soundtrack", "album", "video_soundtrack"]

Report = Callable[[float, str], None]
Listener = Callable[[np.ndarray, int], None]  # (samples, sample rate): the music as it is made
LINE_POLL_S = 0.5
SCENES_MAX = 8  # one prompt per scene: more than this in a minute of video would change the music every few seconds
SONGS_K = 10


@dataclass(frozen=True)
class Part:
    """One photo of an album or one scene of a clip: where it sits in the video and what the music was asked for."""

    start_s: float
    end_s: float
    caption: str
    emotion: str
    prompt: str

    def to_dict(self) -> dict:
        return {"start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3), "caption": self.caption,
                "emotion": self.emotion, "prompt": self.prompt}


@dataclass(frozen=True)
class Soundtrack:
    """A finished video, the parts its music followed, and real songs for the whole of it."""

    video: media.Rendered
    parts: tuple[Part, ...]
    songs: dict[str, list[SongMatch]] = field(default_factory=dict)
    seed: int = 0
    notes: tuple[str, ...] = ()


class _Stages:
    """Maps each stage's own 0..1 progress into its slice of the whole."""

    def __init__(self, report: Report | None, cancel: threading.Event | None):
        self.report, self.cancel = report, cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()

    def say(self, fraction: float, message: str) -> None:
        self.check()
        if self.report is not None:
            self.report(max(0.0, min(1.0, fraction)), message)

    def slice(self, low: float, high: float, message: str) -> Callable[[float], None]:
        return lambda done: self.say(low + (high - low) * done, message)


def music_in_parts(pipe: Pipeline, prompts: Sequence[str], lengths: Sequence[float], seed: int, *, client: str,
                   stages: _Stages, low: float, high: float,
                   listen: Listener | None = None) -> tuple[np.ndarray, int, list[float]]:
    """One piece of music: part k plays `prompts[k]` for `lengths[k]` seconds, each part continuing the previous
    one's clip (`Pipeline.extend`), so the music moves to the next prompt without a cut. Waits for a place in the
    fair line first and holds it only while the music is made. Returns (samples, rate, where each part ends).

    `listen(samples, rate)` gets the piece as it is made, chunk by chunk: exactly the returned samples, in order
    (the last chunk cut, or silence added, to the asked length)."""
    total = float(sum(lengths))
    parts, ends, rate, clip_id = [], [], 0, None
    heard = 0
    with pipe.music_ticket(client, total) as ticket:
        while not ticket.wait(LINE_POLL_S):
            stages.say(low, ticket.line().text())
        stages.say(low, f"Making the music: 0.0 of {total:.1f} s.")
        made = 0.0
        for k, (prompt, seconds) in enumerate(zip(prompts, lengths)):
            # a seed of its own per part: the same seed on every part would restart the same random draws
            part_seed = (seed + k) % SEED_LIMIT
            chunks = (pipe.stream(prompt, seconds, part_seed, cancel=stages.cancel) if clip_id is None
                      else pipe.extend(clip_id, seconds, prompt, part_seed, cancel=stages.cancel))
            try:
                for chunk in chunks:
                    if ticket.expired:
                        raise Cancelled("This request was dropped: nothing read its progress for too long.")
                    ticket.touch(made + chunk.samples.shape[0] / chunk.sample_rate)
                    parts.append(chunk.samples)
                    rate, clip_id = chunk.sample_rate, chunk.clip_id
                    if listen is not None:
                        piece = chunk.samples[:max(0, int(round(total * rate)) - heard)]
                        heard += piece.shape[0]
                        if piece.shape[0]:
                            listen(piece, rate)
                    made += chunk.samples.shape[0] / chunk.sample_rate
                    stages.say(low + (high - low) * min(1.0, made / total),
                               f"Making the music: {made:.1f} of {total:.1f} s (part {k + 1} of {len(prompts)}).")
            finally:
                chunks.close()
            ends.append(made)
    samples = np.concatenate(parts)
    # each part is rounded to the model's frame rate; the piece is trimmed or padded to the asked length exactly
    wanted = int(round(total * rate))
    if samples.shape[0] > wanted:
        samples = samples[:wanted]
    elif samples.shape[0] < wanted:
        silence = np.zeros((wanted - samples.shape[0],) + samples.shape[1:], dtype=samples.dtype)
        samples = np.concatenate([samples, silence])
        if listen is not None:
            listen(silence, rate)
    return samples, rate, [min(end, total) for end in ends]


def songs_for_all(pipe: Pipeline, analyses: Sequence[Description], k: int = SONGS_K) -> tuple[dict, list[str]]:
    """Songs for a set of pictures as a whole: audio features averaged over the pictures (key and mode, which are
    categories, take their most common value) and lyrics matching all the captions with the most common mood."""
    notes: list[str] = []
    names = analyses[0].mood.features.keys()
    features = {}
    for name in names:
        values = [a.mood.features[name] for a in analyses if a.mood.features.get(name) is not None]
        if not values:
            continue
        if name in ("key", "mode"):
            features[name] = float(Counter(round(v) for v in values).most_common(1)[0][0])
        else:
            features[name] = float(np.mean(values))
    emotion = Counter(a.mood.emotion for a in analyses).most_common(1)[0][0]
    captions = "; ".join(dict.fromkeys(a.caption for a in analyses if a.caption))
    try:
        songs = pipe.recommend(lyric_query(captions, emotion), k=k, features=features)
    except InputError as exc:
        notes.append(f"No songs could be suggested: {exc}")
        songs = {}
    return songs, notes


def _both(assembly: media.Assembly, listen: Listener | None) -> Listener:
    def hear(samples: np.ndarray, rate: int) -> None:
        assembly.add_music(samples, rate)
        if listen is not None:
            listen(samples, rate)
    return hear


def album(pipe: Pipeline, images: Sequence[ImageSource], duration_s, seed, *, square: bool = False,
          client: str = "local", progress: Report | None = None, cancel: threading.Event | None = None,
          listen: Listener | None = None) -> Soundtrack:
    """2–10 photos → a slideshow whose music follows them: each photo is analyzed (caption, mood, prompt) and
    gets an equal share of the duration; the music moves from one photo's prompt to the next at its boundary,
    where the pictures crossfade. The slideshow's picture is encoded while the music is made (`listen` hears the
    music then), so the MP4 is ready shortly after the music's last chunk."""
    stages = _Stages(progress, cancel)
    images = list(images or [])
    seed = check_seed(seed)
    # the album's music is also the video's soundtrack: both limits apply
    duration = DurationLimits(pipe.durations.low, min(pipe.durations.high, pipe.settings.video_max_s)).check(
        duration_s)
    media.check_album(images, media.even_boundaries(len(images), duration), duration)
    share = duration / len(images)
    if share < pipe.durations.low:
        raise InputError(f"Each of the {len(images)} photos would get {share:.1f} s of music; the shortest music "
                         f"part is {pipe.durations.low:g} s. Make the album longer or use fewer photos.")
    loaded = []
    for number, image in enumerate(images, 1):
        try:
            loaded.append(pipe.load_image(image))
        except InputError as exc:
            raise InputError(f"The album's {media.photo_name(image, number)} cannot be used: {exc}") from None
    stages.say(0.0, f"Looking at the {len(images)} photos.")
    described = pipe.describe(loaded)
    stages.say(0.2, "Looking at the photos: done.")
    prompts = [d.prompt.text for d in described]
    # the pictures change where the music will change prompt: each part lasts whole frames of the music model
    planned = list(np.cumsum([pipe.music_seconds(share) for _ in images]))
    bounds = [min(end, duration) for end in planned[:-1]]
    limits = media.VideoLimits.from_settings(pipe.settings)
    with media.start_slideshow(images, bounds, duration, pipe.settings.audio_dir, square=square,
                               limits=limits) as assembly:
        samples, rate, ends = music_in_parts(pipe, prompts, [share] * len(images), seed, client=client,
                                             stages=stages, low=0.2, high=0.8, listen=_both(assembly, listen))
        boundaries = ends[:-1]
        if not np.allclose(boundaries, bounds, rtol=0, atol=1e-6):
            raise RuntimeError(f"the music changed prompt at {boundaries}, not at the planned {bounds}")
        rendered = assembly.finish(stages.slice(0.8, 0.98, "Putting the slideshow together."), cancel)
    songs, notes = songs_for_all(pipe, described)
    notes = [*dict.fromkeys(note for d in described for note in d.notes), *notes]
    edges = [0.0, *boundaries, samples.shape[0] / rate]
    parts = tuple(Part(a, b, d.caption, d.mood.emotion, d.prompt.text)
                  for a, b, d in zip(edges, edges[1:], described))
    stages.say(1.0, "Done.")
    return Soundtrack(rendered, parts, songs, seed, tuple(rendered.notes) + tuple(notes))


def video_soundtrack(pipe: Pipeline, video, seed, keep_original_audio: bool = False, *, client: str = "local",
                     progress: Report | None = None, cancel: threading.Event | None = None,
                     listen: Listener | None = None) -> Soundtrack:
    """A clip with new music: its scenes are found, a frame of each is analyzed (caption, mood, prompt), and music
    for the clip's whole length moves to each scene's prompt at its cut; the original sound is dropped or kept
    under the music. The soundtrack is encoded as the music is made (`listen` hears it then) and joined to the
    picture at the end without re-encoding either."""
    stages = _Stages(progress, cancel)
    seed = check_seed(seed)
    limits = media.VideoLimits.from_settings(pipe.settings)
    stages.say(0.0, "Checking the video.")
    # scenes() decodes the whole clip and refuses a damaged or truncated one on the way: no decode check here
    info = media.probe(video, limits=limits, check_decode=False)
    low, high = pipe.durations.low, pipe.durations.high
    if info.duration_s < low:
        raise InputError(f"The video is {info.duration_s:.1f} s long; it needs at least {low:g} s for music.")
    if info.duration_s > high:
        raise InputError(f"The video is {info.duration_s:.1f} s long; the music can be at most {high:g} s.")
    found = media.scenes(info, max_scenes=SCENES_MAX, limits=limits,
                         progress=stages.slice(0.0, 0.1, "Finding the scenes."), cancel=cancel)
    # scenes last media.MIN_SCENE_S at least; should the music's own minimum be longer, short scenes join the one
    # before them (the first joins the next)
    groups: list[list[media.Scene]] = []
    for scene in found:
        if groups and scene.duration_s < low:
            groups[-1].append(scene)
        else:
            groups.append([scene])
    if len(groups) > 1 and sum(s.duration_s for s in groups[0]) < low:
        groups[1] = groups[0] + groups[1]
        del groups[0]
    stages.say(0.1, f"Looking at the {len(groups)} scene{'s' if len(groups) != 1 else ''}.")
    described = pipe.describe([group[0].frame for group in groups])
    # the last part ends at the clip's end, whatever rounding the scene times carry
    starts = [group[0].start_s for group in groups]
    lengths = [b - a for a, b in zip(starts, [*starts[1:], info.duration_s])]
    with media.start_scored_video(info, pipe.settings.audio_dir, keep_original_audio=keep_original_audio,
                                  limits=limits) as assembly:
        samples, rate, ends = music_in_parts(pipe, [d.prompt.text for d in described], lengths, seed,
                                             client=client, stages=stages, low=0.2, high=0.85,
                                             listen=_both(assembly, listen))
        rendered = assembly.finish(stages.slice(0.85, 0.98, "Putting the music on the video."), cancel)
    songs, notes = songs_for_all(pipe, described)
    notes = [*dict.fromkeys(note for d in described for note in d.notes), *notes]
    edges = [0.0, *ends[:-1], info.duration_s]
    parts = tuple(Part(a, b, d.caption, d.mood.emotion, d.prompt.text)
                  for a, b, d in zip(edges, edges[1:], described))
    stages.say(1.0, "Done.")
    return Soundtrack(rendered, parts, songs, seed, tuple(rendered.notes) + tuple(notes))
