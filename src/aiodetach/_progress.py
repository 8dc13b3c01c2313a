"""The CLI's progress output, drawn from hook records (never from log names).

Two hooks:

- :class:`ProgressLines`: one line per step ("[vm-1/ua-disk1] attempt 2 of
  8: no DEVICE_REMOVED within 20 s; re-reading the live XML"), for ``detach``
  and for ``detach-many`` when stderr is not a terminal (a log file, a pipe).
- :class:`ProgressBar`: ``detach-many`` on a terminal: one line redrawn in
  place with ``\\r`` (done/total, ok, failed, unplugs pending, requests sent),
  and the steps worth an operator's eye (a timed-out attempt, a lost event, a
  failure) printed above it.  No dependency: a terminal is all it needs.

Both only format: the texts come from :func:`describe`, in one place.
"""

from __future__ import annotations

import time
from typing import TextIO

from .instrumentation import ConnectionRecord, DetachRecord, Record, UnplugRecord

__all__ = ["ProgressBar", "ProgressLines", "describe"]


def _where(domain: str, alias: str | None) -> str:
    return f"[{domain}/{alias or '-'}]"


def describe(record: Record) -> str | None:
    """The progress line of a record, or None for steps not worth a line."""
    if isinstance(record, UnplugRecord):
        text = _unplug_text(record)
        return f"{_where(record.domain, record.alias)} {text}" if text else None
    if isinstance(record, DetachRecord):
        text = _detach_text(record)
        return f"{_where(record.domain, record.alias)} {text}" if text else None
    return _connection_text(record)


def _unplug_text(r: UnplugRecord) -> str | None:
    kind = r.kind
    if kind == "request_sent":
        return f"attempt {r.attempt} of {r.attempts}: live detach request sent"
    if kind == "in_progress":
        return "an unplug is already in progress: waiting for it"
    if kind == "busy_backoff":
        return f"the guest is busy (slot still settling): sending again in {r.delay or 0:.3g} s"
    if kind == "stale_event_ignored":
        return "ignored an event from before our request: the device is still attached"
    if kind == "attempt_timed_out":
        return (
            f"attempt {r.attempt} of {r.attempts}: no DEVICE_REMOVED within "
            f"{r.timeout or 0:g} s; re-reading the live XML"
        )
    if kind == "paused":
        return "the domain is paused: waiting for it to run again"
    if kind == "resumed":
        return "the domain runs again: waiting a full timeout"
    if kind == "request_voided":
        return "the guest was reset: the request is void, sending it again (no attempt used)"
    if kind == "waiting_for_reconnect":
        return "waiting for libvirtd to come back"
    if kind == "removed" and r.confirmed_by == "xml":
        return "the live XML shows the device gone (its event was lost)"
    if kind == "removal_failed":
        return "DEVICE_REMOVAL_FAILED: the guest rejected the unplug"
    if kind == "domain_stopped":
        return f"the domain stopped ({r.reason})"
    if kind == "timed_out":
        return f"gave up: the device is still attached after {r.sent} request(s)"
    return None


def _detach_text(r: DetachRecord) -> str | None:
    kind = r.kind
    if kind == "persistent_detached":
        return "removed from the persistent definition"
    if kind == "persistent_joined":
        return "removed from the persistent definition (by a concurrent detach)"
    if kind == "persistent_missing_ignored":
        return "not in the persistent definition (live only): ignored"
    if kind == "unplug_joined":
        return "joined a detach of this device already in flight"
    if kind == "finished" and r.result is not None:
        result = r.result
        return f"detached in {result.elapsed:.3f} s after {result.attempts} request(s)"
    return None


def _connection_text(r: ConnectionRecord) -> str | None:
    if r.kind == "lost":
        return f"[{r.uri}] lost the connection to libvirtd ({r.reason})"
    if r.kind == "reconnecting":
        return f"[{r.uri}] connecting to libvirtd again"
    if r.kind == "reconnected":
        return f"[{r.uri}] reconnected to libvirtd"
    if r.kind == "dead":
        return f"[{r.uri}] gave up on libvirtd: {r.reason}"
    return None


class ProgressLines:
    """A hook printing one line per step worth one."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, record: Record) -> None:
        line = describe(record)
        if line is not None:
            self._stream.write(line + "\n")
            self._stream.flush()


_NOTABLE = frozenset(
    {
        "busy_backoff",
        "attempt_timed_out",
        "paused",
        "removal_failed",
        "domain_stopped",
        "timed_out",
        "waiting_for_reconnect",
    }
)
"""Unplug steps printed above the bar (the routine ones only move it)."""


class ProgressBar:
    """A hook drawing ``detach-many``'s progress bar on a terminal.

    ``[#########-----------] 37/100  ok 35  failed 2  pending 12  requests 40  3.2 s``

    Redrawn at most every ``interval`` seconds (a thousand detaches finishing
    together must not flood the terminal), and always when the last one ends.
    """

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO, *, interval: float = 0.1) -> None:
        self.total = total
        self.done = self.ok = self.failed = 0
        self.pending = self.requests = 0
        self._stream = stream
        self._interval = interval
        self._started = time.monotonic()
        self._drawn = 0.0
        self._closed = False
        self._pending_text = ""

    def __call__(self, record: Record) -> None:
        above: str | None = None
        last = False
        if isinstance(record, DetachRecord):
            if record.kind == "finished":
                self.done += 1
                last = self.done == self.total
                if record.error is None:
                    self.ok += 1
                else:
                    self.failed += 1
        elif isinstance(record, UnplugRecord):
            kind = record.kind
            if kind == "started":
                self.pending += 1
            elif kind == "ended":
                self.pending -= 1
            elif kind == "request_sent":
                self.requests += 1
            if kind in _NOTABLE or (kind == "removed" and record.confirmed_by == "xml"):
                above = describe(record)
        else:
            above = describe(record)
        self._draw(above, force=last)

    def line(self) -> str:
        filled = self.WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        took = time.monotonic() - self._started
        return (
            f"[{bar}] {self.done}/{self.total}  ok {self.ok}  failed {self.failed}  "
            f"pending {self.pending}  requests {self.requests}  {took:.1f} s"
        )

    def _draw(self, above: str | None, *, force: bool = False) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if above is None and not force and now - self._drawn < self._interval:
            return
        self._drawn = now
        out = "\r\x1b[K"  # back to the start of the line, and clear it
        if above is not None:
            out += above + "\n"
        self._stream.write(out + self.line())
        self._stream.flush()

    def write(self, text: str) -> int:
        """A stream for other stderr output (the CLI's log lines) while the bar
        is drawn: each complete line goes above the bar, never glued to it."""
        if self._closed:
            self._stream.write(text)
            return len(text)
        self._pending_text += text
        if "\n" in self._pending_text:
            lines, _, self._pending_text = self._pending_text.rpartition("\n")
            self._stream.write("\r\x1b[K" + lines + "\n" + self.line())
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        """The final state, and the cursor on a fresh line."""
        if not self._closed:
            self._draw(None, force=True)
            self._stream.write("\n")
            self._stream.flush()
            self._closed = True
