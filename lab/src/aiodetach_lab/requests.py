"""A record of every live detach request that reaches libvirt.

aiodetach sends a live detach through one path only,
``LibvirtBackend.detach_live`` (``virDomainDetachDeviceAlias``), whichever
service, fleet or batch made it.  :func:`record_requests` (with pytest's
``monkeypatch``) and :func:`recording_requests` (a context manager, for
scripts and benchmarks) wrap that method for every backend of the process
and log each request with libvirt's answer in a :class:`RequestLog`: the
one way the real-libvirtd tests and the benchmarks count requests.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import BackendError

__all__ = ["Request", "RequestLog", "record_requests", "recording_requests"]


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


def _recording(log: RequestLog) -> Any:
    original = LibvirtBackend.detach_live

    def detach_live(self: LibvirtBackend, uuid: str, alias: str) -> None:
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
def recording_requests() -> Iterator[RequestLog]:
    """Record every live detach request of this process inside the block."""
    log = RequestLog()
    original = LibvirtBackend.__dict__["detach_live"]
    LibvirtBackend.detach_live = _recording(log)  # type: ignore[method-assign]
    try:
        yield log
    finally:
        LibvirtBackend.detach_live = original  # type: ignore[method-assign]
