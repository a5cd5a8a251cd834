"""Who makes music next: a fair gate in front of the music engine.

Gradio's queue is one global line: 32 API calls from one visitor would hold every place for a quarter of an hour.
The gate keeps its own line of music requests instead:

* at most `capacity` requests run at once (the engine's listeners);
* each client (one address) holds at most `per_client` places, running or waiting — one more is refused at once
  with a message saying so, instead of silently taking everyone's turn;
* among those waiting, clients take turns: the client served longest ago (or never) goes first, then the request
  that came first — so a visitor with one request is never stuck behind another visitor's second.

A ticket is held in a `with` block; leaving the block (done, failed, cancelled, or the generator that holds it
closed because the client went away) frees its place. A holder also `touch()`es its ticket as it works (every
audio chunk, every poll while waiting): a ticket left untouched for `lease_s` — its holder suspended by a server
that stopped reading from it and never closed it — is reclaimed, so a vanished visitor cannot keep a place.

A ticket may say how many seconds of music it asks for, and its holder how many it has made (`touch(made=)`): the
gate then tells a waiting request how many are ahead of it (being made and waiting) and about how long its wait
is (`line`), from the speed the running requests are being made at.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from .errors import InputError


class ClientBusy(InputError):
    """This client already holds all the places it may."""


@dataclass(eq=False)
class Ticket:
    gate: "FairGate"
    client: str
    order: int
    running: bool = False
    expired: bool = False  # reclaimed after `lease_s` without a touch: the holder must stop
    touched: float = field(default_factory=time.monotonic)
    seconds: float | None = None  # music asked for; None: endless or not said
    made: float = 0.0  # music made so far (`touch(made=)`)
    started: float | None = None  # when it was admitted
    _admitted: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until admitted (True) or `timeout` passes (False); waiting counts as a touch."""
        self.touch()
        return self._admitted.wait(timeout)

    def touch(self, made: float | None = None) -> None:
        self.touched = time.monotonic()
        if made is not None:
            self.made = float(made)

    @property
    def position(self) -> int:
        """0 while running, else 1 for the next in line, 2 after it, ..."""
        return self.gate.position(self)

    def line(self) -> "LinePlace":
        """Where this ticket stands: what is ahead of it and about how long it will wait."""
        return self.gate.line(self)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.gate.leave(self)


def _about(seconds: float) -> str:
    if seconds < 57.5:
        return f"about {max(5, 5 * round(seconds / 5)):.0f} s"
    return f"about {max(1, round(seconds / 60)):.0f} min"


@dataclass(frozen=True)
class LinePlace:
    position: int  # 0 while running, else 1 for the next in line, ...
    running: int  # requests being made now
    waiting_ahead: int  # requests waiting that go first
    wait_s: float | None  # expected wait; None when it cannot be told (an endless request ahead, or none measured)

    @property
    def ahead(self) -> int:
        return self.running + self.waiting_ahead if self.position else 0

    def text(self) -> str:
        """A line for the visitor, e.g. "In line for the music engine: 2 requests ahead of yours (1 being made, 1
        waiting); expected wait about 40 s." """
        n = self.ahead
        line = (f"In line for the music engine: {n} request{'s' if n != 1 else ''} ahead of yours "
                f"({self.running} being made, {self.waiting_ahead} waiting)")
        if self.wait_s is not None:
            return f"{line}; expected wait {_about(self.wait_s)}."
        return f"{line}; the expected wait shows once the music ahead is under way (not for Endless music)."


class FairGate:
    def __init__(self, capacity: int, per_client: int, lease_s: float = 20.0):
        if capacity < 1 or per_client < 1:
            raise ValueError("capacity and per_client must be at least 1")
        self.capacity, self.per_client, self.lease_s = capacity, per_client, lease_s
        self._lock = threading.Lock()
        self._waiting: list[Ticket] = []
        self._running: list[Ticket] = []
        self._orders = itertools.count()
        self._served: dict[str, int] = {}  # client → when it was last admitted (only clients holding tickets)

    def enter(self, client: str, seconds: float | None = None) -> Ticket:
        """A place in line for `client` (asking for `seconds` of music; None: endless or not said), admitted at once
        if there is room; ClientBusy if the client holds all its places already."""
        with self._lock:
            self._reap()
            held = sum(t.client == client for t in self._waiting + self._running)
            if held >= self.per_client:
                raise ClientBusy(f"You already have {held} music request{'s' if held != 1 else ''} running or "
                                 f"waiting (at most {self.per_client} at a time, so everyone gets a turn). Wait for "
                                 "one to finish or stop it, then try again.")
            ticket = Ticket(self, client, next(self._orders), seconds=None if seconds is None else float(seconds))
            self._waiting.append(ticket)
            self._admit()
            return ticket

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._running:
                self._running.remove(ticket)
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            if not any(t.client == ticket.client for t in self._waiting + self._running):
                self._served.pop(ticket.client, None)  # a client that comes back later is simply new
            self._admit()

    def position(self, ticket: Ticket) -> int:
        with self._lock:
            self._reap()
            if ticket.running:
                return 0
            return self._ordered().index(ticket) + 1 if ticket in self._waiting else 0

    def line(self, ticket: Ticket) -> LinePlace:
        with self._lock:
            self._reap()
            if ticket not in self._waiting:
                return LinePlace(0, len(self._running), 0, 0.0)
            ordered = self._ordered()
            ahead = ordered[:ordered.index(ticket)]
            return LinePlace(len(ahead) + 1, len(self._running), len(ahead), self._wait(ahead))

    def _wait(self, ahead: list[Ticket]) -> float | None:
        """Seconds until a place frees for the request after `ahead`: the running requests finish at the speed they
        are being made at (their mean), then those ahead take the first free places in turn."""
        now = time.monotonic()
        speeds = [t.made / (now - t.started) for t in self._running
                  if t.started is not None and t.made > 0 and now > t.started]
        if not speeds or any(t.seconds is None for t in self._running + ahead):
            return None
        speed = sum(speeds) / len(speeds)  # seconds of music a second, per request
        free = [max(t.seconds - t.made, 0.0) / speed for t in self._running]
        free += [0.0] * (self.capacity - len(free))
        for t in ahead:
            free.sort()
            free[0] += t.seconds / speed
        return min(free)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            self._reap()
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def _reap(self) -> None:
        """Reclaim the places of tickets whose holders stopped touching them (see the module docstring)."""
        now = time.monotonic()
        stale = [t for t in self._waiting + self._running if now - t.touched > self.lease_s]
        for ticket in stale:
            ticket.expired = True
            (self._running if ticket in self._running else self._waiting).remove(ticket)
            if not any(t.client == ticket.client for t in self._waiting + self._running):
                self._served.pop(ticket.client, None)
        if stale:
            self._admit()

    def _ordered(self) -> list[Ticket]:
        return sorted(self._waiting, key=lambda t: (self._served.get(t.client, -1), t.order))

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.capacity:
            ticket = self._ordered()[0]
            self._waiting.remove(ticket)
            ticket.running = True
            ticket.started = time.monotonic()
            self._running.append(ticket)
            self._served[ticket.client] = next(self._orders)
            ticket._admitted.set()
