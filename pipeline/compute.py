"""One thread for all model work.

PyTorch and the project's kernel parallelise with OpenMP, which keeps a team of spinning worker threads for each
thread that starts parallel work. A web server calls from many threads; as soon as two of them have run model code,
two teams share two cores and every parallel region pays a wake-up: the decode kernel measured 2.7x slower. So
requests hand their model work to this single thread (and wait for it), which keeps one team, always warm.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run `fn` on the compute thread and return its result (inline when already on it)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future.result()

    def iterate(self, iterator: Iterator[T]) -> Iterator[T]:
        """Advance `iterator` on the compute thread, one item per job, so other requests can interleave."""
        done = object()
        try:
            while True:
                item = self.run(next, iterator, done)
                if item is done:
                    return
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                self.run(close)


_shared: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    global _shared
    with _lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
