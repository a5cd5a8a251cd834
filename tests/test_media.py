"""The media layer against real files: inputs are made with FFmpeg's test sources (colour bars, test patterns,
solid colours, tones; scene changes by concatenating different sources), outputs are checked with ffprobe-level
facts (streams, codecs, durations, sizes, atom order) and decoded pixels and samples."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline import media
from pipeline.errors import Cancelled, InputError, UserFacingError
from pipeline.media import VideoLimits
from tests.conftest import ffmpeg
from tests.conftest import ffprobe as facts

FRAME = 1 / media.FPS


def top_level_atoms(path: Path) -> list[str]:
    names, data, at = [], path.read_bytes(), 0
    while at + 8 <= len(data):
        size, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[at + 8:at + 16], "big")
        names.append(kind)
        if size < 8:
            break
        at += size
    return names


def frame_at(path: Path, seconds: float) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-ss", f"{seconds}", "-i", str(path), "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], check=True, capture_output=True).stdout
    info = facts(path)["video"][0]
    return np.frombuffer(raw, np.uint8).reshape(info["height"], info["width"], 3)


def samples_of(path: Path, rate: int = 16000) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", str(rate),
                          "-f", "f32le", "pipe:1"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.float32)


def band_energy(signal: np.ndarray, rate: int, hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    freqs = np.fft.rfftfreq(len(signal), 1 / rate)
    return float(np.sum(spectrum[(freqs > hz - 20) & (freqs < hz + 20)] ** 2))


def write_tone(path: Path, seconds: float, hz: float = 220.0, rate: int = 32000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media-inputs")
    paths = {name: folder / name for name in (
        "bars.png", "portrait.png", "red.png", "green.png", "blue.png", "cuts.mp4", "silent.mp4", "flash.mp4",
        "mpeg4.avi", "longsound.mp4", "audio.m4a", "subs.mkv", "unknown.avi", "wide.mp4", "truncated.mp4",
        "corrupt.mp4")}
    ffmpeg("-f", "lavfi", "-i", "smptebars=s=320x180", "-frames:v", "1", str(paths["bars.png"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=90x160", "-frames:v", "1", str(paths["portrait.png"]))
    for colour, rgb in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (160, 90), rgb).save(paths[f"{colour}.png"])
    # 10 s, cuts at 2.5, 5.0 and 7.5 s between a moving pattern, solid red, colour bars and solid blue; 1 kHz tone
    segment = "s=160x90:r=10:d=2.5"
    ffmpeg("-f", "lavfi", "-i", f"testsrc2={segment}", "-f", "lavfi", "-i", f"color=c=red:{segment}",
           "-f", "lavfi", "-i", f"smptebars={segment}", "-f", "lavfi", "-i", f"color=c=blue:{segment}",
           "-f", "lavfi", "-i", "sine=f=1000:d=10:sample_rate=48000",
           "-filter_complex", "[0:v][1:v][2:v][3:v]concat=n=4:v=1:a=0[v]", "-map", "[v]", "-map", "4:a",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
           "-movflags", "+faststart", str(paths["cuts.mp4"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=160x90:r=10:d=3", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(paths["silent.mp4"]))
    # a 0.6 s flash of white inside 6 s of colour bars: too short to be a scene of its own
    ffmpeg("-f", "lavfi", "-i", "smptebars=s=160x90:r=10:d=3", "-f", "lavfi", "-i", "color=c=white:s=160x90:r=10:d=0.6",
           "-f", "lavfi", "-i", "color=c=0x224488:s=160x90:r=10:d=2.4",
           "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1:a=0[v]", "-map", "[v]",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(paths["flash.mp4"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x180:r=10:d=2", "-f", "lavfi", "-i", "sine=d=2",
           "-c:v", "mpeg4", "-c:a", "pcm_s16le", str(paths["mpeg4.avi"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=160x90:r=10:d=3", "-f", "lavfi", "-i", "sine=d=5", "-c:v", "libx264",
           "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(paths["longsound.mp4"]))
    ffmpeg("-f", "lavfi", "-i", "sine=d=2", "-c:a", "aac", str(paths["audio.m4a"]))
    srt = paths["subs.mkv"].with_suffix(".srt")
    srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    ffmpeg("-i", str(srt), "-c:s", "srt", str(paths["subs.mkv"]))
    # an AVI whose FourCC no decoder knows: ffprobe sees a video stream but cannot name its codec
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=160x90:r=10:d=1", "-c:v", "mpeg4", "-tag:v", "ZZZZ", "-strict", "-1",
           str(paths["unknown.avi"]))
    ffmpeg("-f", "lavfi", "-i", "color=s=8200x64:r=5:d=0.4", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(paths["wide.mp4"]))
    whole = paths["cuts.mp4"].read_bytes()  # +faststart: the index survives, the end of the data does not
    paths["truncated.mp4"].write_bytes(whole[:len(whole) // 2])
    paths["corrupt.mp4"].write_bytes(np.random.default_rng(0).bytes(20_000))
    paths["music.wav"] = write_tone(folder / "music.wav", 3.3)
    paths["long-music.wav"] = write_tone(folder / "long-music.wav", 12.0)
    paths["short-music.wav"] = write_tone(folder / "short-music.wav", 4.0)
    playlist = folder / "playlist.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{paths['cuts.mp4']}\n#EXT-X-ENDLIST\n")
    paths["playlist.m3u8"] = playlist
    return paths


def assert_shareable(path: Path, seconds: float) -> dict:
    """H.264 yuv420p + AAC, +faststart, even size ≤ 1080, lasting `seconds` within one frame."""
    info = facts(path)
    assert [s["codec_name"] for s in info["video"]] == ["h264"]
    assert [s["codec_name"] for s in info["audio"]] == ["aac"]
    video = info["video"][0]
    assert video["pix_fmt"] == "yuv420p"
    assert video["width"] % 2 == 0 and video["height"] % 2 == 0 and max(video["width"], video["height"]) <= 1080
    assert abs(float(info["format"]["duration"]) - seconds) <= FRAME + 1e-6
    assert abs(float(video["duration"]) - seconds) <= FRAME + 1e-6
    atoms = top_level_atoms(path)
    assert atoms.index("moov") < atoms.index("mdat"), atoms
    assert "location" not in json.dumps(info["format"].get("tags", {})).lower()
    return video


# -- photo video ---------------------------------------------------------------------------------------------------

def test_photo_video_is_a_shareable_mp4_as_long_as_the_music(inputs, tmp_path):
    seen = []
    made = media.photo_video(inputs["bars.png"], inputs["music.wav"], tmp_path, progress=seen.append)
    video = assert_shareable(made.path, 3.3)
    assert (video["width"], video["height"]) == (320, 180)
    assert made.info.duration_s == pytest.approx(3.3, abs=FRAME)
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == [made.path.name]  # no work files left behind
    first, last = frame_at(made.path, 0).astype(int), frame_at(made.path, 3.2).astype(int)
    assert np.abs(first - last).mean() > 2  # the picture moves (pan/zoom), it is not a still


def test_photo_video_keeps_the_photo_shape_or_makes_it_square_within_the_output_side(inputs, tmp_path):
    small = VideoLimits(output_side=128)
    portrait = media.photo_video(inputs["portrait.png"], inputs["music.wav"], tmp_path, limits=small)
    video = assert_shareable(portrait.path, 3.3)
    assert (video["width"], video["height"]) == (72, 128)
    square = media.photo_video(inputs["bars.png"], inputs["music.wav"], tmp_path, square=True, limits=small)
    video = assert_shareable(square.path, 3.3)
    assert video["width"] == video["height"] == 128


def test_photo_video_takes_samples_and_a_rate(inputs, tmp_path):
    rate = 32000
    tone = 0.3 * np.sin(2 * np.pi * 330 * np.arange(int(2.5 * rate)) / rate)
    made = media.photo_video(inputs["bars.png"], (tone.astype(np.float32), rate), tmp_path)
    assert_shareable(made.path, 2.5)


@pytest.mark.parametrize("title, caption", [
    ("It's 100% \"fine\": ok", r"a\b c:d 'e' %{pts} %{eif\:1\:d} [out];drawtext=text=x,null"),
    ("line one\nline two\x00\x1b[31m", "\\" * 40 + "'" * 10 + ":" * 10 + "%" * 10 + " word" * 80),
])
def test_title_and_caption_are_drawn_literally_whatever_they_contain(inputs, tmp_path, title, caption):
    photo = tmp_path / "red.png"
    Image.new("RGB", (320, 180), "red").save(photo)
    plain = media.photo_video(photo, inputs["music.wav"], tmp_path / "out")
    text = media.photo_video(photo, inputs["music.wav"], tmp_path / "out", title=title, caption=caption)
    assert text.notes == ()
    assert_shareable(text.path, 3.3)
    without, with_text = frame_at(plain.path, 2.0).astype(int), frame_at(text.path, 2.0).astype(int)
    height = without.shape[0]
    for band in (slice(0, height // 4), slice(3 * height // 4, height)):  # title on top, caption at the bottom
        assert np.abs(without[band] - with_text[band]).mean() > 5
    assert np.abs(without[height // 3:2 * height // 3] - with_text[height // 3:2 * height // 3]).mean() < 3


def test_bad_music_is_refused_clearly(inputs, tmp_path):
    with pytest.raises(InputError, match="could not be read"):
        media.photo_video(inputs["bars.png"], inputs["corrupt.mp4"], tmp_path)
    with pytest.raises(InputError, match="limit for a video is 5 s"):
        media.photo_video(inputs["bars.png"], inputs["long-music.wav"], tmp_path, limits=VideoLimits(max_seconds=5))
    with pytest.raises(InputError, match="invalid samples"):
        media.photo_video(inputs["bars.png"], (np.array([0.0, np.nan], np.float32), 32000), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_cancelled_render_stops_and_leaves_nothing(inputs, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        media.photo_video(inputs["bars.png"], inputs["long-music.wav"], tmp_path, cancel=cancel)
    with pytest.raises(Cancelled):
        media.score_video(inputs["cuts.mp4"], inputs["music.wav"], tmp_path, keep_original_audio=True, cancel=cancel)
    with pytest.raises(Cancelled):
        media.scenes(inputs["cuts.mp4"], cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_a_render_stopped_midway_leaves_nothing(inputs, tmp_path):
    cancel = threading.Event()

    seen = []

    def stop(fraction: float) -> None:  # the first report comes while ffmpeg runs (12 s of video take longer)
        seen.append(fraction)
        cancel.set()

    with pytest.raises(Cancelled):
        media.photo_video(inputs["bars.png"], inputs["long-music.wav"], tmp_path, progress=stop, cancel=cancel)
    assert seen and seen[-1] < 1.0
    assert list(tmp_path.iterdir()) == []


# -- album ---------------------------------------------------------------------------------------------------------

def test_slideshow_shows_each_photo_in_its_span_and_crossfades_at_the_boundaries(inputs, tmp_path):
    photos = [inputs["red.png"], inputs["green.png"], inputs["blue.png"]]
    made = media.slideshow(photos, [1.2, 2.2], inputs["music.wav"], tmp_path)
    video = assert_shareable(made.path, 3.3)
    assert (video["width"], video["height"]) == (160, 90)
    for seconds, channel in ((0.4, 0), (1.7, 1), (2.9, 2)):
        colour = frame_at(made.path, seconds).reshape(-1, 3).mean(axis=0)
        assert colour.argmax() == channel and colour[channel] > 150, (seconds, colour)
    mixed = frame_at(made.path, 1.2).reshape(-1, 3).mean(axis=0)  # the middle of the red → green crossfade
    assert mixed[0] > 50 and mixed[1] > 50, mixed


def test_even_boundaries_share_the_music_equally():
    assert media.even_boundaries(4, 12.0) == [3.0, 6.0, 9.0]


def test_slideshow_mixed_shapes_take_the_first_photo_shape_or_square(inputs, tmp_path):
    made = media.slideshow([inputs["portrait.png"], inputs["bars.png"]], [1.5], inputs["music.wav"], tmp_path,
                           square=True, limits=VideoLimits(output_side=96))
    video = assert_shareable(made.path, 3.3)
    assert video["width"] == video["height"] == 96


@pytest.mark.parametrize("count, said", [(0, "0 were given"), (1, "1 was given"), (11, "11 were given")])
def test_an_album_needs_two_to_ten_photos(inputs, tmp_path, count, said):
    with pytest.raises(InputError, match=f"2 to 10 photos; {said}"):
        media.slideshow([inputs["red.png"]] * count, [1.0] * max(0, count - 1), inputs["music.wav"], tmp_path)


def test_one_bad_photo_is_named(inputs, tmp_path):
    broken = tmp_path / "holiday.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match=r"photo 2 \(holiday\.jpg\)"):
        media.slideshow([inputs["red.png"], broken, inputs["blue.png"]], [1.0, 2.0], inputs["music.wav"],
                        tmp_path / "out")


@pytest.mark.parametrize("bounds, needle", [([1.0], "need 2 change times; 1 was given"), ([2.0, 1.5], "at least 1 s"),
                                            ([1.0, 3.0], "at least 1 s"), ([float("nan"), 2.0], "at least 1 s")])
def test_change_times_must_fit_the_music(inputs, tmp_path, bounds, needle):
    with pytest.raises(InputError, match=needle):
        media.slideshow([inputs["red.png"]] * 3, bounds, inputs["music.wav"], tmp_path)


# -- scenes --------------------------------------------------------------------------------------------------------

def test_scenes_are_found_where_the_clip_cuts(inputs):
    seen = []
    found = media.scenes(inputs["cuts.mp4"], analysis_side=96, progress=seen.append)
    assert len(found) == 4
    assert found[0].start_s == 0 and found[-1].end_s == pytest.approx(10.0, abs=0.05)
    for scene, following in zip(found, found[1:]):
        assert scene.end_s == following.start_s
    for scene, cut in zip(found[1:], (2.5, 5.0, 7.5)):
        assert abs(scene.start_s - cut) <= 0.5, [s.start_s for s in found]
    assert all(max(s.frame.size) <= 96 and s.frame.mode == "RGB" for s in found)
    red, blue = (np.asarray(found[i].frame, dtype=float).reshape(-1, 3).mean(axis=0) for i in (1, 3))
    assert red.argmax() == 0 and blue.argmax() == 2  # each scene's frame comes from inside it
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_the_weakest_cuts_go_when_there_are_too_many_scenes(inputs):
    found = media.scenes(inputs["cuts.mp4"], max_scenes=2, analysis_side=64)
    assert len(found) == 2
    assert found[1].start_s in {s.start_s for s in media.scenes(inputs["cuts.mp4"], analysis_side=64)}


def test_a_flash_shorter_than_a_scene_merges_into_a_neighbour(inputs):
    found = media.scenes(inputs["flash.mp4"], analysis_side=64)
    assert len(found) == 2
    assert all(s.duration_s >= media.MIN_SCENE_S for s in found)
    assert abs(found[1].start_s - 3.0) <= 0.5 or abs(found[1].start_s - 3.6) <= 0.5


def test_large_video_is_analysed_at_the_analysis_size(inputs, tmp_path):
    big = tmp_path / "big.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=1280x720:r=5:d=2", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(big))
    found = media.scenes(big, analysis_side=128)
    assert len(found) == 1 and found[0].frame.size == (128, 72)


# -- scoring a clip ------------------------------------------------------------------------------------------------

def video_md5(path: Path) -> str:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "md5",
                           "-"], check=True, capture_output=True, text=True).stdout.strip()


def test_scored_video_drops_the_original_sound_and_copies_the_picture(inputs, tmp_path):
    seen = []
    made = media.score_video(inputs["cuts.mp4"], inputs["long-music.wav"], tmp_path, keep_original_audio=False,
                             progress=seen.append)
    video = assert_shareable(made.path, 10.0)
    assert (video["width"], video["height"]) == (160, 90)
    assert video_md5(made.path) == video_md5(inputs["cuts.mp4"])  # copied, not re-encoded
    sound = samples_of(made.path)
    assert band_energy(sound, 16000, 220) > 1000 * band_energy(sound, 16000, 1000)
    assert seen[-1] == 1.0


def test_kept_original_sound_sits_under_the_music(inputs, tmp_path):
    made = media.score_video(inputs["cuts.mp4"], inputs["long-music.wav"], tmp_path, keep_original_audio=True)
    assert_shareable(made.path, 10.0)
    assert made.notes == ()
    sound = samples_of(made.path)
    music, original = band_energy(sound, 16000, 220), band_energy(sound, 16000, 1000)
    assert original > music / 1000  # the clip's tone is there ...
    assert original < music  # ... under the music


def test_short_music_is_padded_to_the_clip_length(inputs, tmp_path):
    made = media.score_video(inputs["cuts.mp4"], inputs["short-music.wav"], tmp_path, keep_original_audio=False)
    assert_shareable(made.path, 10.0)
    sound = samples_of(made.path)
    assert np.abs(sound[: 3 * 16000]).max() > 0.1 and np.abs(sound[6 * 16000:]).max() < 0.01


def test_the_scored_video_lasts_as_long_as_the_picture_not_its_longer_sound(inputs, tmp_path):
    assert float(facts(inputs["longsound.mp4"])["format"]["duration"]) > 4.9
    made = media.score_video(inputs["longsound.mp4"], inputs["long-music.wav"], tmp_path, keep_original_audio=True)
    assert_shareable(made.path, 3.0)


def test_a_clip_without_sound_gets_the_music_and_a_note(inputs, tmp_path):
    made = media.score_video(inputs["silent.mp4"], inputs["music.wav"], tmp_path, keep_original_audio=True)
    assert_shareable(made.path, 3.0)
    assert "no sound of its own" in made.notes[0]


def test_other_codecs_are_re_encoded(inputs, tmp_path):
    made = media.score_video(inputs["mpeg4.avi"], inputs["music.wav"], tmp_path, keep_original_audio=True)
    video = assert_shareable(made.path, 2.0)
    assert (video["width"], video["height"]) == (320, 180)
    assert any("re-encoded" in note for note in made.notes)


@pytest.mark.parametrize("side, size", [(90, (160, 90)), (72, (128, 72)), (50, (88, 50))])
def test_clips_keep_their_size_up_to_the_output_box(inputs, tmp_path, side, size):
    made = media.score_video(inputs["cuts.mp4"], inputs["music.wav"], tmp_path, keep_original_audio=False,
                             limits=VideoLimits(output_side=side))
    video = assert_shareable(made.path, 10.0)
    assert (video["width"], video["height"]) == size
    assert (video_md5(made.path) == video_md5(inputs["cuts.mp4"])) == (size == (160, 90))


# -- refusals ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, limits, needle", [
    ("corrupt.mp4", VideoLimits(), "corrupt, truncated or not a video"),
    ("truncated.mp4", VideoLimits(), "truncated"),
    ("subs.mkv", VideoLimits(), "contains no video stream"),
    ("audio.m4a", VideoLimits(), "is an audio file"),
    ("music.wav", VideoLimits(), "is an audio file"),
    ("cuts.mp4", VideoLimits(max_seconds=5), "10.0 s long; the limit is 5 s"),
    ("wide.mp4", VideoLimits(), "8200×64 pixels; the limit is 8192 px"),
    ("cuts.mp4", VideoLimits(max_side=100), "160×90 pixels; the limit is 100 px"),
    ("unknown.avi", VideoLimits(), r"codec this app cannot decode \(ZZZZ\)"),
    ("bars.png", VideoLimits(), "still picture"),
    ("playlist.m3u8", VideoLimits(), "corrupt, truncated or not a video"),  # never followed to the files it names
])
def test_bad_videos_get_a_clear_message(inputs, tmp_path, name, limits, needle):
    with pytest.raises(InputError, match=needle) as info:
        media.score_video(inputs[name], inputs["music.wav"], tmp_path, keep_original_audio=False, limits=limits)
    assert isinstance(info.value, UserFacingError)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_file_is_refused(tmp_path):
    empty = tmp_path / "clip.mp4"
    empty.touch()
    with pytest.raises(InputError, match="clip.mp4 is empty"):
        media.probe(empty)


def test_probe_reports_the_facts(inputs):
    info = media.probe(inputs["cuts.mp4"])
    assert (info.width, info.height, info.video_codec, info.audio_codec) == (160, 90, "h264", "aac")
    assert info.has_video and info.has_audio and info.fps == pytest.approx(10.0)
    assert info.duration_s == pytest.approx(10.0, abs=0.1)
    sound = media.probe(inputs["audio.m4a"], require_video=False)
    assert (sound.has_video, sound.has_audio, sound.audio_codec) == (False, True, "aac")


# -- assembling while the music is made ----------------------------------------------------------------------------

def chunks_of(path: Path, seconds: float = 0.5):
    music, rate = sf.read(path, dtype="float32")
    step = int(seconds * rate)
    return [(music[at:at + step], rate) for at in range(0, len(music), step)]


def test_a_clip_scored_with_music_arriving_in_chunks_is_the_same_video(inputs, tmp_path):
    info = media.probe(inputs["cuts.mp4"])
    with media.start_scored_video(info, tmp_path, keep_original_audio=False) as assembly:
        for samples, rate in chunks_of(inputs["long-music.wav"]):
            assembly.add_music(samples, rate)
        made = assembly.finish()
    video = assert_shareable(made.path, 10.0)
    assert (video["width"], video["height"]) == (160, 90)
    assert video_md5(made.path) == video_md5(inputs["cuts.mp4"])
    sound = samples_of(made.path)
    assert band_energy(sound, 16000, 220) > 1000 * band_energy(sound, 16000, 1000)
    assert [p.name for p in tmp_path.iterdir()] == [made.path.name]  # no work folder left behind


def test_a_slideshow_picture_is_encoded_before_its_music_arrives(inputs, tmp_path):
    photos = [inputs["red.png"], inputs["green.png"], inputs["blue.png"]]
    with media.start_slideshow(photos, [1.2, 2.2], 3.3, tmp_path) as assembly:
        picture, deadline = assembly.dir / "picture.mp4", time.monotonic() + 60
        while time.monotonic() < deadline:  # the picture gets finished with no music given yet
            try:
                made = facts(picture)
                break
            except subprocess.CalledProcessError:  # not written yet, or its index not yet
                time.sleep(0.1)
        assert made["video"] and not made["audio"]
        for samples, rate in chunks_of(inputs["music.wav"], 0.3):
            assembly.add_music(samples, rate)
        made = assembly.finish()
    assert_shareable(made.path, 3.3)
    assert frame_at(made.path, 2.9).reshape(-1, 3).mean(axis=0).argmax() == 2


def test_an_assembly_without_music_or_cancelled_leaves_nothing(inputs, tmp_path):
    info = media.probe(inputs["mpeg4.avi"])  # re-encoded: a picture job is running when it is abandoned
    with pytest.raises(InputError, match="The music is empty"):
        with media.start_scored_video(info, tmp_path, keep_original_audio=True) as assembly:
            assembly.finish()
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        with media.start_scored_video(info, tmp_path, keep_original_audio=True) as assembly:
            assembly.add_music(*chunks_of(inputs["music.wav"])[0])
            cancel.set()
            assembly.finish(cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_scenes_refuse_a_truncated_clip_on_their_one_pass(inputs):
    with pytest.raises(InputError, match="ends early"):
        media.scenes(inputs["truncated.mp4"])
