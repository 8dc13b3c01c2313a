"""The front of the library: :class:`DetachService`.

A detach is two separate steps, each in its own module:

1. **persistent** (``AFFECT_CONFIG``, :mod:`aiodetach._persistent`): one
   synchronous call, never retried, shared by concurrent callers of the
   device.  "Device not found" there is ignored when a live detach follows;
   any other error is fatal and the live step does not start.
2. **live** (:mod:`aiodetach._unplug`): the state machine that sends,
   waits for ``DEVICE_REMOVED``, re-checks and re-sends.

This class only validates, looks up, plans (:mod:`aiodetach._rules`) and
hands over; the connection's threads and reconnects are
:mod:`aiodetach._connection`'s, libvirt's callbacks
:mod:`aiodetach._intake`'s.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog

from ._connection import Connection
from ._errors_map import map_error
from ._eventloop import install_event_loop
from ._intake import CLOSED, DeviceEvent, EventIntake
from ._journal import Entry, Journal, open_journal
from ._libvirt import LibvirtBackend
from ._many import (
    DetachOutcome,
    DetachRequest,
    checked_batch,
    collect,
    iter_outcomes,
)
from ._persistent import PersistentStep
from ._registry import Unplugs
from ._result import DetachResult, Recovered
from ._rules import DomainRef, Plan, check_flags, domain_ref, halves, plan_devices
from ._settings import DetachSettings
from ._unplug import LiveDone, Unplug, Verdict, retrieve
from ._xml import Definition, DeviceRef, Selector, describe, find_device, selector_from
from .backend import Backend, BackendError, DomainInfo, ErrorCode
from .errors import (
    ConnectionLost,
    DetachError,
    DetachRefused,
    DomainNotFound,
    HypervisorError,
    InvalidRequest,
    ReadOnlyConnection,
    ServiceClosed,
)
from .instrumentation._dispatch import Hooks, emit_unrun, next_detach_id
from .instrumentation._logging import log_hook
from .instrumentation._records import DetachRecord, DetachStep, Hook, outcome_of

_log = structlog.get_logger("aiodetach")

__all__ = ["DetachService", "DeviceEvent", "DomainRef"]


class DetachService:
    """Detach devices from libvirt domains, waiting for the guest.

    Use as an async context manager; one instance per libvirt URI::

        async with DetachService("qemu:///system") as svc:
            result = await svc.detach("vm-1", alias="ua-disk1")

    ``backend`` replaces libvirt (see :mod:`aiodetach.backend` and
    :class:`aiodetach.testing.FakeHypervisor`).  ``read_only=True`` opens a
    read-only connection, good for :meth:`events` only: detaching through it
    raises :class:`ReadOnlyConnection`.

    ``hooks`` are called with a record of every step of every detach (see
    :mod:`aiodetach.instrumentation`: Prometheus and OpenTelemetry hooks are
    there).  The library's structlog logging is itself a hook, called first;
    ``log=False`` leaves it out (the CLI does, to print its own lines).

    ``journal=PATH`` keeps an SQLite journal of the live requests sent, so
    that a restart of this process neither re-sends into an unplug still in
    progress nor loses the outcome of one that finished meanwhile (see
    :meth:`open`, :meth:`recovered`).  Without it nothing is written.
    """

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        settings: DetachSettings | None = None,
        backend: Backend | None = None,
        read_only: bool = False,
        hooks: Iterable[Hook] = (),
        log: bool = True,
        journal: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(uri, str) or not uri.strip():
            raise InvalidRequest(f"uri must be a non-empty string, not {uri!r}")
        if journal is not None and not isinstance(journal, (str, os.PathLike)):
            raise InvalidRequest(f"journal must be a path, not {journal!r}")
        self._journal_path = journal
        self._journal: Journal | None = None
        self._owns_journal = True
        self._recovered: list[Recovered] = []
        self._hooks = Hooks([log_hook, *hooks] if log else hooks)
        self._settings = settings if settings is not None else DetachSettings()
        self._backend: Backend = (
            backend
            if backend is not None
            else LibvirtBackend(
                uri,
                keepalive=(self._settings.keepalive_interval, self._settings.keepalive_count),
                lanes=self._settings.connections,
            )
        )
        self._read_only = read_only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._close_task: asyncio.Task[None] | None = None
        # Built with the service (not at open) so that it can be closed at any point.
        self._conn: Connection | None = None
        self._unplugs: Unplugs | None = None
        self._intake: EventIntake | None = None
        self._persistent: PersistentStep | None = None

    # ------------------------------------------------------------------ life
    @property
    def settings(self) -> DetachSettings:
        return self._settings

    @property
    def uri(self) -> str:
        return self._backend.uri

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-opened after being lost."""
        return self._conn.reconnects if self._conn is not None else 0

    async def __aenter__(self) -> DetachService:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect.  Raises :class:`ConnectionLost` if libvirtd cannot be reached.

        A cancelled ``open()`` closes what it started, including a connection
        that completes in its worker thread after the cancellation.

        With a journal, it is locked and checked first, before libvirt is
        contacted (:class:`~aiodetach.errors.JournalError` subclasses); then
        every unplug it holds unfinished for this URI is reconciled with the
        live XML: gone → reported detached (``confirmed_by="xml"``); still
        attached → taken up (``pending()``), with no request sent before its
        last request's window is over, and a ``detach()`` of it joins it
        (``result.resumed``); domain gone, shut off or re-started since → the
        request died with it.  :meth:`recovered` lists what was found.
        """
        if self._loop is not None:
            raise InvalidRequest("service was opened already; create a new one")
        self._loop = loop = asyncio.get_running_loop()
        if self._journal is None and self._journal_path is not None:
            self._journal = await open_journal(
                self._journal_path,
                synchronous=self._settings.journal_sync,
                retention=self._settings.journal_retention,
            )
        if self._backend.uses_libvirt_events:
            install_event_loop()
        conn = self._conn = Connection(
            self._backend, self._settings, read_only=self._read_only, hooks=self._hooks
        )
        self._unplugs = Unplugs(conn, self._settings, self._hooks, self._journal)
        self._intake = EventIntake(self._unplugs)
        self._intake.bind(loop)
        self._persistent = PersistentStep(conn, self._unplugs)
        try:
            await conn.open(self._intake)
            conn.record("connected")  # inside: whatever a hook raises, nothing stays open
        except BaseException as exc:
            # Nothing was ever usable: do not make the caller wait for a
            # connect stuck in its thread (connect_timeout, a cancelled open);
            # the connection it may still make is closed when it returns.
            conn.close_grace = 0.0
            await self.aclose()
            if isinstance(exc, BackendError):
                raise map_error(
                    exc, domain=None, alias=None, action=f"connect to {self.uri}"
                ) from None
            raise
        if self._journal is not None and not self._read_only:
            try:
                await self._take_up(conn, self._journal)
            except BaseException:
                await self.aclose()
                raise

    def _share_journal(self, journal: Journal) -> None:
        """Use a journal opened (and closed) by someone else: a fleet's services
        share its one journal, rows keyed by URI."""
        self._journal = journal
        self._owns_journal = False

    async def _take_up(self, conn: Connection, journal: Journal) -> None:
        """Reconcile the journal's unfinished unplugs of this URI with the live XML."""
        assert self._unplugs is not None
        entries = await journal.call(journal.unfinished, self.uri)
        by_domain: dict[str, list[Entry]] = {}
        for entry in entries:
            by_domain.setdefault(entry.domain_uuid, []).append(entry)
        found: list[Unplug] = []
        for uuid, rows in by_domain.items():
            try:
                info = await conn.lookup(uuid)
                xml = await conn.definition(uuid, inactive=False)
            except BackendError as err:
                if err.code == ErrorCode.NO_DOMAIN:
                    await self._ended_while_down(journal, rows, "undefined")
                    continue
                if err.code == ErrorCode.OPERATION_INVALID and "not running" in err.message:
                    await self._ended_while_down(journal, rows, "shut off")
                    continue
                # Nothing known now (a transient error): taken up all the same,
                # unchecked, so that no request of this run goes into its window;
                # the re-check at the window's end finds how it stands.
                _log.warning(
                    "aiodetach.journal_entry_unchecked",
                    domain=rows[0].domain_name,
                    error=err.message,
                )
                for entry in rows:
                    if (entry.domain_uuid, entry.alias) in self._unplugs.by_key:
                        continue
                    found.append(self._unplugs.take_up(entry, entry.run_id))
                    self._note_recovered(entry, "pending", entry.domain_name)
                continue
            if not info.state.is_active:
                await self._ended_while_down(journal, rows, "shut off")
                continue
            for entry in rows:
                if entry.run_id is not None and info.run_id not in (None, entry.run_id):
                    await self._ended_while_down(journal, [entry], "restarted")
                    continue
                live = find_device(xml, Selector("alias", entry.alias))
                if (entry.domain_uuid, entry.alias) in self._unplugs.by_key:
                    continue
                # Gone, or the alias names another device now (the one asked
                # for left, and something else was attached under its alias).
                gone = live is None or (
                    entry.device is not None and _fingerprint(live) != entry.device
                )
                unplug = self._unplugs.take_up(entry, info.run_id, None if gone else live)
                if gone:
                    unplug.decide(Verdict.GONE)
                found.append(unplug)
                self._note_recovered(entry, "removed" if gone else "pending", info.name)
        # The ones decided end at their first step: open() returns without them pending.
        decided = [u.follow() for u in found if u.verdict is not None and not u.over]
        if decided:
            await asyncio.wait(decided)  # never cancels them
            for future in decided:
                retrieve(future)

    async def _ended_while_down(self, journal: Journal, rows: list[Entry], reason: str) -> None:
        for entry in rows:
            await journal.call(journal.finish, entry.row, "stopped")
            self._note_recovered(entry, "stopped", entry.domain_name, reason=reason)

    def _note_recovered(
        self,
        entry: Entry,
        outcome: Literal["pending", "removed", "stopped"],
        name: str,
        *,
        reason: str | None = None,
    ) -> None:
        """What open() found of one journal row, for :meth:`recovered` and the log."""
        self._recovered.append(
            Recovered(
                domain_uuid=entry.domain_uuid,
                domain_name=name,
                alias=entry.alias,
                device=entry.device,
                outcome=outcome,
                confirmed_by="xml" if outcome == "removed" else None,
                reason=reason,
                sent=entry.sent,
                sent_at=entry.sent_at,
            )
        )
        _log.info(
            "aiodetach.recovered", domain=name, alias=entry.alias, outcome=outcome, reason=reason
        )

    def recovered(self) -> list[Recovered]:
        """What ``open()`` found unfinished in the journal, and how it stood.

        ``"pending"`` ones are in :meth:`pending` (until they end); ask for
        the device again to await it (the call joins it).  Empty without a
        journal.
        """
        return list(self._recovered)

    async def aclose(self) -> None:
        """Cancel what is in flight, close the connection, stop the threads.

        Idempotent.  Shielded from cancellation: a cancelled ``aclose()`` still
        finishes closing before the cancellation is re-raised.  Every caller
        still waiting gets :class:`ServiceClosed`.
        """
        if self._close_task is None:
            if self._conn is not None:
                self._conn.begin_close()  # no call reaches the threads from here on
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
        try:
            await self._close_parts()
        finally:
            journal = self._journal
            if journal is not None and self._owns_journal:
                await journal.aclose()

    async def _close_parts(self) -> None:
        conn = self._conn
        if conn is None:
            return
        assert self._unplugs is not None
        assert self._intake is not None
        assert self._persistent is not None
        await self._unplugs.close()
        await self._persistent.close()
        for queue in self._intake.watchers:
            queue.put_nowait(CLOSED)
        await conn.close()
        if self._backend.uses_libvirt_events:
            await install_event_loop().settle()
        conn.record("closed")

    @property
    def _closing(self) -> bool:
        return self._close_task is not None

    def _usable(self) -> Connection:
        conn = self._conn
        if conn is None or self._closing or conn.state != "open":
            state = "closed" if self._closing else "not open"
            raise ServiceClosed(f"service is {state}")
        if asyncio.get_running_loop() is not self._loop:
            raise InvalidRequest(
                "the service is used from another event loop than it was opened on"
            )
        return conn

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
        paused, persistent if it has a persistent definition.  A device named
        by something only one definition carries (a libvirt-assigned alias
        such as ``virtio-disk1`` exists in the live XML only) is found in the
        other by what identifies it there.

        Raises a :class:`~aiodetach.errors.DetachError` subclass naming the
        domain and alias on every failure; one raised after the persistent
        half was done says so (``err.persistent_done``).

        Every call, whatever ends it, gives the hooks a ``started`` and a
        ``finished`` record with its ``detach_id``.
        """
        call = _Progress(
            _shown(domain),
            alias if isinstance(alias, str) else None,
            detach_id=next_detach_id(),
            started=time.monotonic(),
        )
        self._record(call, "started")
        try:
            step = await self._detach_call(
                call, domain, alias, target, mac, xml, live=live, persistent=persistent
            )
            if step is not None:
                result = step
            else:
                # The live half is awaited here, in the caller's outermost frame:
                # the frames of the steps before it are gone while ten thousand wait.
                # (Nothing ran since the join: the unplug has not ended unseen.)
                unplug = call.unplug
                assert unplug is not None
                mine = unplug.follow()
                try:
                    result = call.result(await mine)
                except BaseException as exc:
                    raise self._live_error(call, exc)  # noqa: B904 - it sets its own cause
                finally:
                    unplug.unfollow(mine)
                    unplug.leave()  # whatever ended the wait: result, error, cancellation
        except BaseException as exc:
            self._record(call, "finished", error=exc, outcome=outcome_of(exc))
            raise
        self._record(call, "finished", result=result, outcome="removed")
        return result

    def _live_error(self, call: _Progress, exc: BaseException) -> BaseException:
        """What a caller whose unplug ended in ``exc`` raises (the rules of
        :meth:`_detach_call`, for the live wait that :meth:`detach` does)."""
        err: BaseException
        cause: BaseException | None
        if isinstance(exc, asyncio.CancelledError):
            current = asyncio.current_task()
            if not (self._closing and not (current is not None and current.cancelling())):
                return exc
            err, cause = self._closed_under(call), None
        elif self._closing and isinstance(
            exc, (ConnectionLost, HypervisorError, ServiceClosed, RuntimeError)
        ):
            err, cause = self._closed_under(call), exc  # what a close does is not an outcome
        elif isinstance(exc, DetachError):
            err, cause = call.complete(exc), exc.__cause__
        else:
            return exc
        err.__cause__ = cause  # as ``raise err from cause``
        err.__suppress_context__ = True
        return err

    def _record(self, call: _Progress, kind: DetachStep, **fields: Any) -> None:
        if self._hooks:
            now = time.monotonic()
            self._hooks.emit(
                DetachRecord(
                    kind=kind,
                    detach_id=call.detach_id,
                    uri=self.uri,
                    domain=call.domain,
                    alias=call.alias,
                    time=now,
                    elapsed=now - call.started,
                    **fields,
                )
            )

    async def _detach_call(
        self,
        progress: _Progress,
        domain: DomainRef,
        alias: str | None,
        target: str | None,
        mac: str | None,
        xml: str | None,
        *,
        live: bool | None,
        persistent: bool | None,
    ) -> DetachResult | None:
        ref = domain_ref(domain)
        try:
            selector = selector_from(alias=alias, target=target, mac=mac, xml=xml)
        except InvalidRequest as exc:
            exc.domain = ref
            raise
        check_flags(ref, live, persistent)
        try:
            conn = self._usable()
        except ServiceClosed as exc:
            exc.domain = ref
            exc.alias = selector.value if selector.kind == "alias" else None
            raise
        if self._read_only:
            raise ReadOnlyConnection(
                f"the connection to {self.uri} is read-only; detaching needs read-write",
                domain=ref,
                alias=selector.value if selector.kind == "alias" else None,
            )
        progress.domain = ref
        progress.alias = selector.value if selector.kind == "alias" else None
        try:
            return await self._detach(conn, progress, selector, live, persistent)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._closing and not (current is not None and current.cancelling()):
                raise self._closed_under(progress) from None
            raise
        except (ConnectionLost, HypervisorError, ServiceClosed, RuntimeError) as exc:
            # What a close does to the calls in flight (a cancelled driver, a
            # dropped connection, an executor shut down) is not an outcome.
            if self._closing:
                raise self._closed_under(progress) from exc
            if isinstance(exc, DetachError):
                raise progress.complete(exc) from exc.__cause__
            raise
        except DetachError as exc:
            raise progress.complete(exc) from exc.__cause__

    def _closed_under(self, progress: _Progress) -> ServiceClosed:
        return progress.complete(
            ServiceClosed("the service was closed while the detach was in flight")
        )

    async def _detach(
        self,
        conn: Connection,
        progress: _Progress,
        selector: Any,
        live: bool | None,
        persistent: bool | None,
    ) -> DetachResult | None:
        """Look up, read, plan, do the persistent half and join the unplug.

        One frame, awaiting plain futures (shared reads hand each caller its
        own): while ten thousand callers wait on one read, each holds this
        frame and its caller's, nothing more.  Returns the result, or None
        when the live half is under way (``progress`` then says what the
        caller follows, see :meth:`detach`).
        """
        assert self._persistent is not None
        assert self._unplugs is not None
        persistent_step = self._persistent
        unplugs = self._unplugs
        # Tickets: what another caller's unplug or config detach of this device
        # ends between our reads and our join is ours too (aiodetach._recent).
        ticket = persistent_step.ticket()
        unplug_ticket = unplugs.ticket()
        try:
            try:
                conn.revive()
                await conn.wait_up()
                try:
                    info = await conn.lookup(progress.domain)
                except BackendError as err:
                    raise map_error(
                        err, domain=progress.domain, alias=None, action="domain lookup"
                    ) from None
                progress.domain = info.name
                do_live, do_persistent = halves(info, live, persistent)
                # Only the devices' own XML is kept: a whole domain definition
                # per pending detach adds up when thousands wait.
                mark = unplugs.mark()
                try:
                    live_xml = await conn.definition(info.uuid, inactive=False) if do_live else None
                    pers_xml = (
                        await conn.definition(info.uuid, inactive=True) if do_persistent else None
                    )
                except BackendError as err:
                    raise map_error(
                        err, domain=info.name, alias=None, action="reading the XML"
                    ) from None
                plan = self._plan(
                    info, selector, live, persistent, live_xml, pers_xml, ticket, unplug_ticket
                )
                del live_xml, pers_xml
                shown = plan.found.alias or progress.alias
                progress.alias = (plan.live.alias if plan.live else None) or shown
                if plan.persistent is not None:
                    step = await persistent_step.detach(
                        info, plan.persistent, ticket, live_follows=plan.live is not None
                    )
                    progress.persistent_done = step != "persistent_missing_ignored"
                    self._record(progress, step)
            finally:
                persistent_step.release(ticket)
            if plan.live is None:
                return _result(info, plan.found.description, progress, None)
            self._join(progress, info, plan, do_persistent, mark, unplug_ticket)
            return None  # the caller follows the unplug (DetachService.detach)
        finally:
            unplugs.release(unplug_ticket)

    def _plan(
        self,
        info: DomainInfo,
        selector: Any,
        live: bool | None,
        persistent: bool | None,
        live_xml: Definition | None,
        pers_xml: Definition | None,
        ticket: int,
        unplug_ticket: int,
    ) -> Plan:
        """:func:`plan_devices`, with what ended since the caller began.  A
        function of its own: the closures' cells live in this short frame, not
        in :meth:`_detach`'s, which ten thousand callers hold while they wait."""
        assert self._persistent is not None
        assert self._unplugs is not None
        persistent_step, unplugs = self._persistent, self._unplugs
        return plan_devices(
            info,
            selector,
            live,
            persistent,
            live_xml,
            pers_xml,
            removed=lambda live_dev: persistent_step.removed_since(
                info.uuid, ticket, selector, live_dev
            ),
            unplugged=lambda pers_dev: unplugs.removed_since(
                info.uuid, unplug_ticket, selector, pers_dev
            ),
        )

    def _join(
        self,
        progress: _Progress,
        info: DomainInfo,
        plan: Plan,
        do_persistent: bool,
        mark: int,
        unplug_ticket: int,
    ) -> None:
        """Join the device's unplug (started if none is in flight): ``progress``
        says which, for :meth:`detach` to follow."""
        assert self._unplugs is not None
        live_dev = plan.live
        assert live_dev is not None
        if live_dev.alias is None:
            raise DetachRefused(
                "the device has no alias in the live XML, so libvirt cannot unplug it by "
                "alias (libvirt assigns one to every device of a running domain)",
                domain=info.name,
            )
        self._usable()
        unplug, joined = self._unplugs.join(
            info.uuid,
            info.name,
            live_dev.alias,
            ref=live_dev,
            since=unplug_ticket if plan.gone else mark,
            gone=plan.gone,
            run_id=info.run_id,
            # What the journal knows the device by; nothing else needs it.
            device=_fingerprint(live_dev) if self._journal is not None else None,
        )
        resumed = unplug.resumed
        progress.alias = unplug.key[1]  # the same name, the registry's (interned) string
        self._record(
            progress,
            "unplug_joined" if joined else "unplug_started",
            unplug_id=unplug.id,
            resumed=resumed,
        )
        # The persistent half is the device's, like its unplug: a caller who
        # joins after another caller removed the device from the persistent
        # definition (so did not find it there) shares that outcome.
        if progress.persistent_done:
            unplug.persistent_done = True
        elif do_persistent and plan.persistent is None and unplug.persistent_done:
            progress.persistent_done = True
        # No string of its own while it waits when the unplug's identity and
        # alias say the same (the usual case): one per pending detach.
        description: str | None = plan.found.description
        if description == _described(unplug):
            description = None
        progress.unplug, progress.info, progress.description = unplug, info, description
        progress.joined, progress.resumed = joined, resumed

    async def events(self, domain: DomainRef | None = None) -> AsyncIterator[DeviceEvent]:
        """Stream device-removed / removal-failed / domain-stopped events.

        ``domain`` (name or UUID) filters.  Ends when the service closes.
        """
        self._usable()
        assert self._intake is not None
        ref = domain_ref(domain) if domain is not None else None
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        watchers = self._intake.watchers
        watchers.add(queue)
        try:
            while True:
                event = await queue.get()
                if event is CLOSED:
                    return
                if ref is None or ref in (event.domain_name, event.domain_uuid):
                    yield event
        finally:
            watchers.discard(queue)

    def detach_iter(
        self,
        requests: Iterable[DetachRequest | Mapping[str, Any]],
        *,
        concurrency: int = 16,
        per_domain: int | None = 4,
    ) -> AsyncGenerator[DetachOutcome, None]:
        """Detach many devices; yield each :class:`DetachOutcome` as it completes.

        At most ``concurrency`` detaches run at once, and at most
        ``per_domain`` on one domain (libvirt serialises a domain's detaches
        in its job, so more only queues inside libvirtd); a domain named by
        name in one request and by UUID in another is one domain.  A request
        waiting for its domain's turn holds no global slot.  A failure is an
        outcome, never an exception: the rest go on.  The whole batch is
        checked before anything is sent (:class:`InvalidRequest` with the
        bad item's ``index``).  Close the iterator (``contextlib.aclosing``)
        to stop early: what still runs is cancelled and awaited.
        """
        batch = checked_batch(requests, concurrency, per_domain)
        self._usable()
        # The batch's own iterator: closing it cancels (and awaits) what runs.
        return iter_outcomes(
            batch,
            self._run_request,
            identify=self.batch_identities(per_domain is not None),
            concurrency=concurrency,
            per_domain=per_domain,
        )

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
        If it raises, the batch stops (what still runs is cancelled and
        awaited) and :class:`~aiodetach.errors.BatchAborted` is raised from
        that exception, carrying every outcome known and the indexes left
        unfinished.
        """
        batch = checked_batch(requests, concurrency, per_domain)
        self._usable()
        return await collect(
            batch,
            self._run_request,
            identify=self.batch_identities(per_domain is not None),
            concurrency=concurrency,
            per_domain=per_domain,
            on_progress=on_progress,
        )

    def batch_identities(self, look_up: bool) -> Callable[[DetachRequest], Awaitable[Hashable]]:
        """A per-batch ``request -> domain UUID`` lookup (also for :class:`DetachFleet`);
        without a per-domain bound nothing needs looking up."""
        return _Identities(self).of if look_up else _no_identity

    async def _run_request(self, request: DetachRequest) -> DetachResult:
        return await self.detach(request.domain, **request.detach_kwargs())

    def pending(self) -> list[tuple[str, str]]:
        """(domain UUID, alias) of every live unplug in flight.

        This includes an unplug whose callers all left while a request of
        ours was pending in the guest: it is remembered until that request's
        window ends or its event arrives, so asking again joins it.
        """
        return list(self._unplugs.by_key) if self._unplugs is not None else []

    # ---------------------------------------------------------- lookups
    async def _uuid_of(self, ref: str, alias: str | None) -> str:
        """The UUID of ``ref`` for a batch's per-domain bound (errors named as
        :meth:`detach` names them)."""
        progress = _Progress(ref, alias)
        try:
            conn = self._usable()
            conn.revive()
            await conn.wait_up()
            return (await self._lookup(conn, ref)).uuid
        except (ConnectionLost, HypervisorError, ServiceClosed, RuntimeError) as exc:
            if self._closing:
                raise self._closed_under(progress) from exc
            if isinstance(exc, DetachError):
                raise progress.complete(exc) from exc.__cause__
            raise
        except DetachError as exc:
            raise progress.complete(exc) from exc.__cause__

    async def _lookup(self, conn: Connection, ref: str) -> DomainInfo:
        try:
            return await conn.lookup(ref)
        except BackendError as err:
            raise map_error(err, domain=ref, alias=None, action="domain lookup") from None


_E = TypeVar("_E", bound=DetachError)


def _fingerprint(device: DeviceRef) -> str:
    """What the journal records to know the device again after a restart: its
    description, and its identity where it has one (a hostdev's source
    address, an interface's MAC…), so that another device attached under the
    same alias meanwhile is not taken for it.  Identifiers only, never XML."""
    if device.identity is None:
        return device.description
    return f"{device.description} {device.identity_alone!r}"


def _result(
    info: DomainInfo, description: str, call: _Progress, done: LiveDone | None
) -> DetachResult:
    return DetachResult(
        domain_uuid=info.uuid,
        domain_name=info.name,
        alias=call.alias,
        device=description,
        live=done is not None,
        persistent=call.persistent_done,
        attempts=done.sent if done else 0,
        elapsed=time.monotonic() - call.started,
        confirmed_by=done.confirmed_by if done else None,
        joined=call.joined,
        resumed=call.resumed,
    )


def _described(unplug: Unplug) -> str | None:
    """The device as its unplug's identity and alias describe it (None: no identity)."""
    tag = unplug.tag
    if tag is None:
        return None
    return describe(tag, unplug.key[1], unplug.identity)


def _shown(domain: object) -> str:
    """The domain as records name it before it is looked up (even an invalid one)."""
    try:
        return domain_ref(domain)
    except InvalidRequest:
        return repr(domain)


async def _no_identity(_request: DetachRequest) -> Hashable:
    return None


class _Identities:
    """Which domain each request of one batch is for: its UUID, looked up once
    per name the batch uses (the per-domain bound is per domain, not per
    spelling of it)."""

    def __init__(self, svc: DetachService) -> None:
        self._svc = svc
        self._known: dict[str, str] = {}
        self._failed: dict[str, DetachError] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def of(self, request: DetachRequest) -> Hashable:
        try:
            return await self._of(request)
        except DetachError as exc:
            emit_unrun(
                self._svc._hooks,
                uri=self._svc.uri,
                domain=request.domain,
                alias=request.alias,
                error=exc,
            )
            raise

    async def _of(self, request: DetachRequest) -> Hashable:
        ref = domain_ref(request.domain)
        known = self._known.get(ref)
        if known is not None:
            return known
        # One lookup per name; a caller cancelled while looking up hands the
        # lookup to the next one (no task is left behind).
        async with self._locks.setdefault(ref, asyncio.Lock()):
            known = self._known.get(ref)
            if known is None:
                failed = self._failed.get(ref)
                if failed is not None:  # one lookup per name, also when it fails
                    again = copy.copy(failed)
                    again.alias = request.alias
                    raise again
                try:
                    known = self._known[ref] = await self._svc._uuid_of(ref, request.alias)
                except (DomainNotFound, InvalidRequest) as exc:
                    self._failed[ref] = copy.copy(exc)
                    raise
        return known


@dataclass(slots=True)
class _Progress:
    """What one detach call has learnt and done so far, for its errors."""

    domain: str  # as the caller named it, then the domain's name
    alias: str | None  # as the caller named it, then the live alias
    detach_id: int = 0  # names the call in the hooks' records
    started: float = 0.0  # time.monotonic() when the call began
    persistent_done: bool = False
    # Once the live half is under way, what its result needs when the unplug
    # ends (here rather than in an object of its own: one per waiting caller).
    unplug: Unplug | None = None
    info: DomainInfo | None = None
    description: str | None = None  # None: as _described(unplug) says
    joined: bool = False
    resumed: bool = False

    def result(self, done: LiveDone) -> DetachResult:
        """The call's result once its unplug removed the device."""
        assert self.unplug is not None
        assert self.info is not None
        description = self.description
        if description is None:
            description = _described(self.unplug) or ""  # never None: see _plan_and_join
        return _result(self.info, description, self, done)

    def complete(self, err: _E) -> _E:
        """``err`` naming this call's domain, alias and persistent outcome.

        Always a copy: callers joined to one unplug (or one config detach)
        share the exception object, and each must own what it raises (its
        traceback, its notes, its cause, its persistent half).  Errors are
        rare; a copy each is cheap.
        """
        done = copy.copy(err)
        done.domain = err.domain or self.domain
        done.alias = err.alias or self.alias
        done.persistent_done = err.persistent_done or self.persistent_done
        return done.with_traceback(err.__traceback__)
