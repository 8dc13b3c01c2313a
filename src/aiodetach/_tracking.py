"""What the CLI knows of each device, followed from the hook records alone.

One hook, `Tracker`, keeps per ``detach()`` call (a device) what the
records said: the persistent definition changed, the live unplug it waits on
(attempt n of N, requests sent, when the attempt's window ends), how it
finished.  The live progress display reads it to move while nothing happens
(elapsed, time left in the attempt), and an interrupted command reads it to
say per device what was done.  Only public records are used (never the
service's members), so what the CLI shows is what any hook could know.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from .errors import DetachError, ServiceClosed
from .instrumentation import DetachRecord, Record, UnplugRecord

__all__ = ["Call", "DeviceState", "Tracker", "UnplugView"]

DeviceState = Literal[
    "removed",  # the call finished with a result
    "failed",  # the call finished with a DetachError
    "request_outstanding",  # a live request reached libvirt: the guest may still act on it
    "persistent_changed",  # the persistent definition was changed, no live request yet
    "unchanged",  # started, nothing changed yet
    "not_started",  # never began (a batch interrupted before its turn)
]


@dataclass
class UnplugView:
    """A live unplug as its records told it."""

    attempt: int = 1
    attempts: int = 1
    sent: int = 0
    deadline: float | None = None
    """The window's end (``time.monotonic()``), while one runs."""
    step: str = "starting"
    removed: bool = False


@dataclass
class Call:
    """One ``detach()`` call: one device."""

    detach_id: int
    named_domain: str
    named_alias: str | None
    domain: str
    alias: str | None
    started: float
    persistent_changed: bool = False
    unplug_id: int | None = None
    finished: bool = False
    ok: bool = False
    error: DetachError | None = None
    live: bool = False
    persistent: bool = False
    attempts: int = 0
    elapsed: float = 0.0


class Tracker:
    """A hook: every call and unplug seen, by id, in the order they started."""

    def __init__(self) -> None:
        self.calls: dict[int, Call] = {}
        self.unplugs: dict[int, UnplugView] = {}
        self.started = time.monotonic()
        self.notices: Any = None
        """Where `notice` writes (a live display while one is drawn, so
        a line does not cut through it); None: stderr."""

    def __call__(self, record: Record) -> None:
        if isinstance(record, DetachRecord):
            self._detach(record)
        elif isinstance(record, UnplugRecord):
            self._unplug(record)

    def _detach(self, r: DetachRecord) -> None:
        call = self.calls.get(r.detach_id)
        if call is None:
            call = self.calls[r.detach_id] = Call(
                detach_id=r.detach_id,
                named_domain=r.domain,
                named_alias=r.alias,
                domain=r.domain,
                alias=r.alias,
                started=r.time - r.elapsed,
            )
        call.domain, call.alias = r.domain, r.alias or call.alias
        kind = r.kind
        if kind in ("persistent_detached", "persistent_joined"):
            call.persistent_changed = True
        elif kind in ("unplug_started", "unplug_joined"):
            call.unplug_id = r.unplug_id
        elif kind == "finished":
            call.elapsed = r.elapsed
            if r.result is not None:
                call.finished = call.ok = True
                call.live, call.persistent = r.result.live, r.result.persistent
                call.attempts = r.result.attempts
                call.persistent_changed = call.persistent_changed or r.result.persistent
            elif isinstance(r.error, DetachError) and not isinstance(r.error, ServiceClosed):
                # Cancelled (not a DetachError) or cut short by the close: it
                # did not finish, and what it did is what state() says.
                call.finished = True
                call.error = r.error

    def _unplug(self, r: UnplugRecord) -> None:
        view = self.unplugs.get(r.unplug_id)
        if view is None:
            view = self.unplugs[r.unplug_id] = UnplugView()
        view.attempt, view.attempts, view.sent = r.attempt, r.attempts, r.sent
        view.deadline = r.deadline
        view.step = r.kind
        if r.kind == "removed":
            view.removed = True

    def notice(self, text: str) -> None:
        """A line for the operator (an interrupt being handled) on stderr."""
        out = self.notices if self.notices is not None else sys.stderr
        out.write(text + "\n")
        out.flush()

    # ------------------------------------------------------------- queries
    def unplug_of(self, call: Call) -> UnplugView | None:
        return self.unplugs.get(call.unplug_id) if call.unplug_id is not None else None

    def state(self, call: Call) -> DeviceState:
        if call.finished:
            return "removed" if call.ok else "failed"
        view = self.unplug_of(call)
        if view is not None and view.removed:
            return "removed"
        if view is not None and view.sent > 0:
            return "request_outstanding"
        if call.persistent_changed:
            return "persistent_changed"
        return "unchanged"

    def in_flight(self) -> list[Call]:
        return [c for c in self.calls.values() if not c.finished]

    def counts(self) -> tuple[int, int, int]:
        """(done, failed, in flight) over the calls seen."""
        done = sum(c.finished and c.ok for c in self.calls.values())
        failed = sum(c.finished and not c.ok for c in self.calls.values())
        return done, failed, len(self.calls) - done - failed
