"""Many hypervisors from one process: one [`DetachService`][aiodetach.DetachService] per URI.

Each libvirt URI (``qemu:///system``, ``qemu+ssh://host/system``,
``qemu+tcp://…``) gets its own service, hence its own connection, event
subscriptions, reconnect logic and worker threads; they share the one
libvirt event loop integration of the process.  A host that cannot be
reached fails only the requests routed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any

from ._closing import by_close
from ._journal import Journal, open_journal
from ._log import get_log
from ._many import (
    DetachOutcome,
    DetachRequest,
    checked_batch,
    collect,
    iter_outcomes,
)
from ._result import DetachResult
from ._rules import DomainRef
from ._service import DetachService
from ._settings import DetachSettings
from .backend import Backend
from .errors import DetachError, InvalidRequest, JournalError, ServiceClosed
from .instrumentation._dispatch import Hooks, emit_unrun
from .instrumentation._logging import log_hook
from .instrumentation._records import Hook

__all__ = ["DetachFleet"]

_log = get_log()


class DetachFleet:
    """Route detaches to per-URI services, opened on first use.

    ```python
    async with DetachFleet() as fleet:
        await fleet.detach("qemu+ssh://host-a/system", "vm-1", alias="ua-disk1")
        outcomes = await fleet.detach_many([
            {"uri": "qemu+ssh://host-a/system", "domain": "vm-1", "target": "vdb"},
            {"uri": "qemu+ssh://host-b/system", "domain": "vm-7", "mac": "52:54:…"},
        ])
    ```

    ``backend_factory(uri)`` replaces libvirt (tests use fake hypervisors).
    ``hooks`` and ``log`` are given to every service (see
    [`DetachService`][aiodetach.DetachService]); records carry their ``uri``.

    ``journal=PATH``: one journal for every host (rows keyed by URI), locked
    by the fleet.  Entering the fleet opens it (its errors are raised there)
    and opens the service of every URI it holds unfinished unplugs for, so
    they are taken up as `DetachService.open()` describes (a host that
    cannot be reached keeps its rows for a later run; that is logged).
    """

    def __init__(
        self,
        *,
        settings: DetachSettings | None = None,
        backend_factory: Callable[[str], Backend] | None = None,
        default_uri: str = "qemu:///system",
        hooks: Iterable[Hook] = (),
        log: bool = True,
        journal: str | os.PathLike[str] | None = None,
    ) -> None:
        if journal is not None and not isinstance(journal, (str, os.PathLike)):
            raise InvalidRequest(f"journal must be a path, not {journal!r}")
        self._journal_path = journal
        self._journal: Journal | None = None
        self._journal_task: asyncio.Task[Journal] | None = None
        self._settings = settings
        self._hooks = tuple(hooks)
        self._log = log
        # For calls that fail before any service could take them (a host that
        # cannot be reached): they are calls all the same, for the hooks.
        self._unrun = Hooks([log_hook, *self._hooks] if log else self._hooks)
        self._factory = backend_factory
        self._default_uri = default_uri
        self._services: dict[str, DetachService] = {}
        self._opening: dict[str, asyncio.Task[DetachService]] = {}
        self._taking_up: set[asyncio.Task[DetachService]] = set()
        self._closed = False

    async def __aenter__(self) -> DetachFleet:
        if self._journal_path is None:
            return self
        try:
            journal = await self._journal_ready()
            uris = await journal.call(journal.unfinished_uris)
        except BaseException:
            await self.aclose()
            raise
        # Each host with unfinished unplugs is connected to now, in the
        # background and independently: a host that hangs in its connect must
        # not keep the others' taken-up unplugs from their callers (a caller
        # asking meanwhile joins the connect under way).
        for uri in uris:
            self._take_up_soon(uri)
        return self

    def _take_up_soon(self, uri: str) -> None:
        task = asyncio.get_running_loop().create_task(self.service(uri))

        def report(done: asyncio.Task[DetachService]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            if isinstance(error, DetachError):
                _log.warning("aiodetach.journal_host_unreachable", uri=uri, error=str(error))
            elif error is not None:
                _log.error("aiodetach.journal_take_up_failed", uri=uri, error=repr(error))

        task.add_done_callback(report)
        self._taking_up.add(task)
        task.add_done_callback(self._taking_up.discard)

    async def _journal_ready(self) -> Journal:
        """The fleet's journal, opened once (concurrent first uses share it)."""
        if self._journal is not None:
            return self._journal
        assert self._journal_path is not None
        if self._journal_task is None:
            settings = self._settings or DetachSettings()
            self._journal_task = asyncio.get_running_loop().create_task(
                open_journal(
                    self._journal_path,
                    synchronous=settings.journal_sync,
                    retention=settings.journal_retention,
                )
            )
        try:
            self._journal = await asyncio.shield(self._journal_task)
        except JournalError:
            self._journal_task = None  # the next use tries again
            raise
        return self._journal

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def uris(self) -> list[str]:
        """URIs with an open service."""
        return list(self._services)

    async def service(self, uri: str) -> DetachService:
        """The open service for ``uri`` (connecting on first use; concurrent
        first uses share one connection attempt)."""
        if self._closed:
            raise ServiceClosed("the fleet is closed")
        if not isinstance(uri, str) or not uri.strip():
            raise InvalidRequest(f"uri must be a non-empty string, not {uri!r}")
        svc = self._services.get(uri)
        if svc is not None:
            return svc
        task = self._opening.get(uri)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(uri))
            self._opening[uri] = task
            task.add_done_callback(lambda _t: self._opening.pop(uri, None))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if by_close(exc, closing=self._closed):
                # The fleet's close cancelled the connect, not this caller.
                raise ServiceClosed(f"the fleet was closed while connecting to {uri}") from None
            raise

    async def _open(self, uri: str) -> DetachService:
        backend = self._factory(uri) if self._factory is not None else None
        svc = DetachService(
            uri, settings=self._settings, backend=backend, hooks=self._hooks, log=self._log
        )
        if self._journal_path is not None:
            svc._share_journal(await self._journal_ready())
        await svc.open()
        if self._closed:
            await svc.aclose()
            raise ServiceClosed("the fleet was closed while connecting")
        self._services[uri] = svc
        return svc

    async def detach(self, uri: str, domain: DomainRef, **kwargs: Any) -> DetachResult:
        """[`DetachService.detach()`][aiodetach.DetachService.detach] on the host at ``uri``."""
        try:
            svc = await self.service(uri)
        except DetachError as exc:
            named = _named(exc, domain, kwargs.get("alias"))
            emit_unrun(
                self._unrun, uri=uri, domain=named.domain or "", alias=named.alias, error=named
            )
            raise named from exc.__cause__
        return await svc.detach(domain, **kwargs)

    def detach_iter(
        self,
        requests: Iterable[DetachRequest | Mapping[str, Any]],
        *,
        concurrency: int = 32,
        per_domain: int | None = 4,
    ) -> AsyncGenerator[DetachOutcome, None]:
        """Detach across hosts (``request.uri``, else the default URI); yield
        outcomes as they complete.

        A host is connected to before any of its requests takes a global
        slot, with one connection attempt shared by all of them: an
        unreachable host yields [`ConnectionLost`][aiodetach.errors.ConnectionLost]
        outcomes for its own requests, quickly, and holds up no other host.
        """
        batch = checked_batch(requests, concurrency, per_domain)
        if self._closed:
            raise ServiceClosed("the fleet is closed")
        # The batch's own iterator: closing it cancels (and awaits) what runs.
        return iter_outcomes(
            batch,
            self._run_request,
            identify=self._identities(per_domain is not None),
            concurrency=concurrency,
            per_domain=per_domain,
        )

    async def detach_many(
        self,
        requests: Iterable[DetachRequest | Mapping[str, Any]],
        *,
        concurrency: int = 32,
        per_domain: int | None = 4,
        on_progress: Callable[[DetachOutcome, int, int], None] | None = None,
    ) -> list[DetachOutcome]:
        """`detach_iter()`, collected in request order (``on_progress`` as
        in [`DetachService.detach_many()`][aiodetach.DetachService.detach_many], including
        [`BatchAborted`][aiodetach.errors.BatchAborted] if it raises)."""
        batch = checked_batch(requests, concurrency, per_domain)
        if self._closed:
            raise ServiceClosed("the fleet is closed")
        return await collect(
            batch,
            self._run_request,
            identify=self._identities(per_domain is not None),
            concurrency=concurrency,
            per_domain=per_domain,
            on_progress=on_progress,
        )

    def _uri_of(self, request: DetachRequest) -> str:
        return request.uri or self._default_uri

    async def _run_request(self, request: DetachRequest) -> DetachResult:
        svc = await self.service(self._uri_of(request))
        return await svc.detach(request.domain, **request.detach_kwargs())

    def _identities(self, look_up: bool) -> Callable[[DetachRequest], Awaitable[Hashable]]:
        """Connect to the request's host (shared attempt), then look its domain
        up once per name: the key of the per-domain bound is (URI, UUID)."""
        per_uri: dict[str, Callable[[DetachRequest], Awaitable[Hashable]]] = {}

        async def identify(request: DetachRequest) -> Hashable:
            uri = self._uri_of(request)
            try:
                svc = await self.service(uri)
            except DetachError as exc:
                named = _named(exc, request.domain, request.alias)
                emit_unrun(
                    self._unrun, uri=uri, domain=request.domain, alias=request.alias, error=named
                )
                raise named from exc.__cause__
            of = per_uri.get(uri)
            if of is None:
                of = per_uri[uri] = svc.batch_identities(look_up)
            return (uri, await of(request))

        return identify

    async def aclose(self) -> None:
        """Close every service (idempotent; each close is itself shielded)."""
        self._closed = True
        for task in list(self._taking_up):
            task.cancel()
        opening = [*self._opening.values(), *self._taking_up]
        for task in opening:
            task.cancel()
        services = list(self._services.values())
        self._services.clear()
        # Wait for the connects too: when aclose() returns, every caller has
        # its ServiceClosed (a cancelled open does not wait for a stuck thread).
        results = await asyncio.gather(
            *opening, *(s.aclose() for s in services), return_exceptions=True
        )
        del results[: len(opening)]  # their errors are their callers'
        journal_opening, self._journal_task = self._journal_task, None
        if journal_opening is not None:
            # Not cancelled: open_journal releases a journal opened after a
            # cancellation only from its thread; waiting for it is as short.
            with contextlib.suppress(BaseException):
                await asyncio.shield(journal_opening)
            if (
                journal_opening.done()
                and not journal_opening.cancelled()
                and journal_opening.exception() is None
            ):
                await journal_opening.result().aclose()
        self._journal = None
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result


def _named(exc: DetachError, domain: object, alias: object) -> DetachError:
    """A host's error (shared by all its callers) as this caller's: naming its
    domain and alias."""
    if exc.domain is not None:
        return exc
    named = copy.copy(exc)
    named.domain = domain if isinstance(domain, str) else str(domain)
    named.alias = exc.alias or (alias if isinstance(alias, str) else None)
    return named
