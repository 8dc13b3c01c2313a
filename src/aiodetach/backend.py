"""The narrow, public interface between the detach protocol and a hypervisor.

The service only ever needs six blocking calls and five kinds of
notification.  Keeping them behind this interface is what lets the same
protocol code run against a real libvirtd (`aiodetach._libvirt`) and
against [`aiodetach.testing.FakeHypervisor`][aiodetach.testing.FakeHypervisor], which produces the
interleavings a real QEMU cannot be made to produce on demand.

Blocking calls are made from worker threads; notifications may be delivered
from any thread.  The service does the hopping onto its event loop.

It is public because ``DetachService(backend=...)`` is: a wrapper around the
libvirt backend (to record or inject faults) or a backend of your own
implements `Backend` and reports through the `EventSink` it is
given.  Errors are [`BackendError`][aiodetach.backend.BackendError] with libvirt's numeric code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Backend",
    "BackendError",
    "DomainInfo",
    "DomainState",
    "ErrorCode",
    "EventSink",
]


class ErrorCode(enum.IntEnum):
    """The libvirt error codes (``VIR_ERR_*``) the protocol reacts to."""

    INTERNAL_ERROR = 1
    INVALID_CONN = 6
    NO_SUPPORT = 3
    OPERATION_DENIED = 29
    OPERATION_FAILED = 9
    XML_ERROR = 27
    XML_DETAIL = 35
    SYSTEM_ERROR = 38
    NO_DOMAIN = 42
    OPERATION_INVALID = 55
    CONFIG_UNSUPPORTED = 67
    OPERATION_TIMEOUT = 68
    NO_CONNECT = 5
    DEVICE_MISSING = 99
    AUTH_FAILED = 45
    ACCESS_DENIED = 88
    """An access control driver (polkit) refused the call's permission."""


class ErrorDomain(enum.IntEnum):
    """The libvirt error domains (``VIR_FROM_*``) the protocol reacts to."""

    RPC = 7
    QEMU = 10


class BackendError(Exception):
    """A hypervisor call failed; libvirt's code, error domain and message."""

    def __init__(self, code: int, message: str, *, origin: int = 0, final: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.origin = origin
        self.message = message
        self.final = final
        """Trying again cannot help: a reconnect gives up at once instead of
        retrying until ``reconnect_timeout`` (a connection the caller gave
        that died cannot be re-opened by anyone but the caller)."""


class DomainState(enum.Enum):
    """The part of libvirt's domain state that decides live vs persistent."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"

    @property
    def is_active(self) -> bool:
        """A live definition exists (libvirt's ``isActive``)."""
        return self in (DomainState.RUNNING, DomainState.PAUSED, DomainState.OTHER)


@dataclass(frozen=True, slots=True)
class DomainInfo:
    uuid: str
    name: str
    state: DomainState
    persistent: bool
    run_id: str | None = None
    """Identifies this run of the domain (libvirt's domain id, new at every
    start), so a journal can tell a domain re-started since a request from
    the same one still running.  None when unknown or not running."""
    stop_reason: str | None = None
    """Why a shut-off domain is shut off, named as the STOPPED event's detail
    (``"migrated"``, ``"destroyed"``, ``"shutdown"``, …): libvirt's shutoff
    reason.  A live call refused as "domain is not running" may be answered
    before that event arrives; this tells a migration from a shutdown all
    the same.  None when running or unknown."""


class EventSink(Protocol):
    """What a backend tells the service.  May be called from any thread."""

    def device_removed(self, uuid: str, name: str, alias: str) -> None: ...

    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None: ...

    def domain_stopped(self, uuid: str, name: str, reason: str) -> None: ...

    def domain_resumed(self, uuid: str, name: str) -> None:
        """The domain's vCPUs run again (resumed, woken up, started).  Optional
        for a backend: without it a paused domain is noticed running again by
        looking every ``timeout`` seconds."""

    def domain_rebooted(self, uuid: str, name: str) -> None:
        """The guest was reset (libvirt's REBOOT event: ``virDomainReset``, or
        the guest rebooted itself).  Optional for a backend: a reset voids a
        pending native-PCIe unplug, and without this notification the void
        request is only noticed when its ``timeout`` runs out (then re-sent
        using an attempt)."""

    def connection_closed(self, reason: str) -> None: ...


class Backend(Protocol):
    """Blocking hypervisor calls; each may raise `BackendError`."""

    @property
    def uses_libvirt_events(self) -> bool:
        """True if its connections need libvirt's event loop running on asyncio
        (the service then installs `aiodetach.install_event_loop()` on its
        loop before opening); False for a backend that delivers its
        notifications by itself, like the fake."""

    @property
    def uri(self) -> str: ...

    def open(self, sink: EventSink, *, read_only: bool) -> None:
        """Connect and subscribe to device-removed, removal-failed, lifecycle,
        reboot and close notifications for every domain."""

    def close(self) -> None:
        """Unsubscribe and disconnect; never raises."""

    def lookup(self, ref: str) -> DomainInfo:
        """Find a domain by UUID string or name."""

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        """The live (``inactive=False``) or persistent definition."""

    def detach_live(self, uuid: str, alias: str) -> None:
        """Ask for the live unplug of ``alias``; returns once it was *sent*."""

    def detach_config(self, uuid: str, device_xml: str) -> None:
        """Remove a device from the persistent definition (synchronous)."""
