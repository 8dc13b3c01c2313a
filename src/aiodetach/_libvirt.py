"""The real hypervisor: libvirt-python behind the [`Backend`][aiodetach.backend.Backend] interface.

This is the one place where libvirt exceptions exist; everything leaving this
module is a `BackendError` carrying libvirt's code, error domain and
message, which the service maps to typed errors in one function.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import libvirt

from ._connect import Connect, alive, from_factory
from ._errors_map import is_already_tracked, is_domain_gone, is_unsupported
from ._eventloop import quiet_connection
from ._lanes import Lanes
from ._libvirt_find import find_domain
from ._libvirt_find import wrap as _wrap
from ._libvirt_names import CLOSE_REASONS as _CLOSE_REASONS
from ._libvirt_names import EVENT_NAMES
from ._libvirt_names import SHUTOFF_REASONS as _SHUTOFF_REASONS
from ._libvirt_names import STOP_REASONS as _STOP_REASONS
from ._libvirt_names import domain_state as _state
from ._log import get_log
from ._rules import uuid_in
from ._settings import DEFAULT_CONNECTIONS, MAX_CONNECTIONS
from .backend import BackendError, DomainInfo, ErrorCode, ErrorDomain, EventSink

__all__ = ["LibvirtBackend"]

_log = get_log()
_T = TypeVar("_T")
_P = ParamSpec("_P")


class _Lane:
    """One connection of the backend, with at most one call inside it at a time.

    Measured on libvirt 9.0's client over ``qemu+tcp`` (tests/real/private/
    test_fleet_partition.py, docs/libvirt-behaviour.md): when the network
    to the daemon is cut while two or more calls are in flight on one
    connection, keepalive fails one of them and the others stay blocked
    (the close callback never fires); when the link comes back the process
    dies of SIGSEGV inside ``virNetClientSendWithReply``.  With one call in
    flight keepalive fails it cleanly and reports the close.  Closing a
    connection while another thread is inside a call on it is unsafe as
    well, so a lane is closed (and opened) under its lock too.

    Concurrency comes from several lanes instead: each call takes a whole
    connection, so every call in flight is alone on its own.  Which lane a
    call gets (any free one, never every lane for one domain) is
    `aiodetach._lanes.Lanes`'s business; the lock only keeps calls out
    while `LibvirtBackend.open()` or ``close`` has the lane.
    """

    __slots__ = ("conn", "domains", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.conn: libvirt.virConnect | None = None
        self.domains: dict[str, libvirt.virDomain] = {}
        """virDomain objects of *this* connection (a virDomain calls through the
        connection it was looked up on), so a lane never reuses another's."""

    def connection(self) -> libvirt.virConnect:
        conn = self.conn
        if conn is None:
            raise BackendError(
                ErrorCode.INTERNAL_ERROR, "not connected to libvirt", origin=ErrorDomain.RPC
            )
        return conn

    def domain(self, uuid: str) -> libvirt.virDomain:
        dom = self.domains.get(uuid)
        if dom is None:
            conn = self.connection()
            dom = _wrap(lambda: conn.lookupByUUIDString(uuid))
            self.domains[uuid] = dom
        return dom


def _on_a_lane(
    method: Callable[Concatenate[LibvirtBackend, _Lane, _P], _T],
) -> Callable[Concatenate[LibvirtBackend, _P], _T]:
    """Run the call on a lane of its own for its whole duration (see `_Lane`).

    The call's first argument names its domain (a UUID, or a lookup's name
    or UUID), which the lanes need: one domain's calls never hold them all.
    """

    def on_a_lane(backend: LibvirtBackend, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        domain = uuid_in(str(args[0])) if args else None
        with backend._lanes_in_use.take(domain) as lane, lane.lock:
            return method(backend, lane, *args, **kwargs)

    on_a_lane.__name__ = method.__name__
    on_a_lane.__doc__ = method.__doc__
    return on_a_lane


class LibvirtBackend:
    """Libvirt connections with the device and lifecycle callbacks on the first.

    ``lanes`` is how many connections calls may use at once, the first
    included (``DetachSettings.connections``): one call in flight per
    connection (see `_Lane`), so with ``lanes=1`` every call waits for
    the one before it to return.  The first connection alone carries the
    callbacks and the close notification: the extra ones only make calls.
    """

    uses_libvirt_events = True
    """The service runs libvirt's event loop on asyncio for backends saying so."""

    def __init__(
        self,
        uri: str | None = None,
        *,
        connect: Connect | None = None,
        connection: libvirt.virConnect | None = None,
        keepalive: tuple[int, int] = (5, 3),
        lanes: int = DEFAULT_CONNECTIONS,
    ) -> None:
        if not 1 <= lanes <= MAX_CONNECTIONS:
            raise ValueError(f"lanes must be between 1 and {MAX_CONNECTIONS}, not {lanes!r}")
        if sum(given is not None for given in (uri, connect, connection)) > 1:
            raise ValueError("give one of uri, connect and connection, not several")
        self._uri = uri
        self._connect = connect
        self._given = connection
        # The URI libvirt reports for the first connection, once one was opened
        # (or at once for a caller's connection): what ``uri`` says when the
        # caller named no URI.
        self._connected_uri: str | None = None
        self._given_close_callback = False  # ours is on the caller's connection
        if connection is not None:
            # A caller's connection is one connection: no extra lanes to open.
            lanes = 1
            with contextlib.suppress(libvirt.libvirtError):
                self._connected_uri = connection.getURI()
        self._keepalive = keepalive
        self._lanes = tuple(_Lane() for _ in range(lanes))
        self._lanes_in_use = Lanes(self._lanes)
        self._callback_ids: list[int] = []  # on the first lane's connection, under its lock

    @property
    def uri(self) -> str:
        """The URI as the caller gave it; else the one libvirt reports for the
        connection (``getURI()``), known once connected.  Until then: the
        ``LIBVIRT_DEFAULT_URI`` libvirt will use, or a description."""
        if self._uri is not None:
            return self._uri
        if self._connected_uri is not None:
            return self._connected_uri
        if self._given is not None:
            return "the caller's connection"  # closed before it was given
        if self._connect is not None:
            connect = self._connect
            return f"{getattr(connect, '__qualname__', None) or type(connect).__qualname__}()"
        return os.environ.get("LIBVIRT_DEFAULT_URI") or "libvirt's default URI"

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    # -- connection ----------------------------------------------------------
    def open(self, sink: EventSink, *, read_only: bool) -> None:
        """Open the first connection with the callbacks, then the extra lanes.

        Under every lane's lock: a call made meanwhile waits for the new
        connections.  If any of them fails, those already opened are closed.
        """
        opener = self._opener(read_only)
        with contextlib.ExitStack() as held:
            for lane in self._lanes:
                held.enter_context(lane.lock)
            conn, ids = self._open_first(opener, sink)
            extra: list[libvirt.virConnect] = []
            try:
                for _ in self._lanes[1:]:
                    extra.append(self._open_extra(opener))
            except BaseException:
                for other in extra:
                    self._close_conn(other, [])
                self._release(conn, ids)
                raise
            for lane, opened in zip(self._lanes, [conn, *extra], strict=True):
                lane.conn, lane.domains = opened, {}
            self._callback_ids = ids
            # The first connection names the service for good (journal rows' key).
            if self._uri is None and self._connected_uri is None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._connected_uri = conn.getURI()

    def _opener(self, read_only: bool) -> Callable[[], libvirt.virConnect]:
        """How this backend gets a connection: the URI's (``None``: libvirt's
        default, which ``LIBVIRT_DEFAULT_URI`` or the client config names),
        the caller's factory's (read-only is then the factory's business), or
        the caller's one connection, as long as it is alive."""
        given, connect, uri = self._given, self._connect, self._uri
        if given is not None:
            return lambda: alive(given, self.uri)
        # The connections the service owns get their errors raised, not
        # printed (quiet_connection); the caller's one keeps its own handler.
        if connect is not None:
            return lambda: quiet_connection(from_factory(connect))
        if read_only:
            return lambda: quiet_connection(libvirt.openReadOnly(uri))
        return lambda: quiet_connection(libvirt.open(uri))

    def _open_first(
        self, opener: Callable[[], libvirt.virConnect], sink: EventSink
    ) -> tuple[libvirt.virConnect, list[int]]:
        conn = _wrap(opener)

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

        def rebooted(_c: Any, dom: libvirt.virDomain, _o: Any) -> None:
            sink.domain_rebooted(dom.UUIDString(), dom.name())

        def closed(_c: Any, reason: int, _o: Any) -> None:
            sink.connection_closed(_CLOSE_REASONS.get(reason, str(reason)))

        ids: list[int] = []
        try:
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, removed),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, removal_failed),
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, rebooted),
            ):
                register = functools.partial(
                    conn.domainEventRegisterAny, None, event_id, callback, None
                )
                try:
                    ids.append(_wrap(register))
                except BackendError as err:
                    # The caller (or another service) listens for it on its
                    # connection already: theirs stays, the service does without.
                    if conn is not self._given or not is_already_tracked(err):
                        raise
                    # Said, not silent: without the event a detach is confirmed
                    # only by the re-check when its window ends (docs: Connecting).
                    _log.warning(
                        "aiodetach.event_not_received",
                        uri=self.uri,
                        libvirt_event=EVENT_NAMES.get(event_id, str(event_id)),
                        why="the caller's connection already has an all-domain callback for it",
                    )
            if conn is not self._given:
                _wrap(lambda: conn.registerCloseCallback(closed, None))
                self._set_keepalive(conn)
            else:
                # libvirt keeps one close callback per connection: if the caller
                # has one, theirs stays (a loss is then noticed by a failed call),
                # and their keepalive is theirs to set.
                try:
                    _wrap(lambda: conn.registerCloseCallback(closed, None))
                    self._given_close_callback = True
                except BackendError:
                    self._given_close_callback = False
        except BaseException:
            self._release(conn, ids)
            raise
        return conn, ids

    def _open_extra(self, opener: Callable[[], libvirt.virConnect]) -> libvirt.virConnect:
        """A lane for calls only: no callbacks, but keepalive like the first,
        so that a call in flight on it into a partition fails just the same."""
        conn = _wrap(opener)
        try:
            self._set_keepalive(conn)
        except BaseException:
            self._close_conn(conn, [])
            raise
        return conn

    def _set_keepalive(self, conn: libvirt.virConnect) -> None:
        # Notice a hung daemon or a partitioned network, not only a closed
        # socket: after `count` unanswered keepalives, `interval` s apart.
        interval, count = self._keepalive
        try:
            _wrap(lambda: _keepalive(conn, interval, count))
        except BackendError as err:
            # An in-process driver (test:///default) has no keepalive: nothing to lose.
            if not is_unsupported(err):
                raise

    def close(self) -> None:
        """Close every lane, each under its own lock: never under a call."""
        for i, lane in enumerate(self._lanes):
            with lane.lock:
                conn, lane.conn, lane.domains = lane.conn, None, {}
                ids, self._callback_ids = (self._callback_ids, []) if i == 0 else ([], [])
                if conn is not None:
                    self._release(conn, ids)

    def _release(self, conn: libvirt.virConnect, ids: list[int]) -> None:
        """Close a connection of ours; from the caller's, only take our callbacks off."""
        if conn is self._given:
            self._deregister(conn, ids, close_callback=self._given_close_callback)
            self._given_close_callback = False
        else:
            self._close_conn(conn, ids)

    @staticmethod
    def _deregister(conn: libvirt.virConnect, ids: list[int], *, close_callback: bool) -> None:
        for cid in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cid)
        if close_callback:
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()

    @staticmethod
    def _close_conn(conn: libvirt.virConnect, ids: list[int]) -> None:
        LibvirtBackend._deregister(conn, ids, close_callback=bool(ids))
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _connection(self) -> libvirt.virConnect:
        """The first connection, the one with the callbacks (for tests)."""
        return self._lanes[0].connection()

    # -- domains -------------------------------------------------------------
    @_on_a_lane
    def lookup(self, lane: _Lane, ref: str) -> DomainInfo:
        conn = lane.connection()
        dom = find_domain(conn, ref)
        # libvirt-python annotates state() as str; it returns [state, reason].
        state, reason = cast(list[int], _wrap(dom.state))[:2]
        # isActive, not the state, says whether a live definition exists: while
        # a restarted libvirtd reconnects to its QEMU processes a running
        # domain may briefly report another state.
        active = bool(_wrap(dom.isActive))
        persistent = bool(_wrap(dom.isPersistent))
        uuid = dom.UUIDString()
        lane.domains[uuid] = dom
        run_id = str(_wrap(dom.ID)) if active else None
        return DomainInfo(
            uuid=uuid,
            name=dom.name(),
            state=_state(state, active),
            persistent=persistent,
            run_id=run_id,
            stop_reason=None if active else _SHUTOFF_REASONS.get(reason),
        )

    @_on_a_lane
    def domain_xml(self, lane: _Lane, uuid: str, *, inactive: bool) -> str:
        dom = lane.domain(uuid)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return _wrap(lambda: dom.XMLDesc(flags))
        except BackendError as exc:
            if is_domain_gone(exc):
                lane.domains.pop(uuid, None)
            raise

    @_on_a_lane
    def detach_live(self, lane: _Lane, uuid: str, alias: str) -> None:
        dom = lane.domain(uuid)
        # detachDeviceAlias never waits for the guest (detachDeviceFlags blocks
        # up to 5 s holding the domain's job); completion is the event's business.
        _wrap(lambda: dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE))

    @_on_a_lane
    def detach_config(self, lane: _Lane, uuid: str, device_xml: str) -> None:
        dom = lane.domain(uuid)
        _wrap(lambda: dom.detachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG))


def _keepalive(conn: libvirt.virConnect, interval: int, count: int) -> None:
    """``setKeepAlive``, asked once more when libvirt's answer was lost.

    libvirt keeps its last error per thread and libvirt-python reads it only
    after the call returned; a finalizer running in between (a virDomain's,
    freed by the cyclic GC) resets it, and the failure arrives without a code
    (seen once in a full test run: "virConnectSetKeepAlive() failed").  The
    call is idempotent, so asking again gets the real answer (for an
    in-process driver: "not supported")."""
    try:
        conn.setKeepAlive(interval, count)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() is not None:
            raise
        conn.setKeepAlive(interval, count)
