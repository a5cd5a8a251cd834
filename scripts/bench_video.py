"""Speed of the media layer on a generated clip. Prints one JSON object.

    python scripts/bench_video.py --json                     # 20-s 720p clip with 4 scenes, a tone as the music
    python scripts/bench_video.py --seconds 20 --height 720 --wav music.wav --json

Figures (seconds of wall time; the clip's generation is not timed):
- `analysis_s`: probe + scenes(), as the app runs them (scenes() checks decodability on its one pass);
- `score_s` / `score_keep_original_s`: score_video() with the whole music at once, original sound dropped /
  mixed under; in the app the music is encoded as it is made, so less is left after its end (`bench.py video`'s
  `mux_s`);
- `photo_video_s` / `slideshow_s`: a 12-MP photo and a 4-photo album with the same music, made at the default
  output side (1080 px);
- `cuts_made` / `cuts_found`: where the clip changes scene and where scenes() put the changes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline import media  # noqa: E402

SOURCES = ("testsrc2", "smptebars", "rgbtestsrc", "testsrc")  # four visibly different scenes


def make_clip(folder: Path, seconds: float, height: int, fps: int = 30) -> tuple[Path, list[float]]:
    """An H.264 + AAC MP4 of `seconds` at `height`p (16:9) made of len(SOURCES) equal scenes; returns it and the
    times of its cuts."""
    width = (height * 16 // 9) // 2 * 2
    part = seconds / len(SOURCES)
    args = []
    for source in SOURCES:
        args += ["-f", "lavfi", "-i", f"{source}=s={width}x{height}:r={fps}:d={part:.3f}"]
    args += ["-f", "lavfi", "-i", f"sine=f=660:d={seconds:.3f}:sample_rate=48000"]
    joined = "".join(f"[{k}:v]" for k in range(len(SOURCES))) + f"concat=n={len(SOURCES)}:v=1:a=0[v]"
    clip = folder / "clip.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args, "-filter_complex", joined,
                    "-map", "[v]", "-map", f"{len(SOURCES)}:a", "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-movflags", "+faststart", str(clip)], check=True)
    return clip, [round(part * k, 3) for k in range(1, len(SOURCES))]


def make_photos(folder: Path) -> list[Path]:
    """Four 12-megapixel "photos" (4000×3000, as a phone takes them), one per test source."""
    paths = []
    for source in SOURCES:
        path = folder / f"{source}.png"
        subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"{source}=s=4000x3000", "-frames:v", "1", str(path)], check=True)
        paths.append(path)
    return paths


def make_music(folder: Path, seconds: float, rate: int = 32000) -> Path:
    """A stand-in for generated music: a chord with a slow tremolo (MusicGen's rate, mono, float)."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    chord = sum(np.sin(2 * np.pi * hz * t) for hz in (220.0, 277.2, 329.6)) / 3
    music = (0.4 * chord * (0.75 + 0.25 * np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
    path = folder / "music.wav"
    sf.write(path, music, rate, subtype="FLOAT")
    return path


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 3)


def bench_video(seconds: float = 20.0, height: int = 720, wav: str | Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        folder = Path(tmp)
        clip, cuts_made = make_clip(folder, seconds, height)
        music = Path(wav) if wav else make_music(folder, seconds)
        out = folder / "out"

        def analyse():
            info = media.probe(clip, check_decode=False)
            return info, media.scenes(info)

        (info, found), analysis_s = _timed(analyse)
        scored, score_s = _timed(lambda: media.score_video(info, music, out, keep_original_audio=False))
        mixed, mixed_s = _timed(lambda: media.score_video(info, music, out, keep_original_audio=True))
        photos = make_photos(folder)
        photo, photo_s = _timed(lambda: media.photo_video(photos[0], music, out, title="Benchmark",
                                                          caption="a generated test clip"))
        bounds = media.even_boundaries(len(photos), seconds)
        album, album_s = _timed(lambda: media.slideshow(photos, bounds, music, out))
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "clip": {"seconds": seconds, "width": info.width, "height": info.height, "fps": round(info.fps, 2),
                     "codec": info.video_codec},
            "analysis_s": analysis_s,
            "scenes": len(found),
            "cuts_made": cuts_made,
            "cuts_found": [scene.start_s for scene in found[1:]],
            "score_s": score_s,
            "score_keep_original_s": mixed_s,
            "score_copied_video": not any("re-encoded" in note for note in scored.notes),
            "photo_video_s": photo_s,
            "photo_video_size": [photo.info.width, photo.info.height],
            "slideshow_s": album_s,
            "slideshow_size": [album.info.width, album.info.height],
            "output_mb": {"scored": round(scored.path.stat().st_size / 1e6, 2),
                          "photo": round(photo.path.stat().st_size / 1e6, 2),
                          "album": round(album.path.stat().st_size / 1e6, 2),
                          "mixed": round(mixed.path.stat().st_size / 1e6, 2)},
            "python_peak_rss_mb": round(own, 1),  # the photos in PIL; ffmpeg runs in its own processes
        }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--wav", default=None, help="music to use (default: a generated chord of the clip length)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = bench_video(args.seconds, args.height, args.wav)
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
