"""The calls a live unplug makes, and how their answers become its machine's inputs.

The middle layer of an unplug (`aiodetach._unplug.Unplug`): above the
pure machine (`aiodetach._machine`), below the driver that feeds it and
keeps its waits.  Each method here starts one call (the live request in a
worker thread, a shared read of the domain's state or live XML, a wait for
a reconnect) and hands its answer back as one input, classified once:
libvirt's refusals by `aiodetach._errors_map.request_outcome()`, a read's
failure as the typed error the callers will get.

The request is decided in its worker thread, just before libvirt is called
(`wants_request`): one whose callers
all left while it waited for a thread, or whose unplug an event decided
meanwhile, is not sent.  With a journal, it is noted (committed) in that
thread before libvirt hears of it, so a restart finds it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import replace
from typing import Any, Protocol

from ._connection import Connection
from ._deadlines import Deadlines
from ._errors_map import is_domain_gone, map_error, request_outcome
from ._journal import Journal, Noted, RequestNote
from ._machine import UnplugMachine
from ._machine_io import (
    Answered,
    Input,
    Outcome,
    ReadFailed,
    Reconnected,
    ReconnectFailed,
    StateRead,
    XmlRead,
)
from ._settings import DetachSettings
from ._xml import Definition, has_alias
from .backend import BackendError, DomainInfo, DomainState
from .errors import JournalError
from .instrumentation._dispatch import Hooks

__all__ = ["OUTSIDE", "Journalled", "Registry", "UnplugCalls", "retrieve"]

Key = tuple[str, str]

OUTSIDE: list[Any] = [False, -1]
"""No request of this unplug is out (never written: each request gets a
list of its own, ``[handed to libvirt, connection generation]``, see
`UnplugCalls._send()`)."""


_NOT_TAKEN = frozenset({Outcome.JOB_HELD, Outcome.NOT_SENT})
"""Refusals that say libvirt did not take a request (as does "guest is busy"
with nothing of ours accepted): what an unplug ended meanwhile tells the
journal (while it runs, its machine decides: see `_on_answer`)."""


class UnplugCalls(UnplugMachine):
    """An unplug's calls to libvirt (see the module's docstring)."""

    __slots__ = (
        "_inside",
        "_journalled",
        "_registry",
        "_request",
        "_task",
        "domain",
        "key",
        "persistent_done",
    )

    _registry: Registry
    key: Key
    domain: str
    _journalled: Journalled | None
    _request: asyncio.Future[bool] | None
    _inside: list[Any]
    _task: asyncio.Task[None] | None
    persistent_done: bool

    def _feed(self, event: Input) -> None:
        raise NotImplementedError  # the driver's (aiodetach._unplug)

    def cancelled(self) -> int:
        """Callers cancelled that have not left yet (aiodetach._following)."""
        raise NotImplementedError  # the driver's (aiodetach._unplug)

    # ------------------------------------------------------------ requests
    def _send(self) -> None:
        registry = self._registry
        conn = registry.conn
        backend = conn.backend
        uuid, alias = self.key
        journal = registry.journal
        journalled = self._journalled
        inside = self._inside = [False, conn.generation]

        def request() -> bool:
            # In the worker thread.  A request whose callers all left (or were
            # cancelled) while it waited for this thread is not sent (nobody
            # wants it), nor one whose unplug an event decided meanwhile.
            if not self.wants_request or self.callers <= self.cancelled():
                return False
            if journal is not None and journalled is not None:
                untaking = journalled.untaking
                if untaking is not None:  # the previous request's refusal goes first
                    wait_for([untaking])
                # Durable before libvirt hears of it: a restart finds it.
                note, noted_at = self._note(), time.time()
                journalled.row = journal.note_request(journalled.row, note, noted_at)
                journalled.noted = Noted(note.sent, noted_at, None)
            # From here on an event for this alias can be our request's own.
            inside[0] = True
            try:
                backend.detach_live(uuid, alias)
            finally:
                # The guest's window starts when libvirt answers.
                if journal is not None and journalled is not None and journalled.row is not None:
                    answered = journal.answered_soon(journalled.row)
                    if journalled.noted is not None:
                        journalled.noted = replace(journalled.noted, answered_at=answered)
            if journal is not None:
                journal.request_sent()
            return True

        try:
            future = self._request = conn.submit(request)
        except Exception as exc:  # the service is closing
            self._inside = OUTSIDE
            self._feed(Answered(Outcome.REFUSED, exc))
            return
        future.add_done_callback(self._on_answer)

    def _on_answer(self, future: asyncio.Future[bool]) -> None:
        """libvirt answered a request (loop thread).

        A callback rather than a step of a task so that a request is counted
        even when the unplug ended meanwhile (a service closing while the
        request is inside libvirt): a request counts once it was handed to
        libvirt, accepted or refused.
        """
        retrieve(future)
        if future.cancelled():
            return
        inside = self._inside
        if self._request is future:
            # Answered: not inside libvirt any more, and nothing to hold while waiting.
            self._request, self._inside = None, OUTSIDE
        error = future.exception()
        if self.over:
            # Ended meanwhile (the service closed): the machine hears no more,
            # but a request refused untaken must not be taken up after a restart.
            if isinstance(error, BackendError):
                outcome = request_outcome(error, closing=False)
                refused = outcome in _NOT_TAKEN or (outcome is Outcome.BUSY and not self.accepted)
                self.journal_answer(taken=not refused)
            return
        conn = self._registry.conn
        reconnected = not conn.is_up or conn.generation != inside[1]
        if error is None:
            sent = Outcome.SENT if future.result() else Outcome.SKIPPED
            self._feed(Answered(sent, reconnected=reconnected))
        elif isinstance(error, JournalError):
            error.domain, error.alias = self.domain, self.key[1]
            self._feed(Answered(Outcome.JOURNAL_FAILED, error))
        elif isinstance(error, BackendError):
            outcome = request_outcome(error, closing=conn.state != "open")
            described = map_error(
                error, domain=self.domain, alias=self.key[1], action="live detach"
            )
            self._feed(Answered(outcome, described, error.message, reconnected))
        else:
            self._feed(Answered(Outcome.REFUSED, error))

    def journal_answer(self, *, taken: bool) -> None:
        """The machine has classified the answer to the request just noted
        (taken, or refused without being taken: see
        `aiodetach._machine.UnplugMachine.not_taken`); the journal's row
        follows, before any further request is noted."""
        journalled, journal = self._journalled, self._registry.journal
        if journalled is None or journal is None:
            return
        noted, journalled.noted = journalled.noted, None
        if noted is None or journalled.row is None:
            return  # nothing was noted (skipped, or the note failed)
        if taken:
            journalled.before, journalled.taken = journalled.taken, noted
            return
        journalled.untaking = journal.not_taken_soon(journalled.row, journalled.taken)
        if journalled.taken is None:
            journalled.row = None  # deleted: the next request gets a new row

    def journal_voided(self) -> None:
        """A reset voided the latest request libvirt took: it uses no attempt
        (see `UnplugMachine._voided`), so a refusal of the next one takes the
        row back to the request before it, not to the voided one."""
        journalled = self._journalled
        if journalled is None or journalled.taken is None:
            return
        before = journalled.before
        counted = before is not None and before.sent < journalled.taken.sent
        journalled.taken, journalled.before = (before if counted else None), None

    def _note(self) -> RequestNote:
        settings = self._registry.settings
        journalled = self._journalled
        assert journalled is not None  # noted only with a journal
        return RequestNote(
            uri=self._registry.conn.uri,
            domain_uuid=self.key[0],
            domain_name=self.domain,
            run_id=journalled.run_id,
            alias=self.key[1],
            device=journalled.device,
            sent=self.sent,
            used=self.used,
            timeout=settings.timeout,
            attempts=settings.attempts,
            persistent_done=self.persistent_done,
            started_at=journalled.started_wall,
        )

    # ---------------------------------------------------------------- reads
    def _read_state(self) -> None:
        self._registry.conn.lookup(self.key[0], by="unplugs").add_done_callback(self._on_state)

    def _on_state(self, future: asyncio.Future[DomainInfo]) -> None:
        retrieve(future)
        if self.over or future.cancelled():
            return
        error = future.exception()
        if error is None:
            info = future.result()
            state = info.state
            if not state.is_active:
                self._feed(StateRead("inactive", info.stop_reason or ""))
            else:
                self._feed(StateRead("paused" if state is DomainState.PAUSED else "running"))
        elif isinstance(error, BackendError) and is_domain_gone(error):
            self._feed(StateRead("missing"))
        elif isinstance(error, BackendError):
            described = map_error(
                error, domain=self.domain, alias=self.key[1], action="domain lookup"
            )
            self._feed(ReadFailed(described))
        else:
            self._feed(ReadFailed(error))

    def _read_xml(self) -> None:
        conn = self._registry.conn
        conn.definition(self.key[0], inactive=False, by="unplugs").add_done_callback(self._on_xml)

    def _on_xml(self, future: asyncio.Future[Definition]) -> None:
        retrieve(future)
        if self.over or future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._feed(XmlRead(has_alias(future.result(), self.key[1])))
        elif isinstance(error, BackendError):
            described = map_error(
                error, domain=self.domain, alias=self.key[1], action="reading the XML"
            )
            self._feed(ReadFailed(described))
        else:
            self._feed(ReadFailed(error))

    def _wait_reconnect(self) -> None:
        task = self._task = self._registry.loop.create_task(self._registry.conn.wait_up())
        task.add_done_callback(self._reconnected)

    def _reconnected(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        retrieve(task)
        if task.cancelled() or self.over:
            return
        error = task.exception()
        self._feed(Reconnected() if error is None else ReconnectFailed(error))


class Journalled:
    """What only the journal needs of an unplug: with no journal, none of it
    is held (a few dozen bytes for each of thousands of pending unplugs)."""

    __slots__ = (
        "before",
        "device",
        "noted",
        "resumed",
        "row",
        "run_id",
        "started_wall",
        "taken",
        "untaking",
    )

    def __init__(self, run_id: str | None, device: str | None, started_wall: float) -> None:
        self.run_id = run_id  # the domain's run (was it re-started since?)
        self.device = device  # what identifies the device besides its alias
        self.started_wall = started_wall
        self.row: int | None = None  # its row in the journal, once a request was noted
        self.resumed = False  # taken up from the journal after a restart
        self.noted: Noted | None = None  # the request out, as its row records it
        self.taken: Noted | None = None  # the latest request libvirt took
        self.before: Noted | None = None  # the one it took before that (a reset voids one)
        self.untaking: Future[None] | None = None  # writing a refusal into the row


class Registry(Protocol):
    """What an unplug needs from the service (see `aiodetach._registry`)."""

    conn: Connection
    settings: DetachSettings
    hooks: Hooks
    journal: Journal | None
    deadlines: Deadlines
    loop: asyncio.AbstractEventLoop

    def forget(self, unplug: Any) -> None: ...

    def connection_lost(self, reason: str) -> None: ...

    def untold(self, unplug: Any, mine: asyncio.Future[Any], exc: BaseException) -> None: ...


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome retrieved: nobody may be left to await it."""
    if not future.cancelled():
        future.exception()
