"""A record of every live detach request that reaches libvirt.

aiodetach sends a live detach through one path only,
``LibvirtBackend.detach_live`` (``virDomainDetachDeviceAlias``), whichever
service, fleet or batch made it.  :func:`record_requests` (with pytest's
``monkeypatch``) and :func:`recording_requests` (a context manager, for
scripts and benchmarks) wrap that method for every backend of the process
and log each request with libvirt's answer in a :class:`RequestLog`: the
one way the real-libvirtd tests and the benchmarks count requests.

A test that kills the process making the requests (SIGKILL mid-unplug) cannot
read that log afterwards: :func:`appending_requests` writes the same record to
a file instead, the ``send`` line *before* libvirt is called (``O_APPEND``
writes reach the kernel at once and survive the kill), so the file is an upper
bound of what reached QEMU, counted across processes (:func:`sends_in`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import BackendError

__all__ = [
    "Request",
    "RequestLog",
    "appending_requests",
    "record_requests",
    "recording_requests",
    "sends_in",
]


@dataclass(frozen=True)
class Request:
    """One live detach request and libvirt's answer."""

    alias: str
    at: float  # time.monotonic() when it was handed to libvirt
    error: str | None  # libvirt's message if it was refused (or the call failed)
    code: int | None = None  # libvirt's error code, for a BackendError
    origin: int | None = None  # libvirt's error domain, for a BackendError
    uuid: str = ""
    uri: str = ""
    ended: float = 0.0  # time.monotonic() when libvirt answered


@dataclass
class RequestLog:
    """Requests in the order libvirt answered them (thread-safe appends)."""

    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def matching(
        self, alias: str | None = None, *, uuid: str | None = None, uri: str | None = None
    ) -> list[Request]:
        """Requests for ``alias`` (and ``uuid``, ``uri``), all when not given."""
        return [
            r
            for r in list(self.requests)
            if alias in (None, r.alias) and uuid in (None, r.uuid) and uri in (None, r.uri)
        ]

    def accepted(self, alias: str | None = None, *, uri: str | None = None) -> list[Request]:
        return [r for r in self.matching(alias, uri=uri) if r.error is None]

    def refused(self, alias: str | None = None, *, uri: str | None = None) -> list[Request]:
        return [r for r in self.matching(alias, uri=uri) if r.error is not None]

    def of(self, uuid: str, alias: str) -> list[float]:
        """When each request for ``alias`` of domain ``uuid`` was sent."""
        return [r.at for r in self.matching(alias, uuid=uuid)]


class _Patcher(Protocol):
    def setattr(self, target: Any, name: str, value: Any) -> None: ...


def _recording(log: RequestLog, before: Callable[[str], None] | None = None) -> Any:
    original = LibvirtBackend.detach_live

    def detach_live(self: LibvirtBackend, uuid: str, alias: str) -> None:
        if before is not None:
            before(alias)
        at = time.monotonic()
        try:
            original(self, uuid, alias)
        except BackendError as err:
            log.add(
                Request(
                    alias, at, err.message, err.code, err.origin, uuid, self.uri, time.monotonic()
                )
            )
            raise
        except Exception as exc:
            log.add(Request(alias, at, str(exc), None, None, uuid, self.uri, time.monotonic()))
            raise
        log.add(Request(alias, at, None, None, None, uuid, self.uri, time.monotonic()))

    return detach_live


def record_requests(monkeypatch: _Patcher) -> RequestLog:
    """Record every live detach request of this process until the test ends."""
    log = RequestLog()
    monkeypatch.setattr(LibvirtBackend, "detach_live", _recording(log))
    return log


@contextlib.contextmanager
def _patched(log: RequestLog, before: Callable[[str], None] | None = None) -> Iterator[RequestLog]:
    original = LibvirtBackend.__dict__["detach_live"]
    LibvirtBackend.detach_live = _recording(log, before)  # type: ignore[method-assign]
    try:
        yield log
    finally:
        LibvirtBackend.detach_live = original  # type: ignore[method-assign]


@contextlib.contextmanager
def recording_requests() -> Iterator[RequestLog]:
    """Record every live detach request of this process inside the block."""
    with _patched(RequestLog()) as log:
        yield log


class _AppendLog(RequestLog):
    """A :class:`RequestLog` that also appends each answer to a file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def line(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def add(self, request: Request) -> None:
        super().add(request)
        if request.error is None:
            self.line(f"accepted {os.getpid()} {request.alias} {time.time():.6f}\n")
        else:
            self.line(f"refused {os.getpid()} {request.alias} {request.error!r}\n")


@contextlib.contextmanager
def appending_requests(path: Path | str) -> Iterator[RequestLog]:
    """:func:`recording_requests`, and every request appended to ``path``:
    ``send PID ALIAS TIME`` before libvirt is called, then ``accepted PID ALIAS
    TIME`` or ``refused PID ALIAS MESSAGE`` with its answer."""
    log = _AppendLog(Path(path))

    def before(alias: str) -> None:
        log.line(f"send {os.getpid()} {alias} {time.time():.6f}\n")

    with _patched(log, before):
        yield log


def sends_in(path: Path) -> list[list[str]]:
    """The ``send`` lines of a file written by :func:`appending_requests`, split
    into ``["send", PID, ALIAS, TIME]``: every request some process was about to
    hand to libvirt."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.startswith("send ")]
