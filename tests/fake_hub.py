"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for the download side and the upload side.

huggingface_hub reads `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_HUB_DISABLE_XET` when it is imported, so the code
under test runs in a child process (`run_child`) whose environment (`child_env`) names the stand-in.
"""

from __future__ import annotations

import base64
import fnmatch
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = "http://127.0.0.1:9"  # port 9 (discard): nothing listens, so the Hub is out of reach
LARGE = 10 << 20  # the Hub keeps files of this size out of git even when they are text
# a new repo's first commit, as the Hub makes it (abridged): files matching these patterns go to LFS
GITATTRIBUTES = (b"*.npy filter=lfs diff=lfs merge=lfs -text\n"
                 b"*.parquet filter=lfs diff=lfs merge=lfs -text\n")


def _needs_lfs(head: bytes, size: int) -> bool:
    """Git's own test for binary content (a NUL byte near the start), or too big for git: the Hub refuses both
    inline and asks for LFS."""
    return b"\0" in head or size >= LARGE


class FakeHub:
    """One repo of the Hub, on a free port of 127.0.0.1. Every request is logged in `requests`.

    Download side, what `snapshot_download` at a pinned commit asks: the file tree, then per file a HEAD (commit,
    ETag, size) and a GET of the bytes, sent in chunks of `chunk` bytes `delay_s` apart. `cut` names files whose
    GETs stop after that many bytes and drop the connection (an interrupted download), until taken out of `cut`.

    Upload side, what `HfApi.create_repo` and `create_commit` ask over the LFS protocol (the client's Xet path needs
    a chunk store this does not imitate, so `child_env` turns it off): create the repo (a first commit holding
    `.gitattributes`), validate a README's metadata, say per file whether it goes inline or to LFS (preupload),
    hand out LFS upload and verify URLs (batch), take each object's PUT only when its bytes have the sha256 it is
    named by, and commit an NDJSON of inline files, LFS pointers and deleted files onto `main` as a new commit
    (`commits`, `branches`). Listing a revision's files (`HfApi.list_repo_files`) is the download side's tree.
    Writes need `token`.
    """

    def __init__(self, files: dict[str, bytes] | None = None, chunk: int = 1 << 20, delay_s: float = 0.04, *,
                 repo: str, commit: str | None = None, repo_type: str = "model", cut: dict[str, int] | None = None,
                 token: str | None = None):
        self.repo, self.repo_type, self.token = repo, repo_type, token
        self.prefix = "" if repo_type == "model" else f"{repo_type}s/"  # the Hub's URLs name no type for models
        self.chunk, self.delay_s, self.cut = chunk, delay_s, dict(cut or {})
        self.requests: list[tuple[str, str]] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.lfs: dict[str, bytes] = {}  # the objects LFS PUTs brought, by sha256
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
    def url(self) -> str:
        return f"{self.endpoint}/{self.prefix}{self.repo}"

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits[self.branches["main"]]

    def commit_of(self, revision: str) -> str | None:
        return self.branches.get(revision, revision if revision in self.commits else None)

    def goes_to_lfs(self, commit: str, path: str, head: bytes, size: int) -> bool:
        """The Hub's preupload answer: LFS for what git should not hold, and for what `.gitattributes` routes there."""
        attributes = self.commits[commit].get(".gitattributes", b"").decode().splitlines()
        patterns = [line.split()[0] for line in attributes if "filter=lfs" in line.split()[1:]]
        return _needs_lfs(head, size) or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in patterns)

    def store(self, files: dict[str, bytes], parent: str | None, summary: str) -> str:
        """A new commit of `files` on `main`; its id hashes parent, message and contents, as git's does."""
        digest = hashlib.sha1(f"{parent}\n{summary}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{hashlib.sha256(files[path]).hexdigest()}\n".encode())
        oid = digest.hexdigest()
        self.commits[oid] = files
        self.branches["main"] = oid
        return oid

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
        api, lfs = f"/api/{hub.repo_type}s/{repo}", f"/{prefix}{repo}\\.git/info/lfs/objects"
        return [("GET", f"{api}/tree/(?P<revision>[^/]+)(?:/.*)?", self._tree),
                ("GET", f"/{prefix}{repo}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self._file),
                ("HEAD", f"/{prefix}{repo}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self._file),
                ("POST", "/api/repos/create", self._create),
                ("POST", "/api/validate-yaml", self._validate_yaml),
                ("POST", f"{api}/preupload/(?P<revision>[^/]+)", self._preupload),
                ("POST", f"{lfs}/batch", self._batch),
                ("PUT", "/lfs-store/(?P<oid>[0-9a-f]{64})", self._put_object),
                ("POST", f"{lfs}/verify", self._verify),
                ("POST", f"{api}/commit/(?P<revision>[^/]+)", self._commit)]

    def _dispatch(self):
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        self.body = b""
        if self.command in ("POST", "PUT"):
            if "Content-Length" not in self.headers:  # S3 refuses a streamed (chunked) PUT as well
                self.close_connection = True
                return self._error(411, "Content-Length required")
            self.body = self.rfile.read(int(self.headers["Content-Length"]))
        path = unquote(urlparse(self.path).path)
        for method, pattern, action in self._routes():
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return action(**match.groupdict())
        self._error(404, "Repository not found")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

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

    def _authorized(self) -> bool:
        hub = self.server.hub
        if hub.token is not None and self.headers.get("Authorization") == f"Bearer {hub.token}":
            return True
        self._error(401, "Invalid username or password.")
        return False

    # the download side

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

    # the upload side

    def _create(self):
        hub = self.server.hub
        if not self._authorized():
            return
        request = json.loads(self.body)
        if f"{request.get('organization')}/{request.get('name')}" != hub.repo or \
                request.get("type", "model") != hub.repo_type:
            return self._error(403, f"This stand-in hosts only the {hub.repo_type} repo {hub.repo}.")
        if "main" in hub.branches:
            return self._json(409, {"error": "You already created this repo", "url": hub.url})
        hub.store({".gitattributes": GITATTRIBUTES}, None, "initial commit")
        self._json(200, {"url": hub.url, "name": hub.repo})

    def _validate_yaml(self):
        content = json.loads(self.body)["content"]
        front = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(front[1]) if front else {}
        except yaml.YAMLError as exc:
            return self._json(400, {"errors": [{"message": f"Invalid YAML: {exc}"}]})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "The metadata must be a YAML mapping."}]})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, revision: str):
        hub = self.server.hub
        if not self._authorized():
            return
        commit = hub.commit_of(revision)
        if commit is None:
            return self._error(404, "Revision not found")
        answers = []
        for entry in json.loads(self.body)["files"]:
            lfs = hub.goes_to_lfs(commit, entry["path"], base64.b64decode(entry["sample"]), entry["size"])
            answers.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._json(200, {"files": answers, "commitOid": commit})

    def _batch(self):
        hub = self.server.hub
        if not self._authorized():
            return
        request = json.loads(self.body)
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]) or \
                request.get("hash_algo", "sha256") != "sha256":
            return self._error(422, "Only sha256 uploads over the basic transfer are served here.")
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in hub.lfs:  # an object the store has already needs no upload
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-store/{item['oid']}"},
                                    "verify": {"href": f"{hub.url}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _put_object(self, oid: str):
        if hashlib.sha256(self.body).hexdigest() != oid:
            return self._error(400, "The content does not match the sha256 it was uploaded as.")
        self.server.hub.lfs[oid] = self.body
        self._send(200, b"")

    def _verify(self):
        if not self._authorized():
            return
        request = json.loads(self.body)
        data = self.server.hub.lfs.get(request["oid"])
        if data is None or len(data) != request["size"]:
            return self._error(404, f"Object {request['oid']} of {request['size']} bytes was not uploaded.")
        self._json(200, {})

    def _commit(self, revision: str):
        hub = self.server.hub
        if not self._authorized():
            return
        parent = hub.branches.get(revision)
        if parent is None:
            return self._error(404, f"Branch {revision} not found")
        if self.headers.get("Content-Type") != "application/x-ndjson":
            return self._error(400, "A commit is sent as application/x-ndjson.")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return self._error(400, "A commit starts with a header line that has a summary.")
        files = dict(hub.commits[parent])
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "deletedFile":
                # the Hub refuses to delete what the branch does not hold (`HfApi.delete_file` documents it)
                if files.pop(value["path"], None) is None:
                    return self._error(404, f"{value['path']}: no such file on {revision}.")
                continue
            if key == "file" and value.get("encoding") == "base64":
                data = base64.b64decode(value["content"])
                if _needs_lfs(data[:512], len(data)):
                    return self._error(400, f"{value['path']}: binary or large files must be uploaded with LFS.")
            elif key == "lfsFile" and value.get("algo") == "sha256":
                data = hub.lfs.get(value["oid"])
                if data is None or value.get("size", len(data)) != len(data):
                    return self._error(400, f"{value['path']}: its LFS pointer names an object that was not "
                                            "uploaded.")
            else:
                return self._error(400, f"This stand-in does not take {key!r} lines.")
            files[value["path"]] = data
        oid = hub.store(files, parent, lines[0]["value"]["summary"])
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/commit/{oid}",
                         "hookOutput": ""})


def child_env(endpoint: str, hf_home) -> dict[str, str]:
    """The environment of a child whose Hub is `endpoint`: online, with its own HF_HOME (no cache, no stored token)
    and no inherited HF_TOKEN; the Xet transfer is off because the stand-in speaks LFS."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
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
