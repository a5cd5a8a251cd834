"""A local stand-in for the Hugging Face Hub on 127.0.0.1.

huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported, so the code under test runs in a
child process (`run_child`) whose environment (`child_env`) names the stand-in.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = "http://127.0.0.1:9"  # port 9 (discard): nothing listens, so the Hub is out of reach


class FakeHub:
    """One repo of the Hub, on a free port of 127.0.0.1. Every request is logged in `requests`.

    Download side, what `snapshot_download` at a pinned commit asks: the file tree, then per file a HEAD (commit,
    ETag, size) and a GET of the bytes, sent in chunks of `chunk` bytes `delay_s` apart. `cut` names files whose
    GETs stop after that many bytes and drop the connection (an interrupted download), until taken out of `cut`.
    """

    def __init__(self, files: dict[str, bytes] | None = None, chunk: int = 1 << 20, delay_s: float = 0.04, *,
                 repo: str, commit: str | None = None, repo_type: str = "model", cut: dict[str, int] | None = None):
        self.repo, self.repo_type = repo, repo_type
        self.prefix = "" if repo_type == "model" else f"{repo_type}s/"  # the Hub's URLs name no type for models
        self.chunk, self.delay_s, self.cut = chunk, delay_s, dict(cut or {})
        self.requests: list[tuple[str, str]] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        if files is not None:
            self.commits[commit] = files
            self.branches["main"] = commit
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits[self.branches["main"]]

    def commit_of(self, revision: str) -> str | None:
        return self.branches.get(revision, revision if revision in self.commits else None)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _routes(self):
        hub = self.server.hub
        repo, prefix = re.escape(hub.repo), re.escape(hub.prefix)
        api = f"/api/{hub.repo_type}s/{repo}"
        return [("GET", f"{api}/tree/(?P<revision>[^/]+)(?:/.*)?", self._tree),
                ("GET", f"/{prefix}{repo}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self._file),
                ("HEAD", f"/{prefix}{repo}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self._file)]

    def _dispatch(self):
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        path = unquote(urlparse(self.path).path)
        for method, pattern, action in self._routes():
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return action(**match.groupdict())
        self._error(404, "Repository not found")

    do_GET = do_HEAD = _dispatch

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value):
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, message: str):
        self._json(status, {"error": message})

    def _tree(self, revision: str):
        hub = self.server.hub
        commit = hub.commit_of(revision)
        if commit is None:
            return self._error(404, "Revision not found")
        self._json(200, [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                         for name, data in hub.commits[commit].items()])

    def _file(self, revision: str, path: str):
        hub = self.server.hub
        commit = hub.commit_of(revision)
        data = hub.commits[commit].get(path) if commit else None
        if data is None:
            return self._error(404, "Entry not found")
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        stop = hub.cut.get(path)
        if stop is not None:
            self.wfile.write(data[:stop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        for start in range(0, len(data), hub.chunk):
            self.wfile.write(data[start:start + hub.chunk])
            self.wfile.flush()
            time.sleep(hub.delay_s)


def child_env(endpoint: str, hf_home) -> dict[str, str]:
    """The environment of a child whose Hub is `endpoint`: online, with its own HF_HOME (no cache, no stored token)
    and no inherited HF_TOKEN."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home),
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("HF_TOKEN", None)
    return env


def run_child(function, *args: str, env: dict[str, str], timeout: float = 300) -> dict:
    """Call `function(*args)` in a fresh interpreter with `env`; return the JSON object it printed last."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from {function.__module__} import "
            f"{function.__name__}; {function.__name__}(*{args!r})")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
