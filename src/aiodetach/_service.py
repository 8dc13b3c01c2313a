"""The front of the library: [`DetachService`][aiodetach.DetachService], a facade.

It owns the service's parts and their life (open, the journal's take-up,
close) and hands each call to the module that does it:

- one detach call, lookup → reads → plan → persistent half → join → follow:
  `aiodetach._call` (the follow itself is awaited in `detach()`,
  the caller's outermost frame);
- the journal's take-up at ``open()``: `aiodetach._takeup`;
- batches: `aiodetach._many`; events: `aiodetach._intake`;
- the connection's threads and reconnects: `aiodetach._connection`;
  the live unplugs: `aiodetach._registry` and `aiodetach._unplug`.
"""

from __future__ import annotations

import asyncio
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
from typing import Any

import libvirt

from ._call import Calls, Progress, shown
from ._connect import check_how_to_connect
from ._connection import Connection
from ._errors_map import map_connect_error
from ._eventloop import install_event_loop
from ._intake import CLOSED, DeviceEvent, EventIntake
from ._journal import Journal, open_journal
from ._libvirt import LibvirtBackend
from ._many import (
    DetachOutcome,
    DetachRequest,
    batch_identities,
    checked_batch,
    collect,
    iter_outcomes,
)
from ._persistent import PersistentStep
from ._registry import Unplugs
from ._result import DetachResult, Recovered
from ._rules import DomainRef, domain_ref, names_domain
from ._settings import DetachSettings
from ._takeup import take_up
from .backend import Backend, BackendError
from .errors import InvalidRequest
from .instrumentation._dispatch import Hooks, next_detach_id
from .instrumentation._logging import log_hook
from .instrumentation._records import Hook, outcome_of

__all__ = ["DetachService", "DeviceEvent", "DomainRef"]


class DetachService:
    """Detach devices from libvirt domains, waiting for the guest.

    Use as an async context manager; one instance per libvirt URI

    ```python
    async with DetachService("qemu:///system") as svc:
        result = await svc.detach("vm-1", alias="ua-disk1")
    ```

    How it connects (docs: *Connecting*): ``uri`` (``None``, the default:
    libvirt's default URI, as ``LIBVIRT_DEFAULT_URI`` or the client
    configuration name it); or ``connect``, a callable returning a new
    ``libvirt.virConnect``, called in a worker thread for every connection
    the service opens and again on every reconnect (the service closes what
    it returns); or ``connection``, the caller's open ``virConnect``, used as
    the one connection and never closed nor re-opened by the service.

    ``backend`` replaces libvirt (see [`aiodetach.backend`][aiodetach.backend] and
    `aiodetach.testing.FakeHypervisor`).  ``read_only=True`` opens a
    read-only connection, good for `events()` only: detaching through it
    raises [`ReadOnlyConnection`][aiodetach.errors.ReadOnlyConnection].

    ``hooks`` are called with a record of every step of every detach (see
    `aiodetach.instrumentation`: Prometheus and OpenTelemetry hooks are
    there).  The library's logging is itself a hook, called first;
    ``log=False`` leaves it out (the CLI does, to print its own lines).

    ``journal=PATH`` keeps an SQLite journal of the live requests sent, so
    that a restart of this process neither re-sends into an unplug still in
    progress nor loses the outcome of one that finished meanwhile (see
    `open()`, `recovered()`).  Without it nothing is written.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        connect: Callable[[], libvirt.virConnect] | None = None,
        connection: libvirt.virConnect | None = None,
        settings: DetachSettings | None = None,
        backend: Backend | None = None,
        read_only: bool = False,
        hooks: Iterable[Hook] = (),
        log: bool = True,
        journal: str | os.PathLike[str] | None = None,
    ) -> None:
        check_how_to_connect(uri, connect, connection, backend)
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
                connect=connect,
                connection=connection,
                keepalive=(self._settings.keepalive_interval, self._settings.keepalive_count),
                lanes=self._settings.connections,
            )
        )
        self._close_task: asyncio.Task[None] | None = None
        self._intake: EventIntake | None = None
        # What the calls need (the connection, the registry, the config step
        # once open; whether it closes): built with the service, bound at open.
        self._calls = Calls(self._backend.uri, self._hooks, read_only=read_only)

    # ------------------------------------------------------------------ life
    @property
    def settings(self) -> DetachSettings:
        return self._settings

    @property
    def uri(self) -> str:
        """The URI given; without one, the URI libvirt reports for the
        connection once open (what records, errors and the journal carry)."""
        return self._backend.uri

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-opened after being lost."""
        return self._conn.reconnects if self._conn is not None else 0

    @property
    def _conn(self) -> Connection | None:
        return self._calls.conn

    @property
    def _unplugs(self) -> Unplugs | None:
        return self._calls.unplugs

    async def __aenter__(self) -> DetachService:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect.  Raises `ConnectionLost` if libvirtd cannot be reached.

        A cancelled ``open()`` closes what it started, including a connection
        that completes in its worker thread after the cancellation.

        With a journal, it is locked and checked first, before libvirt is
        contacted ([`JournalError`][aiodetach.errors.JournalError] subclasses); then
        every unplug it holds unfinished for this URI is reconciled with the
        live XML: gone → reported detached (``confirmed_by="xml"``); still
        attached → taken up (``pending()``), with no request sent before its
        last request's window is over, and a ``detach()`` of it joins it
        (``result.resumed``); domain gone, shut off or re-started since → the
        request died with it.  `recovered()` lists what was found.
        """
        calls = self._calls
        if calls.loop is not None:
            raise InvalidRequest("service was opened already; create a new one")
        calls.loop = loop = asyncio.get_running_loop()
        if self._journal is None and self._journal_path is not None:
            self._journal = await open_journal(
                self._journal_path,
                synchronous=self._settings.journal_sync,
                retention=self._settings.journal_retention,
            )
        if self._backend.uses_libvirt_events:
            await install_event_loop().ready()
        conn = Connection(
            self._backend, self._settings, read_only=calls.read_only, hooks=self._hooks
        )
        unplugs = Unplugs(conn, self._settings, self._hooks, self._journal)
        calls.bind(
            conn, unplugs, PersistentStep(conn, unplugs), journalled=self._journal is not None
        )
        self._intake = EventIntake(unplugs)
        self._intake.bind(loop)
        try:
            await conn.open(self._intake)
            calls.uri = self.uri  # the connected URI, when none was given
            conn.record("connected")  # inside: whatever a hook raises, nothing stays open
        except BaseException as exc:
            # Nothing was ever usable: do not make the caller wait for a
            # connect stuck in its thread (connect_timeout, a cancelled open);
            # the connection it may still make is closed when it returns.
            conn.close_grace = 0.0
            await self.aclose()
            if isinstance(exc, BackendError):
                raise map_connect_error(exc, uri=self.uri) from None
            raise
        if self._journal is not None and not calls.read_only:
            try:
                await take_up(self.uri, conn, unplugs, self._journal, self._recovered)
            except BaseException:
                await self.aclose()
                raise

    def _share_journal(self, journal: Journal) -> None:
        """Use a journal opened (and closed) by someone else: a fleet's services
        share its one journal, rows keyed by URI."""
        self._journal = journal
        self._owns_journal = False

    def recovered(self) -> list[Recovered]:
        """What ``open()`` found unfinished in the journal, and how it stood.

        ``"pending"`` ones are in `pending()` (until they end); ask for
        the device again to await it (the call joins it).  Empty without a
        journal.
        """
        return list(self._recovered)

    async def aclose(self) -> None:
        """Cancel what is in flight, close the connection, stop the threads.

        Idempotent.  Shielded from cancellation: a cancelled ``aclose()`` still
        finishes closing before the cancellation is re-raised.  Every caller
        still waiting gets [`ServiceClosed`][aiodetach.errors.ServiceClosed].
        """
        if self._close_task is None:
            self._calls.closing = True  # from here on, what fails in flight is the close's
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
        calls = self._calls
        conn = calls.conn
        if conn is None:
            return
        assert calls.unplugs is not None
        assert self._intake is not None
        assert calls.persistent is not None
        await calls.unplugs.close()
        await calls.persistent.close()
        for queue in self._intake.watchers:
            queue.put_nowait(CLOSED)
        await conn.close()
        if self._backend.uses_libvirt_events:
            await install_event_loop().settle()
        conn.record("closed")

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

        ``domain``: a name, a UUID, a running domain's ID (a number, read as
        virsh reads it) or a `libvirt.virDomain`.  The device: exactly one of
        ``alias`` (any device), ``target`` (a disk's target dev, e.g.
        ``"vdb"``), ``mac`` (an interface) or ``xml`` (device XML as libvirt
        would match it).  ``live`` and
        ``persistent`` default to "as the domain is": live if it is running or
        paused, persistent if it has a persistent definition.  A device named
        by something only one definition carries (a libvirt-assigned alias
        such as ``virtio-disk1`` exists in the live XML only) is found in the
        other by what identifies it there.

        Raises a [`DetachError`][aiodetach.errors.DetachError] subclass naming the
        domain and alias on every failure; one raised after the persistent
        half was done says so (``err.persistent_done``).

        Every call, whatever ends it, gives the hooks a ``started`` and a
        ``finished`` record with its ``detach_id``.
        """
        calls = self._calls
        call = Progress(
            shown(domain),
            alias if isinstance(alias, str) else None,
            detach_id=next_detach_id(),
            started=time.monotonic(),
        )
        calls.record(call, "started")
        try:
            step = await calls.up_to_join(
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
                    unplug.unfollow(mine, exc)  # its error, or its cancellation
                    raise calls.error(call, exc)  # noqa: B904 - it sets its own cause
                unplug.unfollow(mine)
        except BaseException as exc:
            calls.record(call, "finished", error=exc, outcome=outcome_of(exc))
            raise
        calls.record(call, "finished", result=result, outcome="removed")
        return result

    async def events(self, domain: DomainRef | None = None) -> AsyncIterator[DeviceEvent]:
        """Stream device-removed / removal-failed / domain-stopped events.

        ``domain`` filters, by name, UUID (in any spelling libvirt takes) or
        virDomain; not by ID, which names one run of a domain (look it up
        first).  Ends when the service closes.
        """
        self._calls.usable()
        assert self._intake is not None
        named = names_domain(domain_ref(domain)) if domain is not None else None
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        watchers = self._intake.watchers
        watchers.add(queue)
        try:
            while True:
                event = await queue.get()
                if event is CLOSED:
                    return
                if named is None or named(event.domain_uuid, event.domain_name):
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
        """Detach many devices; yield each `DetachOutcome` as it completes.

        At most ``concurrency`` detaches run at once, and at most
        ``per_domain`` on one domain (libvirt serialises a domain's detaches
        in its job, so more only queues inside libvirtd); a domain named by
        name in one request and by UUID in another is one domain.  A request
        waiting for its domain's turn holds no global slot.  A failure is an
        outcome, never an exception: the rest go on.  The whole batch is
        checked before anything is sent (`InvalidRequest` with the
        bad item's ``index``).  Close the iterator (``contextlib.aclosing``)
        to stop early: what still runs is cancelled and awaited.
        """
        batch = checked_batch(requests, concurrency, per_domain)
        self._calls.usable()
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
        """Like `detach_iter()`, collected in request order.

        ``on_progress(outcome, done, total)`` is called as each one completes.
        If it raises, the batch stops (what still runs is cancelled and
        awaited) and [`BatchAborted`][aiodetach.errors.BatchAborted] is raised from
        that exception, carrying every outcome known and the indexes left
        unfinished.
        """
        batch = checked_batch(requests, concurrency, per_domain)
        self._calls.usable()
        return await collect(
            batch,
            self._run_request,
            identify=self.batch_identities(per_domain is not None),
            concurrency=concurrency,
            per_domain=per_domain,
            on_progress=on_progress,
        )

    def batch_identities(self, look_up: bool) -> Callable[[DetachRequest], Awaitable[Hashable]]:
        """A per-batch ``request -> domain UUID`` lookup (also for `DetachFleet`);
        without a per-domain bound nothing needs looking up."""
        return batch_identities(self._calls.uuid_of if look_up else None, self._hooks, self.uri)

    async def _run_request(self, request: DetachRequest) -> DetachResult:
        return await self.detach(request.domain, **request.detach_kwargs())

    def pending(self) -> list[tuple[str, str]]:
        """(domain UUID, alias) of every live unplug in flight.

        This includes an unplug whose callers all left while a request of
        ours was pending in the guest: it is remembered until that request's
        window ends or its event arrives, so asking again joins it.
        """
        unplugs = self._calls.unplugs
        return list(unplugs.by_key) if unplugs is not None else []
