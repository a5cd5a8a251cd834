"""Album and video soundtracks through the facade (demo models): the music follows the pictures' parts, made as
one piece by continuation, and lands in a video of the asked length."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.errors import Cancelled, InputError
from tests.conftest import ffmpeg, ffprobe

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = [str(ROOT / "assets" / "examples" / name) for name in ("cat.jpg", "coffee.jpg", "rocket_launch.jpg")]
FRAME = 1 / 25


def streams(path: Path) -> dict:
    data = ffprobe(path)
    return {"video": data["video"],
            "audio": data["audio"],
            "duration": float(data["format"]["duration"])}


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory) -> Path:
    """5 s: colour bars, then solid red from 2.5 s, with a tone of its own."""
    path = tmp_path_factory.mktemp("clips") / "two-scenes.mp4"
    ffmpeg("-f", "lavfi", "-i", "smptebars=s=160x90:r=10:d=2.5", "-f", "lavfi", "-i", "color=c=red:s=160x90:r=10:d=2.5",
           "-f", "lavfi", "-i", "sine=f=1000:d=5", "-filter_complex", "[0:v][1:v]concat=n=2:v=1:a=0[v]",
           "-map", "[v]", "-map", "2:a", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-c:a", "aac", str(path))
    return path


def test_an_album_follows_its_photos(pipeline):
    seen = []
    made = pipeline.album(PHOTOS, 4.5, 3, progress=lambda fraction, message: seen.append((fraction, message)))
    facts = streams(made.video.path)
    assert facts["video"] and facts["audio"] and abs(facts["duration"] - 4.5) <= FRAME + 1e-6
    assert made.video.path.parent == pipeline.settings.audio_dir
    assert [round(p.start_s, 2) for p in made.parts] == [0.0, 1.5, 3.0]
    assert made.parts[-1].end_s == pytest.approx(4.5, abs=0.02)
    assert all(p.caption and p.prompt for p in made.parts)
    assert made.songs["songs_fused"] and made.songs["songs_by_features"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Making the music" in m for _, m in seen) and any("slideshow" in m for _, m in seen)
    assert pipeline.music_line == {"running": 0, "waiting": 0}


def test_a_clip_gets_music_that_changes_at_its_cut(pipeline, two_scenes):
    made = pipeline.video_soundtrack(two_scenes, 5, keep_original_audio=True)
    facts = streams(made.video.path)
    assert facts["video"] and facts["audio"] and abs(facts["duration"] - 5.0) <= 0.05
    assert len(made.parts) == 2 and made.parts[1].start_s == pytest.approx(2.5, abs=0.2)
    assert made.parts[0].prompt and made.parts[1].prompt


def test_bad_albums_are_refused_before_any_music(pipeline, tmp_path):
    with pytest.raises(InputError, match="2 to 10 photos; 1 was given"):
        pipeline.album(PHOTOS[:1], 4, 1)
    with pytest.raises(InputError, match="2 to 10 photos; 11 were given"):
        pipeline.album((PHOTOS * 4)[:11], 30, 1)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo at all")
    with pytest.raises(InputError, match=r"photo 2 \(broken.jpg\)"):
        pipeline.album([PHOTOS[0], str(broken)], 4, 1)
    with pytest.raises(InputError, match="between 1 and 60 seconds"):
        pipeline.album(PHOTOS, 90, 1)
    assert pipeline.music_line == {"running": 0, "waiting": 0}


def test_cancelling_a_soundtrack_frees_the_music_line(pipeline, two_scenes):
    cancel = threading.Event()

    def stop_once_music_starts(fraction, message):
        if "Making the music" in message:
            cancel.set()

    with pytest.raises(Cancelled):
        pipeline.video_soundtrack(two_scenes, 1, progress=stop_once_music_starts, cancel=cancel)
    assert pipeline.music_line == {"running": 0, "waiting": 0}


def test_pictures_described_together_get_what_each_gets_alone(pipeline):
    from PIL import Image

    frames = [Image.open(path).convert("RGB") for path in PHOTOS]
    together = pipeline.describe(frames)
    for frame, described in zip(frames, together):
        alone = pipeline.analyze(frame, k=3)
        assert (described.caption, described.prompt.text) == (alone.caption, alone.prompt.text)
        assert described.mood == alone.mood


def test_the_music_is_heard_while_it_is_made_and_is_the_videos_soundtrack(pipeline):
    import numpy as np

    events = []

    def listen(samples, rate):
        events.append(("music", samples.copy(), rate))

    def progress(fraction, message):
        events.append(("progress", message, fraction))

    made = pipeline.album(PHOTOS[:2], 3.0, 4, progress=progress, listen=listen)
    heard = [e for e in events if e[0] == "music"]
    rate = heard[0][2]
    music = np.concatenate([e[1] for e in heard])
    assert len(heard) > 1 and music.shape[0] == round(3.0 * rate)
    # every chunk arrives before the video is put together
    last_chunk = max(i for i, e in enumerate(events) if e[0] == "music")
    first_video = min(i for i, e in enumerate(events) if e[0] == "progress" and "slideshow" in e[1])
    assert last_chunk < first_video
    import subprocess

    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(made.video.path), "-map", "0:a:0", "-ac", "1",
                          "-ar", str(rate), "-f", "f32le", "pipe:1"], check=True, capture_output=True).stdout
    track = np.frombuffer(raw, np.float32)
    mono = music if music.ndim == 1 else music.mean(axis=1)
    n = min(track.shape[0], mono.shape[0]) - rate // 10
    lags = range(-200, 201)
    best = max(float(np.corrcoef(mono[500:n], track[500 + lag:n + lag])[0, 1]) for lag in lags)
    assert best > 0.9, best
