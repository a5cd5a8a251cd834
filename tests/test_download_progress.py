"""First run on a Space: a model downloads from the Hub and its status shows bytes, total and speed meanwhile.

A local HTTP server on 127.0.0.1 stands in for the Hub (`HF_ENDPOINT`), serving a copy of the demo caption model
slowly. huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported, so the app side runs in a
child process (`child()` below) with those set.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPO, COMMIT = "acme/blip-demo", "0123456789abcdef0123456789abcdef01234567"
PADDING_MB = 24  # the Hub client reports progress every 10 MB of a file: a bigger file shows several steps


class FakeHub:
    """The three things `snapshot_download` at a pinned commit asks the Hub: the file tree, then per file a HEAD
    (commit, ETag, size) and a GET of the bytes, here sent in slow chunks. `cut` names files whose GETs stop after
    that many bytes and drop the connection (an interrupted download), until they are taken out of `cut`."""

    def __init__(self, files: dict[str, bytes], chunk: int = 1 << 20, delay_s: float = 0.04, *, repo: str = REPO,
                 commit: str = COMMIT, repo_type: str = "model", cut: dict[str, int] | None = None):
        self.files, self.requests, self.cut = files, [], dict(cut or {})
        resolve_prefix = f"/{repo}/resolve/{commit}/" if repo_type == "model" else \
            f"/{repo_type}s/{repo}/resolve/{commit}/"
        tree = f"/api/{repo_type}s/{repo}/tree/{commit}"
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _name(self):
                path = unquote(urlparse(self.path).path)
                return path[len(resolve_prefix):] if path.startswith(resolve_prefix) else None

            def _file(self):
                return hub.files.get(self._name())

            def _headers(self, data: bytes):
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path))
                data = self._file()
                if data is None:
                    return self._missing()
                self.send_response(200)
                self._headers(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if unquote(urlparse(self.path).path).startswith(tree):
                    body = json.dumps([{"type": "file", "path": name, "size": len(data),
                                        "oid": hashlib.sha1(data).hexdigest()}
                                       for name, data in hub.files.items()]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = self._file()
                if data is None:
                    return self._missing()
                self.send_response(200)
                self._headers(data)
                stop = hub.cut.get(self._name())
                if stop is not None:
                    self.wfile.write(data[:stop])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                for start in range(0, len(data), chunk):
                    self.wfile.write(data[start:start + chunk])
                    self.wfile.flush()
                    time.sleep(delay_s)

            def _missing(self):
                body = b'{"error": "not found"}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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
    hub = FakeHub(files)
    yield hub
    hub.close()


def test_a_first_run_download_shows_bytes_total_and_speed_in_the_status(fake_hub, demo_paths, cache_dir, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=fake_hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_download_progress import child; "
            f"child({str(cache_dir)!r}, {str(demo_paths.clip)!r}, {str(demo_paths.music)!r})")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                            cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    total = sum(len(data) for data in fake_hub.files.values())

    assert report["state"] == "ready" and report["source"] == "hub", report["detail"]
    final = report["progress"]
    assert final["finished"] and final["bytes"] == final["total"] == total
    assert final["files"] == final["files_total"] == len(fake_hub.files)
    # while it downloaded, the status said how far it had got instead of a bare "loading"
    midway = [s for s in report["seen"] if 0 < s["progress"]["bytes"] < total and not s["progress"]["finished"]]
    assert midway, report["seen"]
    assert any(s["progress"]["bytes_per_s"] > 0 for s in midway)
    assert all(s["detail"].startswith("downloading ") and " / " in s["detail"] and "MB" in s["detail"]
               for s in midway), [(s["detail"], s["progress"]) for s in midway]
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
