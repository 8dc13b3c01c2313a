"""The real hypervisor: libvirt-python behind the :class:`Backend` interface.

This is the one place where libvirt exceptions exist; everything leaving this
module is a :class:`BackendError` carrying libvirt's code, error domain and
message, which the service maps to typed errors in one function.
"""

from __future__ import annotations

import contextlib
import threading
import uuid as _uuid
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import libvirt

from .backend import BackendError, DomainInfo, DomainState, ErrorCode, ErrorDomain, EventSink

__all__ = ["LibvirtBackend"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

_STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from-snapshot",
}
_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


def _one_at_a_time(
    method: Callable[Concatenate[LibvirtBackend, _P], _T],
) -> Callable[Concatenate[LibvirtBackend, _P], _T]:
    """Let at most one call of this backend be inside libvirt at a time.

    Measured on libvirt 9.0's client over ``qemu+tcp`` (tests/real/private/
    test_fleet_partition.py, docs/libvirt-behaviour.md): when the network
    to the daemon is cut while two or more calls are in flight on one
    connection, keepalive fails one of them and the others stay blocked
    (the close callback never fires); when the link comes back the process
    dies of SIGSEGV inside ``virNetClientSendWithReply``.  With one call in
    flight keepalive fails it cleanly and reports the close.  Closing a
    connection while another thread is inside a call on it is unsafe as
    well, so ``close`` takes the same lock.
    """

    def serialised(backend: LibvirtBackend, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with backend._calls:
            return method(backend, *args, **kwargs)

    serialised.__name__ = method.__name__
    serialised.__doc__ = method.__doc__
    return serialised


def _wrap(fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except libvirt.libvirtError as exc:
        raise BackendError(
            exc.get_error_code() or ErrorCode.INTERNAL_ERROR,
            exc.get_error_message() or str(exc),
            origin=exc.get_error_domain() or 0,
        ) from None


class LibvirtBackend:
    """One libvirt connection with the device and lifecycle callbacks on it."""

    uses_libvirt_events = True
    """The service runs libvirt's event loop on asyncio for backends saying so."""

    def __init__(self, uri: str, *, keepalive: tuple[int, int] = (5, 3)) -> None:
        self._uri = uri
        self._keepalive = keepalive
        self._lock = threading.Lock()
        self._calls = threading.RLock()  # see _one_at_a_time
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._domains: dict[str, libvirt.virDomain] = {}

    @property
    def uri(self) -> str:
        return self._uri

    # -- connection ----------------------------------------------------------
    @_one_at_a_time
    def open(self, sink: EventSink, *, read_only: bool) -> None:
        opener = libvirt.openReadOnly if read_only else libvirt.open
        conn = _wrap(lambda: opener(self._uri))

        def removed(_c: Any, dom: libvirt.virDomain, alias: str, _o: Any) -> None:
            sink.device_removed(dom.UUIDString(), dom.name(), alias)

        def removal_failed(_c: Any, dom: libvirt.virDomain, alias: str, _o: Any) -> None:
            sink.device_removal_failed(dom.UUIDString(), dom.name(), alias)

        def lifecycle(_c: Any, dom: libvirt.virDomain, event: int, detail: int, _o: Any) -> None:
            if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                sink.domain_stopped(
                    dom.UUIDString(), dom.name(), _STOP_REASONS.get(detail, "stopped")
                )
            elif event in (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_STARTED):
                sink.domain_resumed(dom.UUIDString(), dom.name())
            elif event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
                # A running domain that is undefined becomes transient and keeps
                # running: only an inactive one is really gone.
                pass

        def closed(_c: Any, reason: int, _o: Any) -> None:
            sink.connection_closed(_CLOSE_REASONS.get(reason, str(reason)))

        try:
            ids = [
                _wrap(
                    lambda: conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, removed, None
                    )
                ),
                _wrap(
                    lambda: conn.domainEventRegisterAny(
                        None,
                        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                        removal_failed,
                        None,
                    )
                ),
                _wrap(
                    lambda: conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
                    )
                ),
            ]
            _wrap(lambda: conn.registerCloseCallback(closed, None))
            # Notice a hung daemon or a partitioned network, not only a closed
            # socket: after `count` unanswered keepalives, `interval` s apart.
            interval, count = self._keepalive
            try:
                _wrap(lambda: conn.setKeepAlive(interval, count))
            except BackendError as err:
                # An in-process driver (test:///default) has no keepalive: nothing to lose.
                if err.code != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
        except BackendError:
            self._close_conn(conn, [])
            raise
        with self._lock:
            self._conn, self._callback_ids, self._domains = conn, ids, {}

    @_one_at_a_time
    def close(self) -> None:
        with self._lock:
            conn, ids = self._conn, self._callback_ids
            self._conn, self._callback_ids, self._domains = None, [], {}
        if conn is not None:
            self._close_conn(conn, ids)

    @staticmethod
    def _close_conn(conn: libvirt.virConnect, ids: list[int]) -> None:
        for cid in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cid)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _connection(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None:
            raise BackendError(
                ErrorCode.INTERNAL_ERROR, "not connected to libvirt", origin=ErrorDomain.RPC
            )
        return conn

    # -- domains -------------------------------------------------------------
    def _domain(self, uuid: str) -> libvirt.virDomain:
        dom = self._domains.get(uuid)
        if dom is None:
            conn = self._connection()
            dom = _wrap(lambda: conn.lookupByUUIDString(uuid))
            self._domains[uuid] = dom
        return dom

    @_one_at_a_time
    def lookup(self, ref: str) -> DomainInfo:
        conn = self._connection()
        try:
            is_uuid = str(_uuid.UUID(ref)) == ref.lower()
        except ValueError:
            is_uuid = False
        dom = _wrap(lambda: conn.lookupByUUIDString(ref) if is_uuid else conn.lookupByName(ref))
        # libvirt-python annotates state() as str; it returns [state, reason].
        state = cast(list[int], _wrap(dom.state))[0]
        # isActive, not the state, says whether a live definition exists: while
        # a restarted libvirtd reconnects to its QEMU processes a running
        # domain may briefly report another state.
        active = bool(_wrap(dom.isActive))
        persistent = bool(_wrap(dom.isPersistent))
        uuid = dom.UUIDString()
        self._domains[uuid] = dom
        run_id = str(_wrap(dom.ID)) if active else None
        return DomainInfo(
            uuid=uuid,
            name=dom.name(),
            state=_state(state, active),
            persistent=persistent,
            run_id=run_id,
        )

    @_one_at_a_time
    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        dom = self._domain(uuid)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return _wrap(lambda: dom.XMLDesc(flags))
        except BackendError as exc:
            if exc.code == ErrorCode.NO_DOMAIN:
                self._domains.pop(uuid, None)
            raise

    @_one_at_a_time
    def detach_live(self, uuid: str, alias: str) -> None:
        dom = self._domain(uuid)
        # detachDeviceAlias never waits for the guest (detachDeviceFlags blocks
        # up to 5 s holding the domain's job); completion is the event's business.
        _wrap(lambda: dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE))

    @_one_at_a_time
    def detach_config(self, uuid: str, device_xml: str) -> None:
        dom = self._domain(uuid)
        _wrap(lambda: dom.detachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG))


def _state(state: int, active: bool) -> DomainState:
    if not active:
        return DomainState.SHUTOFF
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return DomainState.PAUSED
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return DomainState.RUNNING
    return DomainState.OTHER  # active, in transition (shutting down, nostate, …)
