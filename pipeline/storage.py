"""Files the app keeps for a while — generated clips and Gradio's uploads — and the janitor that bounds them.

Both folders are pruned by age and by total size, oldest first: a visitor's photo or clip never outlives the
age setting, and a burst of uploads (any client can post 20 MB files to /gradio_api/upload) can never fill the disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    folder: Path
    max_age_s: float
    max_bytes: int


def prune_folder(folder: Path, max_age_s: float, max_bytes: int, now: float | None = None) -> int:
    """Delete files (at any depth) older than `max_age_s`, then the oldest until the folder holds at most
    `max_bytes`; folders left empty go too. Returns how many files were deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now = time.time() if now is None else now
    files = []
    for path in folder.rglob("*"):
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted meanwhile (by Gradio's own cleaner or another request)
        if path.is_file():
            files.append((stat.st_mtime, stat.st_size, path))
    removed = 0
    files.sort()
    total = sum(size for _, size, _ in files)
    for mtime, size, path in files:
        if now - mtime > max_age_s or total > max_bytes:
            try:
                os.remove(path)
                removed += 1
                total -= size
            except OSError:
                pass
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()  # only succeeds when empty
        except OSError:
            pass
    return removed


class Janitor:
    """Prunes each bounded folder every `every_s` seconds on a daemon thread (and on demand)."""

    def __init__(self, bounds: list[Bound], every_s: float = 60.0):
        self.bounds = bounds
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        removed = 0
        for bound in self.bounds:
            try:
                removed += prune_folder(bound.folder, bound.max_age_s, bound.max_bytes)
            except OSError as exc:  # a janitor that fails must not take the app with it
                log.warning("could not prune %s: %s", bound.folder.name, exc)
        return removed

    def start(self) -> "Janitor":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="janitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.run_once()
