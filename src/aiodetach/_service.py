"""The detach protocol.

One :class:`DetachService` owns one libvirt connection.  A detach is two
separate steps:

1. **persistent** (``AFFECT_CONFIG``): one synchronous call, never retried.
   "Device not found" there is ignored when a live detach follows (the device
   may have been hot-plugged live only); any other error is fatal.
2. **live**: an *unplug* keyed by ``(domain UUID, alias)`` is registered
   *before* the request is sent, so a ``DEVICE_REMOVED`` that arrives before
   or while the request returns is never missed.  The unplug is driven by one
   task per device, whatever the number of callers: a second caller joins
   it, and so never causes a second request to libvirt while one is pending
   (re-sending interrupts an unplug the guest is working on, which is the bug
   this library exists to fix).  Each attempt is waited out for ``timeout``;
   then the live XML is re-read (the event may have been lost) and only if the
   device is still there is the request sent again, ``attempts`` times in
   total.  ``DEVICE_REMOVAL_FAILED`` ends it at once.

Blocking libvirt calls run in the service's own worker threads; events reach
the loop through :mod:`aiodetach._eventloop` (or, from a fake, through
``call_soon_threadsafe``).  A dropped connection is re-opened with backoff
and every pending unplug is reconciled against the live XML.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog

from ._backend import Backend, BackendError, DomainInfo, DomainState, ErrorCode
from ._errors_map import is_alias_missing, is_connection_error, is_in_progress, map_error
from ._eventloop import install_event_loop
from ._libvirt import LibvirtBackend
from ._many import DetachOutcome, DetachRequest, as_request, collect, iter_outcomes
from ._result import DetachResult
from ._settings import DetachSettings
from ._xml import DeviceRef, Selector, find_device, has_alias, selector_from
from .errors import (
    ConnectionLost,
    DetachFailed,
    DetachRefused,
    DetachTimeout,
    DeviceNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    DomainStopped,
    InvalidRequest,
    ReadOnlyConnection,
    ServiceClosed,
)

__all__ = ["DetachService", "DeviceEvent"]

_log = structlog.get_logger("aiodetach")
_T = TypeVar("_T")
Key = tuple[str, str]


class _Outcome(enum.Enum):
    REMOVED = "removed"  # DEVICE_REMOVED
    FAILED = "failed"  # DEVICE_REMOVAL_FAILED
    GONE = "gone"  # absent from the live XML (its event was lost)


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A device notification from libvirt, as streamed by :meth:`DetachService.events`."""

    kind: Literal["device-removed", "device-removal-failed", "domain-stopped"]
    domain_uuid: str
    domain_name: str
    alias: str | None
    detail: str | None = None
    timestamp: float = field(default_factory=time.time)


Verdict = _Outcome | tuple[str, str]  # ("stopped", reason) for a stopped domain


@dataclass(eq=False, slots=True)
class _Unplug:
    """One live unplug in flight: its verdict, its driver and its callers.

    Events write ``verdict`` (the first one wins) whether or not the driver
    is waiting at that moment, so an event that lands while a request is
    still being sent, or while the XML is re-read, is never lost.  ``waiter``
    is the driver's current wait, a plain private Future: waking it is all an
    event, a timeout or a lost connection has to do.  Kept small on purpose:
    a host agent may hold ten thousand of these.
    """

    key: Key
    verdict: Verdict | None = None
    waiter: asyncio.Future[None] | None = None
    task: asyncio.Task[_LiveDone] | None = None
    callers: int = 0
    sent: int = 0
    generation: int = 0  # of the connection the last request went out on

    def decide(self, verdict: Verdict) -> None:
        if self.verdict is None:
            self.verdict = verdict
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class _LiveDone:
    sent: int
    confirmed_by: Literal["event", "xml"]


DomainRef = Any  # str (name or UUID) or a libvirt.virDomain


class DetachService:
    """Detach devices from libvirt domains, waiting for the guest.

    Use as an async context manager; one instance per libvirt URI::

        async with DetachService("qemu:///system") as svc:
            result = await svc.detach("vm-1", alias="ua-disk1")

    ``backend`` replaces libvirt (see :class:`aiodetach.testing.FakeHypervisor`).
    ``read_only=True`` opens a read-only connection, good for :meth:`events`
    only: detaching through it raises :class:`ReadOnlyConnection`.
    """

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        settings: DetachSettings | None = None,
        backend: Backend | None = None,
        read_only: bool = False,
    ) -> None:
        if not isinstance(uri, str) or not uri.strip():
            raise InvalidRequest(f"uri must be a non-empty string, not {uri!r}")
        self._settings = settings if settings is not None else DetachSettings()
        if backend is None:
            backend = LibvirtBackend(uri)
        # A libvirt backend (ours, a subclass, a wrapper) needs libvirt's event
        # loop running on this asyncio loop; a fake does not.
        self._real = bool(getattr(backend, "uses_libvirt_events", False))
        self._backend: Backend = backend
        self._read_only = read_only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._executor: ThreadPoolExecutor | None = None
        self._unplugs: dict[Key, _Unplug] = {}
        self._config_ops: dict[tuple[str, str], asyncio.Task[bool]] = {}
        # The live request of a device still inside its worker thread.  It
        # outlives a cancelled unplug, and the next unplug of that device waits
        # for it instead of sending a second request on top of it.
        self._sending: dict[Key, asyncio.Future[None]] = {}
        # Calls handed to the worker threads at once (live requests excepted).
        # Without a bound, ten thousand detaches starting together queue ten
        # thousand reads, and their answers (whole domain XMLs) pile up faster
        # than the loop parses them: measured, that pile was the peak memory.
        self._call_slots = asyncio.Semaphore(self._settings.max_threads)
        self._watchers: set[asyncio.Queue[DeviceEvent]] = set()
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._close_task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._dead: ConnectionLost | None = None
        self._generation = 0  # bumped by every (re)connect
        self.reconnects = 0
        """How many times the connection was re-opened after being lost."""

    # ------------------------------------------------------------------ life
    @property
    def settings(self) -> DetachSettings:
        return self._settings

    @property
    def uri(self) -> str:
        return self._backend.uri

    async def __aenter__(self) -> DetachService:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect.  Raises :class:`ConnectionLost` if libvirtd cannot be reached."""
        if self._state != "new":
            raise InvalidRequest(f"service is {self._state}; create a new one")
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        if self._real:
            install_event_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.max_threads, thread_name_prefix="aiodetach"
        )
        self._state = "open"
        try:
            await self._call(self._backend.open, self, read_only=self._read_only)
        except BackendError as err:
            await self.aclose()
            raise map_error(err, domain=None, alias=None, action=f"connect to {self.uri}") from None
        except BaseException:
            await self.aclose()
            raise
        self._up.set()
        _log.debug("aiodetach.connected", uri=self.uri)

    async def aclose(self) -> None:
        """Cancel what is in flight, close the connection, stop the threads.

        Idempotent.  Shielded from cancellation: a cancelled ``aclose()`` still
        finishes closing before the cancellation is re-raised.
        """
        if self._state == "closed":
            return
        if self._close_task is None:
            self._state = "closing"
            self._close_task = asyncio.get_running_loop().create_task(self._do_close())
        task = self._close_task
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
        task.result()
        if cancelled:
            raise asyncio.CancelledError

    async def _do_close(self) -> None:
        self._up.set()  # whoever waits for a reconnect wakes up and finds us closing
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        drivers = [u.task for u in self._unplugs.values() if u.task is not None]
        for task in drivers:
            task.cancel()
        pending: list[asyncio.Future[Any]] = [*drivers, *self._config_ops.values()]
        if self._reconnect_task is not None:
            pending.append(self._reconnect_task)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for queue in self._watchers:
            queue.put_nowait(_CLOSED)
        if self._executor is not None:
            with contextlib.suppress(Exception):
                await self._call(self._backend.close)
            executor = self._executor
            # Join the worker threads without blocking the loop.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
        if self._real:
            await install_event_loop().settle()
        self._state = "closed"
        _log.debug("aiodetach.closed", uri=self.uri)

    def _check_usable(self) -> None:
        if self._state != "open":
            raise ServiceClosed(f"service is {self._state}")
        if asyncio.get_running_loop() is not self._loop:
            raise InvalidRequest(
                "the service is used from another event loop than it was opened on"
            )

    # ---------------------------------------------------------------- calls
    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one blocking hypervisor call in a worker thread."""
        if self._state == "closed" or self._executor is None:
            raise ServiceClosed("service is closed")
        loop = asyncio.get_running_loop()
        async with self._call_slots:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )

    async def _read(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """An idempotent call: if the connection drops, wait for it and ask again."""
        while True:
            try:
                return await self._call(fn, *args, **kwargs)
            except BackendError as err:
                if self._state != "open":
                    raise ServiceClosed(f"service is {self._state}") from None
                if not is_connection_error(err):
                    raise
                self._on_connection_closed("call failed: " + err.message)
                await self._wait_connected()

    # -------------------------------------------------------- event intake
    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits anymore
                loop.call_soon_threadsafe(fn, *args)

    def device_removed(self, uuid: str, name: str, alias: str) -> None:
        """libvirt's DEVICE_REMOVED (EventSink; any thread).

        The hot path of a mass detach, so on the loop thread (libvirtaio
        dispatches there) it is written out in full: one dict lookup and one
        ``set_result``, no log call (even a filtered structlog call costs as
        much as the dispatch itself; the driver logs the outcome).
        """
        if threading.get_ident() != self._loop_thread:
            self._to_loop(self._on_device_event, _Outcome.REMOVED, uuid, name, alias)
            return
        unplug = self._unplugs.get((uuid, alias))
        if unplug is not None:
            if unplug.verdict is None:
                unplug.verdict = _Outcome.REMOVED
            waiter = unplug.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._watchers:
            self._publish(DeviceEvent("device-removed", uuid, name, alias))

    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None:
        """libvirt's DEVICE_REMOVAL_FAILED (EventSink; any thread)."""
        self._to_loop(self._on_device_event, _Outcome.FAILED, uuid, name, alias)

    def domain_stopped(self, uuid: str, name: str, reason: str) -> None:
        """Lifecycle STOPPED (EventSink; any thread)."""
        self._to_loop(self._on_domain_stopped, uuid, name, reason)

    def domain_resumed(self, uuid: str, name: str) -> None:
        """Lifecycle RESUMED / STARTED (EventSink; any thread)."""
        self._to_loop(self._on_domain_resumed, uuid)

    def connection_closed(self, reason: str) -> None:
        """libvirt's close callback (EventSink; any thread)."""
        self._to_loop(self._on_connection_closed, reason)

    def _on_device_event(self, outcome: _Outcome, uuid: str, name: str, alias: str) -> None:
        unplug = self._unplugs.get((uuid, alias))
        if unplug is not None:
            unplug.decide(outcome)
        if self._watchers:
            kind: Literal["device-removed", "device-removal-failed"] = (
                "device-removed" if outcome is _Outcome.REMOVED else "device-removal-failed"
            )
            self._publish(DeviceEvent(kind, uuid, name, alias))

    def _on_domain_stopped(self, uuid: str, name: str, reason: str) -> None:
        # A scan, not an index: domains stop rarely, and an index would cost
        # memory for every pending detach.
        for (domain_uuid, _alias), unplug in self._unplugs.items():
            if domain_uuid == uuid:
                unplug.decide(("stopped", reason))
        self._publish(DeviceEvent("domain-stopped", uuid, name, None, detail=reason))

    def _on_domain_resumed(self, uuid: str) -> None:
        # Wakes only the drivers waiting out a pause (see _until_running); a
        # driver inside an attempt re-arms its wait and carries on.
        for (domain_uuid, _alias), unplug in self._unplugs.items():
            if domain_uuid == uuid:
                unplug.wake()

    def _publish(self, event: DeviceEvent) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)

    # ----------------------------------------------------------- reconnect
    def _on_connection_closed(self, reason: str) -> None:
        if self._state != "open" or not self._up.is_set():
            return
        _log.warning("aiodetach.connection_lost", uri=self.uri, reason=reason)
        self._up.clear()
        for unplug in self._unplugs.values():
            unplug.wake()  # its driver sees the connection down and waits for it
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self._settings
        deadline = loop.time() + settings.reconnect_timeout
        delay = 0.05
        with contextlib.suppress(Exception):
            await self._call(self._backend.close)
        while True:
            try:
                await self._call(self._backend.open, self, read_only=self._read_only)
                break
            except BackendError as err:
                if loop.time() + delay > deadline:
                    self._dead = ConnectionLost(
                        f"libvirtd at {self.uri} did not come back within "
                        f"{settings.reconnect_timeout:g} s: {err.message}",
                        libvirt_code=err.code,
                    )
                    _log.error("aiodetach.connection_dead", uri=self.uri, error=err.message)
                    self._up.set()  # wake waiters; they find self._dead
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.reconnect_backoff_max)
        self.reconnects += 1
        self._generation += 1
        self._up.set()
        _log.info("aiodetach.reconnected", uri=self.uri, reconnects=self.reconnects)

    def _revive(self) -> None:
        """A new request after the daemon was given up on: try connecting again."""
        if self._dead is None or self._state != "open":
            return
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return
        self._dead = None
        self._up.clear()
        _log.info("aiodetach.reconnecting", uri=self.uri)
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _wait_connected(self) -> None:
        await self._up.wait()
        if self._dead is not None:
            raise ConnectionLost(self._dead.message, libvirt_code=self._dead.libvirt_code)
        if self._state != "open":
            raise ServiceClosed(f"service is {self._state}")

    # ---------------------------------------------------------------- API
    async def detach(
        self,
        domain: DomainRef,
        *,
        alias: str | None = None,
        target: str | None = None,
        mac: str | None = None,
        xml: str | None = None,
        live: bool | None = None,
        persistent: bool | None = None,
    ) -> DetachResult:
        """Detach one device and return once it is gone.

        Name the device with exactly one of ``alias`` (any device), ``target``
        (a disk's target dev, e.g. ``"vdb"``), ``mac`` (an interface) or
        ``xml`` (device XML as libvirt would match it).  ``live`` and
        ``persistent`` default to "as the domain is": live if it is running or
        paused, persistent if it has a persistent definition.

        Raises a :class:`~aiodetach.errors.DetachError` subclass naming the
        domain and alias on every failure.
        """
        started = time.monotonic()
        ref = _domain_ref(domain)
        try:
            selector = selector_from(alias=alias, target=target, mac=mac, xml=xml)
        except InvalidRequest as exc:
            exc.domain = ref
            raise
        for name, value in (("live", live), ("persistent", persistent)):
            if value is not None and not isinstance(value, bool):
                raise InvalidRequest(f"{name} must be True, False or None", domain=ref)
        if live is False and persistent is False:
            raise InvalidRequest("live=False and persistent=False: nothing to detach", domain=ref)
        self._check_usable()
        if self._read_only:
            raise ReadOnlyConnection(
                f"the connection to {self.uri} is read-only; detaching needs read-write",
                domain=ref,
                alias=selector.value if selector.kind == "alias" else None,
            )
        self._revive()
        await self._wait_connected()

        info = await self._lookup(ref)
        do_live, do_persistent = _decide(info, live, persistent)
        live_dev = pers_dev = None
        # Only the device's own XML is kept: a whole domain definition per
        # pending detach adds up when thousands wait.
        if do_live:
            live_dev = find_device(
                await self._domain_xml(info, inactive=False, alias=None), selector
            )
        if do_persistent:
            pers_dev = find_device(
                await self._domain_xml(info, inactive=True, alias=None), selector
            )
        found = _check_found(
            info, selector, live, persistent, do_live, do_persistent, live_dev, pers_dev
        )
        shown_alias = found.alias
        if shown_alias is None and selector.kind == "alias":
            shown_alias = selector.value

        persistent_done = False
        if pers_dev is not None:
            persistent_done = await self._detach_persistent(
                info, pers_dev, shown_alias, live_follows=live_dev is not None
            )

        live_done: _LiveDone | None = None
        joined = False
        if live_dev is not None:
            if live_dev.alias is None:
                raise DetachRefused(
                    "the device has no alias in the live XML, so libvirt cannot unplug it by "
                    "alias (libvirt assigns one to every device of a running domain)",
                    domain=info.name,
                )
            live_done, joined = await self._detach_live(info, live_dev.alias)

        result = DetachResult(
            domain_uuid=info.uuid,
            domain_name=info.name,
            alias=(live_dev.alias if live_dev else None) or shown_alias,
            device=found.description,
            live=live_done is not None,
            persistent=persistent_done,
            attempts=live_done.sent if live_done else 0,
            elapsed=time.monotonic() - started,
            confirmed_by=live_done.confirmed_by if live_done else None,
            joined=joined,
        )
        _log.info(
            "aiodetach.detached",
            domain=info.name,
            alias=result.alias,
            live=result.live,
            persistent=result.persistent,
            attempts=result.attempts,
            elapsed=round(result.elapsed, 3),
            confirmed_by=result.confirmed_by,
        )
        return result

    async def events(self, domain: DomainRef | None = None) -> AsyncIterator[DeviceEvent]:
        """Stream device-removed / removal-failed / domain-stopped events.

        ``domain`` (name or UUID) filters.  Ends when the service closes.
        """
        self._check_usable()
        ref = _domain_ref(domain) if domain is not None else None
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            while True:
                event = await queue.get()
                if event is _CLOSED:
                    return
                if ref is None or ref in (event.domain_name, event.domain_uuid):
                    yield event
        finally:
            self._watchers.discard(queue)

    async def detach_iter(
        self,
        requests: Iterable[DetachRequest | Mapping[str, Any]],
        *,
        concurrency: int = 16,
        per_domain: int | None = 4,
    ) -> AsyncGenerator[DetachOutcome, None]:
        """Detach many devices; yield each :class:`DetachOutcome` as it completes.

        At most ``concurrency`` detaches run at once, and at most
        ``per_domain`` on one domain (libvirt serialises a domain's detaches
        in its job, so more only queues inside libvirtd).  A failure is an
        outcome, never an exception: the rest go on.  Requests are validated
        up front (:class:`InvalidRequest` before anything is sent).
        """
        self._check_usable()

        async def run(request: DetachRequest) -> DetachResult:
            return await self.detach(request.domain, **request.detach_kwargs())

        async for outcome in iter_outcomes(
            requests, run, concurrency=concurrency, per_domain=per_domain
        ):
            yield outcome

    async def detach_many(
        self,
        requests: Iterable[DetachRequest | Mapping[str, Any]],
        *,
        concurrency: int = 16,
        per_domain: int | None = 4,
        on_progress: Callable[[DetachOutcome, int, int], None] | None = None,
    ) -> list[DetachOutcome]:
        """Like :meth:`detach_iter`, collected in request order.

        ``on_progress(outcome, done, total)`` is called as each one completes.
        """
        batch = [as_request(item) for item in requests]
        stream = self.detach_iter(batch, concurrency=concurrency, per_domain=per_domain)
        return await collect(stream, len(batch), on_progress)

    def pending(self) -> list[tuple[str, str]]:
        """(domain UUID, alias) of every live unplug in flight."""
        return list(self._unplugs)

    # ---------------------------------------------------------- lookups
    async def _lookup(self, ref: str) -> DomainInfo:
        try:
            return await self._read(self._backend.lookup, ref)
        except BackendError as err:
            raise map_error(err, domain=ref, alias=None, action="domain lookup") from None

    async def _domain_xml(self, info: DomainInfo, *, inactive: bool, alias: str | None) -> str:
        try:
            return await self._read(self._backend.domain_xml, info.uuid, inactive=inactive)
        except BackendError as err:
            raise map_error(err, domain=info.name, alias=alias, action="reading the XML") from None

    # ------------------------------------------------------- persistent
    async def _detach_persistent(
        self, info: DomainInfo, dev: DeviceRef, alias: str | None, *, live_follows: bool
    ) -> bool:
        """One synchronous config detach, shared by concurrent callers."""
        key = (info.uuid, dev.description)
        task = self._config_ops.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._config_detach(info, dev))
            self._config_ops[key] = task
            task.add_done_callback(functools.partial(self._config_done, key))
        try:
            await asyncio.shield(task)
        except DeviceNotFound:
            if live_follows:
                _log.info("aiodetach.persistent_missing_ignored", domain=info.name, alias=alias)
                return False
            raise
        _log.info("aiodetach.persistent_detached", domain=info.name, alias=alias)
        return True

    def _config_done(self, key: tuple[str, str], task: asyncio.Task[bool]) -> None:
        self._config_ops.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: its callers (if any are left) got it

    async def _config_detach(self, info: DomainInfo, dev: DeviceRef) -> bool:
        try:
            await self._call(self._backend.detach_config, info.uuid, dev.xml)
        except BackendError as err:
            if is_connection_error(err) and self._state == "open":
                # Did it land before the daemon went away?  Ask the definition.
                self._on_connection_closed("call failed: " + err.message)
                await self._wait_connected()
                xml = await self._domain_xml(info, inactive=True, alias=dev.alias)
                if find_device(xml, Selector("xml", dev.xml)) is None:
                    return True
                try:
                    await self._call(self._backend.detach_config, info.uuid, dev.xml)
                except BackendError as err2:
                    raise map_error(
                        err2, domain=info.name, alias=dev.alias, action="persistent detach"
                    ) from None
                return True
            raise map_error(
                err, domain=info.name, alias=dev.alias, action="persistent detach"
            ) from None
        return True

    # ------------------------------------------------------------- live
    async def _detach_live(self, info: DomainInfo, alias: str) -> tuple[_LiveDone, bool]:
        if self._state != "open":
            raise ServiceClosed(f"service is {self._state}", domain=info.name, alias=alias)
        key = (info.uuid, alias)
        unplug = self._unplugs.get(key)
        joined = unplug is not None
        if unplug is None:
            loop = asyncio.get_running_loop()
            unplug = _Unplug(key)
            self._unplugs[key] = unplug
            unplug.task = loop.create_task(self._drive(unplug, info))
        else:
            _log.info("aiodetach.detach_joined", domain=info.name, alias=alias, sent=unplug.sent)
        task = unplug.task
        assert task is not None
        unplug.callers += 1
        try:
            return await asyncio.shield(task), joined
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (
                task.cancelled()
                and self._state != "open"
                and not (current and current.cancelling())
            ):
                raise ServiceClosed(
                    "the service was closed while the detach was in flight",
                    domain=info.name,
                    alias=alias,
                ) from None
            raise
        finally:
            unplug.callers -= 1
            if unplug.callers == 0 and not task.done():
                # Nobody waits any more: stop driving it and free the slot now,
                # so a new request starts a fresh unplug instead of joining a
                # cancelled one.
                task.cancel()
                self._forget(unplug)

    def _forget(self, unplug: _Unplug) -> None:
        if self._unplugs.get(unplug.key) is unplug:
            del self._unplugs[unplug.key]

    async def _drive(self, unplug: _Unplug, info: DomainInfo) -> _LiveDone:
        """Send, wait, re-check, re-send: the live half of the protocol.

        The unplug's slot is freed when this ends, however it ends.  Joined
        callers receive its result or exception through ``asyncio.shield``,
        which also marks the exception retrieved.
        """
        try:
            return await self._drive_attempts(unplug, info)
        finally:
            self._forget(unplug)

    async def _drive_attempts(self, unplug: _Unplug, info: DomainInfo) -> _LiveDone:
        _uuid, alias = unplug.key
        settings = self._settings
        loop = asyncio.get_running_loop()
        log = _log.bind(domain=info.name, alias=alias)
        for attempt in range(1, settings.attempts + 1):
            prior = self._sending.get(unplug.key)
            if prior is not None:
                # A cancelled unplug's request is still in libvirt: let it land.
                await asyncio.wait((prior,))
                if not await self._still_there(unplug, info):
                    return _LiveDone(unplug.sent, "xml")
            unplug.sent += 1
            unplug.generation = self._generation
            log.info("aiodetach.detach_sent", attempt=attempt, attempts=settings.attempts)
            try:
                await self._send(unplug.key)
            except BackendError as err:
                gone = await self._judge_send_error(err, unplug, info, log)
                if gone:
                    return _LiveDone(unplug.sent, "xml")
            # The attempt's clock starts once libvirt has answered, not when the
            # request was queued: in a mass detach a request may wait seconds for
            # a worker thread, and that wait is none of the guest's time to answer.
            verdict = await self._wait(unplug, info, loop.time() + settings.timeout)
            while verdict is None and await self._domain_state(unplug, info) is DomainState.PAUSED:
                # A paused guest cannot answer: this attempt has not really been
                # tried.  No new request (the one sent is still queued in QEMU);
                # once the vCPUs run again the guest gets a full timeout.
                log.info("aiodetach.waiting_while_paused", attempt=attempt)
                verdict = await self._until_running(unplug, info)
                if verdict is None:
                    verdict = await self._wait(unplug, info, loop.time() + settings.timeout)
            if verdict is not None:
                return self._finish(verdict, unplug, info)
            log.info(
                "aiodetach.attempt_timed_out",
                attempt=attempt,
                attempts=settings.attempts,
                timeout=settings.timeout,
            )
            # The loop above just read the state (running), so only the live
            # XML is left to look at before a re-send or the final verdict.
            xml = await self._domain_xml(info, inactive=False, alias=alias)
            if not has_alias(xml, alias):
                log.info("aiodetach.removed_without_event", attempt=attempt)
                return _LiveDone(unplug.sent, "xml")
        log.warning("aiodetach.detach_timeout", attempts=settings.attempts)
        raise DetachTimeout(
            f"the guest did not release the device after {unplug.sent} request(s) of "
            f"{settings.timeout:g} s each",
            domain=info.name,
            alias=alias,
            attempts=unplug.sent,
            timeout=settings.timeout,
        )

    async def _send(self, key: Key) -> None:
        """One live request, tracked until its thread returns (even if we are
        cancelled meanwhile)."""
        if self._state == "closed" or self._executor is None:
            raise ServiceClosed("service is closed")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor, functools.partial(self._backend.detach_live, *key)
        )
        self._sending[key] = future

        def done(f: asyncio.Future[None]) -> None:
            if self._sending.get(key) is f:
                del self._sending[key]
            if not f.cancelled():
                f.exception()  # retrieved here if its awaiter was cancelled

        future.add_done_callback(done)
        await asyncio.shield(future)

    def _finish(self, outcome: Verdict, unplug: _Unplug, info: DomainInfo) -> _LiveDone:
        alias = unplug.key[1]
        if outcome is _Outcome.REMOVED:
            return _LiveDone(unplug.sent, "event")
        if outcome is _Outcome.GONE:
            return _LiveDone(unplug.sent, "xml")
        if outcome is _Outcome.FAILED:
            _log.warning("aiodetach.removal_failed", domain=info.name, alias=alias)
            raise DetachFailed(
                "the guest rejected the unplug (DEVICE_REMOVAL_FAILED); not retried",
                domain=info.name,
                alias=alias,
            )
        assert isinstance(outcome, tuple)
        reason = outcome[1]
        _log.warning("aiodetach.domain_stopped", domain=info.name, alias=alias, reason=reason)
        raise DomainStopped(
            f"the domain stopped ({reason}) before the guest released the device",
            domain=info.name,
            alias=alias,
            reason=reason,
        )

    async def _wait(self, unplug: _Unplug, info: DomainInfo, deadline: float) -> Verdict | None:
        """Wait for a verdict until ``deadline`` (None: timed out), riding out
        a reconnect."""
        loop = asyncio.get_running_loop()
        while unplug.verdict is None:
            down = not self._up.is_set() and self._state == "open"
            if down or unplug.generation != self._generation:
                # The connection dropped: events of the meantime are lost for
                # good, so once back, ask the live XML (and keep waiting out
                # this attempt if the device is still there: no new request).
                if down:
                    _log.info(
                        "aiodetach.waiting_for_reconnect", domain=info.name, alias=unplug.key[1]
                    )
                await self._wait_connected()
                unplug.generation = self._generation
                if unplug.verdict is None and not await self._still_there(unplug, info):
                    return _Outcome.GONE
                continue
            unplug.waiter = waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                return unplug.verdict
            finally:
                unplug.waiter = None
        return unplug.verdict

    async def _until_running(self, unplug: _Unplug, info: DomainInfo) -> Verdict | None:
        """Wait, with no clock running, until a paused domain runs again (None)
        or the unplug is decided.  Woken by libvirt's RESUMED event; looks
        again every ``timeout`` seconds in case that event was lost."""
        loop = asyncio.get_running_loop()
        while True:
            unplug.waiter = waiter = loop.create_future()
            try:
                async with asyncio.timeout(self._settings.timeout):
                    await waiter
            except TimeoutError:
                pass
            finally:
                unplug.waiter = None
            if unplug.verdict is not None:
                return unplug.verdict
            if await self._domain_state(unplug, info) is not DomainState.PAUSED:
                return None

    async def _domain_state(self, unplug: _Unplug, info: DomainInfo) -> DomainState:
        """The domain's state now.  Raises DomainStopped if it is not active."""
        alias = unplug.key[1]
        try:
            current = await self._read(self._backend.lookup, info.uuid)
        except BackendError as err:
            if err.code == ErrorCode.NO_DOMAIN:  # a transient domain went away
                raise DomainStopped(
                    "the domain disappeared before the guest released the device",
                    domain=info.name,
                    alias=alias,
                    reason="undefined",
                ) from None
            raise map_error(err, domain=info.name, alias=alias, action="domain lookup") from None
        if not current.state.is_active:
            raise DomainStopped(
                "the domain stopped before the guest released the device",
                domain=info.name,
                alias=alias,
                reason="stopped",
            )
        return current.state

    async def _still_there(self, unplug: _Unplug, info: DomainInfo) -> bool:
        """Re-read state and live XML: is the device still attached?"""
        await self._domain_state(unplug, info)
        alias = unplug.key[1]
        xml = await self._domain_xml(info, inactive=False, alias=alias)
        return has_alias(xml, alias)

    async def _judge_send_error(
        self, err: BackendError, unplug: _Unplug, info: DomainInfo, log: Any
    ) -> bool:
        """Decide what a failed request means.  True: the device is already gone."""
        alias = unplug.key[1]
        if unplug.verdict is not None:
            return False  # an event already decided it; _wait() reports that
        if is_in_progress(err):
            log.info("aiodetach.unplug_in_progress", message=err.message)
            return False
        if is_connection_error(err) and self._state == "open":
            # It may or may not have reached QEMU: treat it as sent and wait,
            # never as a reason to send a second request right away.
            self._on_connection_closed("call failed: " + err.message)
            return False
        if is_alias_missing(err) and not await self._still_there(unplug, info):
            return True
        if err.code == ErrorCode.OPERATION_INVALID and "not running" in err.message:
            raise DomainStopped(
                "the domain stopped before the guest released the device",
                domain=info.name,
                alias=alias,
                reason="stopped",
            )
        if err.code == ErrorCode.NO_DOMAIN:
            raise DomainStopped(
                "the domain disappeared before the guest released the device",
                domain=info.name,
                alias=alias,
                reason="undefined",
            )
        raise map_error(err, domain=info.name, alias=alias, action="live detach") from None


_CLOSED: Any = object()


def _domain_ref(domain: DomainRef) -> str:
    uuid_string = getattr(domain, "UUIDString", None)
    if callable(uuid_string):
        return str(uuid_string())
    if not isinstance(domain, str):
        raise InvalidRequest(
            "domain must be a name, a UUID string or a libvirt.virDomain, "
            f"not {type(domain).__name__}"
        )
    ref = domain.strip()
    if not ref or any(ord(c) < 32 or ord(c) == 127 for c in domain):
        raise InvalidRequest(f"domain {domain!r} is not a valid domain name or UUID")
    return ref


def _decide(info: DomainInfo, live: bool | None, persistent: bool | None) -> tuple[bool, bool]:
    if live is True and not info.state.is_active:
        raise DomainNotRunning(
            "live detach asked of a shut-off domain; use persistent=True (or the default)",
            domain=info.name,
        )
    if persistent is True and not info.persistent:
        raise DomainNotPersistent(
            "persistent detach asked of a transient domain (it has no persistent definition)",
            domain=info.name,
        )
    do_live = info.state.is_active if live is None else live
    do_persistent = info.persistent if persistent is None else persistent
    return do_live, do_persistent


def _check_found(
    info: DomainInfo,
    selector: Selector,
    live: bool | None,
    persistent: bool | None,
    do_live: bool,
    do_persistent: bool,
    live_dev: DeviceRef | None,
    pers_dev: DeviceRef | None,
) -> DeviceRef:
    """Apply the not-found rules; return the device as found (live first)."""
    alias = selector.value if selector.kind == "alias" else None
    if live is True and live_dev is None:
        raise DeviceNotFound(
            f"no device with {selector.describe()} in the live definition",
            domain=info.name,
            alias=alias,
        )
    if persistent is True and pers_dev is None and not (do_live and live_dev is not None):
        raise DeviceNotFound(
            f"no device with {selector.describe()} in the persistent definition",
            domain=info.name,
            alias=alias,
        )
    found = live_dev or pers_dev
    if found is None:
        where = " or ".join(w for w, d in (("live", do_live), ("persistent", do_persistent)) if d)
        raise DeviceNotFound(
            f"no device with {selector.describe()} in the {where} definition",
            domain=info.name,
            alias=alias,
        )

    return found
