"""Generated clips and uploads are bounded by age and size (pipeline/storage.py), and the janitor the app starts
watches the folder Gradio really stores uploads in."""

import json
import os
import time
import urllib.request
import uuid

from pipeline.storage import Bound, Janitor, prune_folder


def _file(path, size, age_s, now):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_old_files_go_then_the_oldest_until_the_folder_fits(tmp_path):
    now = time.time()
    stale = _file(tmp_path / "a1" / "old.jpg", 10, 4000, now)
    oldest = _file(tmp_path / "b2" / "p1.png", 600, 300, now)
    middle = _file(tmp_path / "c3" / "p2.png", 600, 200, now)
    newest = _file(tmp_path / "d4" / "p3.png", 600, 100, now)
    removed = prune_folder(tmp_path, max_age_s=3600, max_bytes=1300, now=now)
    assert removed == 2 and not stale.exists() and not oldest.exists()
    assert middle.exists() and newest.exists()
    assert not (tmp_path / "a1").exists() and not (tmp_path / "b2").exists(), "emptied folders are removed"


def test_nothing_is_touched_within_the_bounds_and_a_missing_folder_is_fine(tmp_path):
    now = time.time()
    kept = _file(tmp_path / "x" / "ok.wav", 100, 10, now)
    assert prune_folder(tmp_path, max_age_s=60, max_bytes=1000, now=now) == 0 and kept.exists()
    assert prune_folder(tmp_path / "absent", 60, 1000) == 0


def test_the_pipelines_janitor_bounds_clips_and_uploads_with_the_settings(pipeline, tmp_path):
    small = pipeline.settings.replace(upload_max_mb=0.001, upload_max_age_s=60, temp_max_mb=1, temp_max_age_s=60)
    from pipeline.core import Pipeline

    janitor = Pipeline(small).janitor(tmp_path / "uploads")
    now = time.time()
    uploads = [_file(tmp_path / "uploads" / uuid.uuid4().hex / "photo.jpg", 400, 10 - i, now) for i in range(5)]
    assert janitor.run_once() >= 3
    left = [p for p in uploads if p.exists()]
    assert sum(p.stat().st_size for p in left) <= 1000 and uploads[-1] in left  # the newest survives
    assert [b.folder for b in janitor.bounds] == [small.audio_dir, tmp_path / "uploads"]


def test_uploads_land_in_the_folder_the_janitor_watches(live_app):
    import app as app_module

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"probe.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8\xff" + b"0" * 100 + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{live_app}gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        stored = json.loads(response.read())[0]
    folder = app_module.upload_folder()
    assert os.path.commonpath([os.path.realpath(stored), os.path.realpath(folder)]) == os.path.realpath(folder)
    janitor = Janitor([Bound(folder, max_age_s=3600, max_bytes=10**12)])
    janitor.run_once()
    assert os.path.exists(stored), "files within the bounds are kept"
