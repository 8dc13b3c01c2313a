"""The CLI's progress output, drawn from hook records (never from log names).

Two hooks:

- `ProgressLines`: one line per step ("[vm-1/ua-disk1] attempt 2 of
  8: no DEVICE_REMOVED within 20 s; re-reading the live XML"), when stderr
  is not a terminal (a log file, a pipe) or rich is not installed.
- `aiodetach._progress_live.LiveProgress`: on a terminal, a display
  that moves while a guest is waited for (see that module), with the steps
  worth an operator's eye printed above it.

Both only format: the texts come from `describe()`, in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TextIO

from .instrumentation import ConnectionRecord, DetachRecord, Record, UnplugRecord

if TYPE_CHECKING:
    from ._tracking import Tracker

__all__ = ["Display", "ProgressLines", "describe", "notable", "open_display"]


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
    if kind == "job_held":
        return "another job (a migration?) holds the domain: sending again, no attempt used"
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
"""Unplug steps of a batch printed above the live display (the routine ones
only move it)."""


def notable(record: Record) -> bool:
    """A step of a batch worth its own line above the live display."""
    if isinstance(record, UnplugRecord):
        return record.kind in _NOTABLE or (
            record.kind == "removed" and record.confirmed_by == "xml"
        )
    return isinstance(record, ConnectionRecord)


class Display(Protocol):
    """What the CLI needs of a progress display: a hook, a stream for its log
    lines (so they do not cut through the display), and a lifetime."""

    def __call__(self, record: Record) -> None: ...
    def write(self, text: str) -> int: ...
    def flush(self) -> None: ...
    async def __aenter__(self) -> Display: ...
    async def __aexit__(self, *exc_info: object) -> None: ...


class _Plain(ProgressLines):
    """Plain lines, as a `Display` (stderr is not a terminal, or rich
    is not installed)."""

    def write(self, text: str) -> int:
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    async def __aenter__(self) -> _Plain:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def open_display(
    tracker: Tracker, stream: TextIO, *, total: int, batch: bool, force: bool = False
) -> Display:
    """The live display on a terminal (``force``: even if ``stream`` is not
    one), else plain lines; plain lines too when rich is missing (it is the
    ``aiodetach[cli]`` extra: the command works without it)."""
    if force or stream.isatty():
        try:
            from ._progress_live import LiveProgress
        except ImportError:
            return _Plain(stream)
        return LiveProgress(tracker, stream, total=total, batch=batch, force=force)
    return _Plain(stream)
