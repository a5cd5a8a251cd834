"""First run on a Space: a model downloads from the Hub and its status shows bytes, total and speed meanwhile.

A local stand-in for the Hub (`tests/fake_hub.py`) serves a copy of the demo caption model slowly; the app side
runs in a child process (`child()` below) pointed at it.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.fake_hub import FakeHub, child_env, run_child

REPO, COMMIT = "acme/blip-demo", "0123456789abcdef0123456789abcdef01234567"
PADDING_MB = 24  # the Hub client reports progress every 10 MB of a file: a bigger file shows several steps


def child(cache_dir: str, clip: str, music: str) -> None:
    """Runs in the child process: load every part with the caption model coming from the (fake) Hub, recording
    the caption model's status while it loads; print what was seen as JSON."""
    from pipeline.components import CAPTION, Components
    from pipeline.settings import Settings

    settings = Settings(caption_model=REPO, caption_revision=COMMIT, clip_model=clip, music_model=music,
                        cache_dir=cache_dir, music_selfcheck=False)
    components = Components(settings, on_compute_thread=lambda: False)
    components.start()
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        caption = next(s for s in components.status() if s.name == CAPTION)
        if caption.state == "loading" and caption.progress is not None:
            seen.append({"detail": caption.detail, "progress": caption.progress})
        if caption.state in ("ready", "failed"):
            break
        time.sleep(0.05)
    components.wait_until_ready(timeout=300)
    caption = next(s for s in components.status() if s.name == CAPTION)
    print(json.dumps({"seen": seen, "state": caption.state, "detail": caption.detail, "source": caption.source,
                      "progress": caption.progress}))


@pytest.fixture
def fake_hub(demo_paths):
    files = {p.relative_to(demo_paths.caption).as_posix(): p.read_bytes()
             for p in sorted(demo_paths.caption.rglob("*")) if p.is_file()}
    files["padding.bin"] = bytes(PADDING_MB << 20)
    hub = FakeHub(files, repo=REPO, commit=COMMIT)
    yield hub
    hub.close()


def test_a_first_run_download_shows_bytes_total_and_speed_in_the_status(fake_hub, demo_paths, cache_dir, tmp_path):
    report = run_child(child, str(cache_dir), str(demo_paths.clip), str(demo_paths.music),
                       env=child_env(fake_hub.endpoint, tmp_path / "hf"), timeout=600)
    total = sum(len(data) for data in fake_hub.files.values())

    assert report["state"] == "ready" and report["source"] == "hub", report["detail"]
    final = report["progress"]
    assert final["finished"] and final["bytes"] == final["total"] == total
    assert final["files"] == final["files_total"] == len(fake_hub.files)
    # while it downloaded, the status said how far it had got instead of a bare "loading"
    midway = [s for s in report["seen"] if 0 < s["progress"]["bytes"] < total and not s["progress"]["finished"]]
    assert midway, report["seen"]
    assert any(s["progress"]["bytes_per_s"] > 0 for s in midway)
    # sizes in their own units (a snapshot taken while only the first small file is known says "218 B / 218 B")
    size = r"\d+(\.\d)? (B|kB|MB|GB)"
    assert all(re.match(rf"downloading {size} / {size} \(\d+%\)", s["detail"]) for s in midway), \
        [(s["detail"], s["progress"]) for s in midway]
    assert any(" MB (" in s["detail"] for s in midway)  # the padding file's megabytes
    # the total grows as the client learns each file's size, and is complete before the big file ends
    assert all(s["progress"]["bytes"] <= s["progress"]["total"] <= total for s in midway)
    assert midway[-1]["progress"]["total"] == total
    assert {("GET", f"/{REPO}/resolve/{COMMIT}/padding.bin")} <= set(fake_hub.requests)
    # once the files are in, the status says so while the model itself loads
    after = [s["detail"] for s in report["seen"] if s["progress"]["finished"]]
    assert all(d.startswith("downloaded ") and d.endswith(", loading") for d in after)


def test_progress_text_reads_naturally():
    from pipeline.artifacts import describe_progress

    text = describe_progress({"bytes": 412_000_000, "total": 2_400_000_000, "files": 3, "files_total": 9,
                              "bytes_per_s": 38_000_000})
    assert text == "downloading 412 MB / 2.4 GB (17%), 38 MB/s, 3 / 9 files"
    assert describe_progress({"bytes": 1500, "total": 0, "files": 0, "files_total": 0, "bytes_per_s": 0}) == \
        "downloading 1.5 kB"
    assert describe_progress({"bytes": 2_400_000_000, "total": 2_400_000_000, "finished": True,
                              "elapsed_s": 63.2}) == "downloaded 2.4 GB in 63 s, loading"
