"""The live unplug's driver: performs what :mod:`aiodetach._machine` decides.

The rules of the live half are all in the pure machine; this module only
feeds it inputs (libvirt's events, the answers of the worker-thread calls,
timers, callers joining and leaving, the connection going and coming back)
and performs the actions it asks for (send the request in a worker thread,
read the domain's state or live XML through the shared reads, wait, wait
for a reconnect, record, end).  :class:`Unplug` *is* its machine (it
subclasses :class:`~aiodetach._machine.UnplugMachine`): thousands of unplugs
may wait at once, and each would otherwise hold a second object.

What the driver adds, and why:

- **No task while it waits.**  Every action is a call or a future with a
  done-callback that feeds the result back; an unplug in its window holds no
  task, no coroutine frame and no timer of its own: its window's end is an
  entry on one timer shared by every waiting unplug
  (:mod:`aiodetach._deadlines`).  Callers wait on a plain future each
  (:meth:`Unplug.follow`), so ten thousand pending unplugs hold no task and
  no ``shield`` of their own.
- **One input at a time.**  An action may cause another input to the same
  unplug at once (telling the connection it is lost wakes every unplug); it
  is queued and handled once the current one is done.
- **The wait armed is the machine's current one.**  Every wait carries the
  machine's token; when an input moves the machine on, the previous wait is
  disarmed before anything else is done.
- **A request inside libvirt is seen to its answer**, also after the unplug
  ended (a close under it): it was handed to libvirt, so it is recorded.
- **A request is journalled before it is sent** (with a journal): the row is
  committed in the request's worker thread just before libvirt is called,
  and the outcome when the unplug ends.  An unplug taken up from the
  journal after a restart (:meth:`Unplug.take_up`) waits out what is left of
  its last request's window, *maybe sent*.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ._closing import leaves_unplug_running
from ._connection import Connection
from ._deadlines import Deadlines
from ._errors_map import is_domain_gone, map_error, request_outcome
from ._journal import Journal, RequestNote
from ._machine import (
    Abort,
    Action,
    Answered,
    ConnectionDown,
    End,
    Ending,
    Event,
    Input,
    Joined,
    Left,
    LoseConnection,
    Outcome,
    Phase,
    ReadFailed,
    ReadState,
    ReadXml,
    Reconnected,
    ReconnectFailed,
    Report,
    Resumed,
    Send,
    StateRead,
    Stopped,
    Timer,
    UnplugMachine,
    Verdict,
    WaitReconnect,
    WaitUntil,
    XmlRead,
)
from ._settings import DetachSettings
from ._xml import Definition, DeviceRef, Identity, has_alias
from .backend import BackendError, DomainInfo, DomainState
from .errors import (
    DetachFailed,
    DetachTimeout,
    DomainStopped,
    JournalError,
)
from .instrumentation._dispatch import Hooks, next_unplug_id
from .instrumentation._records import UnplugOutcome, UnplugRecord, UnplugStep, outcome_of

if TYPE_CHECKING:
    from ._journal import Entry

__all__ = ["Abandoned", "LiveDone", "Phase", "Registry", "Unplug", "Verdict", "retrieve"]

Key = tuple[str, str]

_OUTSIDE: list[Any] = [False, -1]
"""No request of this unplug is out (never written: each request gets a
list of its own, ``[handed to libvirt, connection generation]``, see
:meth:`Unplug._send`)."""

_JOINED, _LEFT, _ABORT, _RESUMED, _DOWN = Joined(), Left(), Abort(), Resumed(), ConnectionDown()


@dataclass(frozen=True, slots=True)
class LiveDone:
    """How a live unplug ended well: requests sent, and how removal was learnt."""

    sent: int
    confirmed_by: Literal["event", "xml"]


class Abandoned(Exception):
    """Nobody waits for this unplug any more, and nobody came back for it."""


class Unplug(UnplugMachine):
    """One device's live unplug: its machine, and the driver that acts for it."""

    __slots__ = (
        "_feeding",
        "_followers",
        "_inside",
        "_journalled",
        "_parked",
        "_registry",
        "_request",
        "_task",
        "domain",
        "error",
        "id",
        "identity",
        "key",
        "persistent_done",
        "result",
        "started",
        "timer",
    )

    def __init__(
        self,
        registry: Registry,
        key: Key,
        domain: str,
        *,
        run_id: str | None = None,
        device: str | None = None,
        ref: DeviceRef | None = None,
    ) -> None:
        super().__init__(registry.settings)
        self._registry = registry
        self.key = key
        self.domain = domain  # the name, for errors and logs
        self._journalled = (
            _Journalled(run_id, device, time.time()) if registry.journal is not None else None
        )
        # What a caller who read the definition after the device was gone
        # matches it by (see aiodetach._recent); the device's XML is not kept.
        self.identity = _shared(ref.identity) if ref is not None else None
        self.result: LiveDone | None = None  # how it ended, if the device was removed
        self.error: BaseException | None = None  # how it ended, if it failed
        self.id = next_unplug_id()  # names it in the hooks' records
        self.started = time.monotonic()
        self._request: asyncio.Future[bool] | None = None  # the latest request's thread
        self._inside = _OUTSIDE  # that request's [handed to libvirt, generation]
        self._task: asyncio.Task[None] | None = None  # waiting for a reconnect
        self.timer: asyncio.TimerHandle | None = None
        self._parked = False  # in its window on the shared deadlines (or its own timer)
        self._feeding: list[Input] | None = None  # inputs queued while one is handled
        # see follow(): one caller's future alone (the usual case), or a list
        self._followers: asyncio.Future[LiveDone] | list[asyncio.Future[LiveDone]] | None = None
        self.persistent_done = False  # a caller removed the device from the persistent definition

    @property
    def tag(self) -> str | None:
        """The device's element name, as its identity begins (None without one)."""
        identity = self.identity
        return str(identity[0]) if identity else None

    @property
    def resumed(self) -> bool:
        """Taken up from the journal after a restart."""
        journalled = self._journalled
        return journalled is not None and journalled.resumed

    # ------------------------------------------------------------- inputs
    def decide(self, verdict: Verdict | tuple[str, str]) -> None:
        """An event about this device, or its domain stopped: ``("stopped", reason)``.

        Handled in a step of its own, so that an event's dispatch only
        schedules it (the event intake's hot path, which may run outside the
        loop's own steps), except while the request is in its worker thread:
        the thread asks the machine, just before libvirt is called, whether
        a verdict came meanwhile.
        """
        event: Input = (
            Stopped(verdict[1]) if isinstance(verdict, tuple) else Event(verdict, self._inside[0])
        )
        if self.phase is Phase.SENDING:
            self._feed(event)  # only kept (no action comes of it while a call is out)
        else:
            self._registry.loop.call_soon(self._feed, event)

    def wake(self) -> None:
        """libvirt's RESUMED for the domain (handled in a step of its own)."""
        self._registry.loop.call_soon(self._feed, _RESUMED)

    def connection_down(self) -> None:
        self._feed(_DOWN)

    def join(self) -> None:
        """A caller waits for this unplug (the first, or one asking again)."""
        self._feed(_JOINED)

    def leave(self) -> None:
        """A caller stopped waiting (its result, its error or its cancellation)."""
        self._feed(_LEFT)

    def abort(self) -> None:
        """End it as cancelled: the service closes."""
        self._feed(_ABORT)

    def start(self) -> None:
        """Send the first request, one loop step after the first caller joined
        (it follows the unplug first: see :meth:`follow`)."""
        self._registry.loop.call_soon(self._begin)

    def _begin(self) -> None:
        self._perform(self.begin(self._registry.loop.time()), self.token)

    def take_up(self, entry: Entry, timeout: float) -> None:
        """Continue an unplug found unfinished in the journal (see
        :meth:`UnplugMachine.take_up`)."""
        journalled = self._journalled
        assert journalled is not None  # taken up from a journal
        journalled.resumed = True
        journalled.row = entry.row
        self.persistent_done = entry.persistent_done
        journalled.started_wall = entry.started_at
        # A clock set back must not stretch the window beyond one timeout.
        now = time.time()
        left = min(max(entry.window_end(now) - now, 0.0), entry.timeout)
        loop_now = self._registry.loop.time()
        del timeout  # the machine's limits carry it
        self._perform(self.taken_up(entry.sent, entry.used, left, loop_now), self.token)

    def follow(self) -> asyncio.Future[LiveDone]:
        """A future of the caller's own that gets how the unplug ended.

        The caller's cancellation cancels only that future, never the unplug:
        what ``asyncio.shield`` of a shared future would do, for one plain
        future per caller.  Hand it back to :meth:`unfollow`.
        """
        mine: asyncio.Future[LiveDone] = self._registry.loop.create_future()
        if self.phase is Phase.DONE:
            # Over already: a caller sharing an unplug that removed the device
            # between its read and its join (see aiodetach._recent), or one
            # whose join ended it (an idle unplug with every attempt used).
            _settle(mine, self.error, self.result)
        elif self._followers is None:
            self._followers = mine  # no list for the one caller most unplugs have
        elif isinstance(self._followers, list):
            self._followers.append(mine)
        else:
            self._followers = [self._followers, mine]
        return mine

    def unfollow(self, mine: asyncio.Future[LiveDone]) -> None:
        followers = self._followers
        if followers is mine:
            self._followers = None
        elif isinstance(followers, list) and mine in followers:
            followers.remove(mine)

    # ------------------------------------------------------------- the loop
    def _feed(self, event: Input) -> None:
        """Hand one input to the machine and perform its actions; inputs that
        arrive meanwhile (from those actions) are handled after it."""
        queued = self._feeding
        if queued is not None:
            queued.append(event)
            return
        self._feeding = queued = []
        loop = self._registry.loop
        try:
            while True:
                before = self.token
                self._perform(self.handle(event, loop.time()), before)
                if not queued:
                    return
                event = queued.pop(0)
        finally:
            self._feeding = None

    def _perform(self, actions: list[Action], before: int) -> None:
        if self.token != before:
            self._disarm()  # the machine moved on: its previous wait is over
        for action in actions:
            kind = type(action)
            if kind is Report:
                assert isinstance(action, Report)
                if action.field is None:
                    self.record(action.kind)  # type: ignore[arg-type]
                else:
                    self.record(action.kind, **{action.field: action.value})  # type: ignore[arg-type]
            elif kind is WaitUntil:
                assert isinstance(action, WaitUntil)
                if action.token == self.token:
                    self._arm(action)
            elif kind is Send:
                self._send()
            elif kind is ReadState:
                self._read_state()
            elif kind is ReadXml:
                self._read_xml()
            elif kind is LoseConnection:
                assert isinstance(action, LoseConnection)
                self._registry.connection_lost(action.reason)
            elif kind is WaitReconnect:
                self._wait_reconnect()
            else:
                assert isinstance(action, End)
                self._finish(action)

    # ---------------------------------------------------------------- waits
    def _arm(self, wait: WaitUntil) -> None:
        self._disarm()
        loop = self._registry.loop
        if wait.window:
            # Parked on the shared deadlines: this is where ten thousand
            # pending unplugs spend their time, with no timer of their own.
            self._parked = True
            if not self._registry.deadlines.add(self):
                # Its window ends before the last one queued (one taken up
                # from the journal, say): a timer of its own.
                self.timer = loop.call_at(self.deadline, self._window_over)
        else:
            self.timer = loop.call_at(wait.when, self._fire)

    def _disarm(self) -> None:
        if self._parked:
            self._parked = False
            if self.timer is None:
                self._registry.deadlines.left()  # its queue entry is stale now
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def window_over(self, when: float) -> bool:
        """Its entry for the window ending at ``when`` came up in the shared
        deadlines (see :mod:`aiodetach._deadlines`): go on if it is still
        parked on that window.  False: the entry was stale."""
        if self.parked_on(when):
            self._parked = False  # its entry is used up (taken off the queue)
            self._feed(Timer(self.token))
            return True
        return False

    def parked_on(self, when: float) -> bool:
        return self._parked and self.timer is None and self.deadline == when

    def _window_over(self) -> None:
        self.timer = None
        self._parked = False
        self._feed(Timer(self.token))

    def _fire(self) -> None:
        self.timer = None
        self._feed(Timer(self.token))

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
            # In the worker thread.  A request whose callers all left while it
            # waited for this thread is not sent (nobody wants it), nor one
            # whose unplug an event decided meanwhile.
            if not self.wants_request:
                return False
            if journal is not None and journalled is not None:
                # Durable before libvirt hears of it: a restart finds it.
                journalled.row = journal.note_request(journalled.row, self._note())
            # From here on an event for this alias can be our request's own.
            inside[0] = True
            try:
                backend.detach_live(uuid, alias)
            finally:
                # The guest's window starts when libvirt answers.
                if journal is not None and journalled is not None and journalled.row is not None:
                    journal.answered_soon(journalled.row)
            if journal is not None:
                journal.request_sent()
            return True

        try:
            future = self._request = conn.submit(request)
        except Exception as exc:  # the service is closing
            self._inside = _OUTSIDE
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
            self._request, self._inside = None, _OUTSIDE
        if self.phase is Phase.DONE:
            return
        conn = self._registry.conn
        reconnected = not conn.is_up or conn.generation != inside[1]
        error = future.exception()
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
        if self.phase is Phase.DONE or future.cancelled():
            return
        error = future.exception()
        if error is None:
            state = future.result().state
            if not state.is_active:
                self._feed(StateRead("inactive"))
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
        if self.phase is Phase.DONE or future.cancelled():
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
        if task.cancelled() or self.phase is Phase.DONE:
            return
        error = task.exception()
        self._feed(Reconnected() if error is None else ReconnectFailed(error))

    # ------------------------------------------------------------------ end
    def _finish(self, end: End) -> None:
        """The unplug is over: leave the registry, journal and report it, then
        tell the callers (in that order, as one step)."""
        self._disarm()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        error, done = self._outcome(end)
        self.result, self.error = done, error
        self._registry.forget(self)
        self._note_end(error)
        self._ended(error)
        followers, self._followers = self._followers, None
        if followers is None:
            return
        if not isinstance(followers, list):
            _settle(followers, error, done)
            return
        for mine in followers:
            _settle(mine, error, done)

    def _outcome(self, end: End) -> tuple[BaseException | None, LiveDone | None]:
        how, alias = end.how, self.key[1]
        if how is Ending.REMOVED:
            assert end.confirmed_by is not None
            self.record("removed", confirmed_by=end.confirmed_by)
            return None, LiveDone(self.sent, end.confirmed_by)
        if how is Ending.FAILED:
            self.record("removal_failed")
            return DetachFailed(
                "the guest rejected the unplug (DEVICE_REMOVAL_FAILED); not retried",
                domain=self.domain,
                alias=alias,
            ), None
        if how is Ending.STOPPED:
            self.record("domain_stopped", reason=end.reason)
            what = "disappeared" if end.reason == "undefined" else f"stopped ({end.reason})"
            return DomainStopped(
                f"the domain {what} before the guest released the device",
                domain=self.domain,
                alias=alias,
                reason=end.reason,
            ), None
        if how is Ending.TIMEOUT:
            settings = self._registry.settings
            self.record("timed_out")
            busy = f", {self.busy_refusals} refused as busy" if self.busy_refusals else ""
            return DetachTimeout(
                f"the guest did not release the device after {self.sent} request(s) of "
                f"{settings.timeout:g} s each{busy}",
                domain=self.domain,
                alias=alias,
                attempts=self.sent,
                timeout=settings.timeout,
            ), None
        if how is Ending.ABANDONED:
            return Abandoned(), None
        if how is Ending.CANCELLED:
            return asyncio.CancelledError(), None
        error = end.error
        assert isinstance(error, BaseException)
        return error, None

    def _note_end(self, error: BaseException | None) -> None:
        """Write the outcome to the journal (queued, off the loop).

        What leaves the guest's unplug possibly still running is *not* an
        outcome (see :mod:`aiodetach._closing`): such a row
        stays unfinished and the next ``open()`` takes it up.
        """
        journal, journalled = self._registry.journal, self._journalled
        row = journalled.row if journalled is not None else None
        if journal is None or row is None:
            return
        if error is None:
            assert self.result is not None
            journal.finish_soon(row, "removed", self.result.confirmed_by)
        elif isinstance(error, Abandoned):
            journal.finish_soon(row, "abandoned")
        elif not leaves_unplug_running(error):
            found = outcome_of(error)
            journal.finish_soon(
                row, found if found in ("failed", "timeout", "stopped") else "error"
            )

    # ------------------------------------------------------------ records
    def record(self, kind: UnplugStep, **fields: Any) -> None:
        """Tell the hooks about a step (loop thread).  Steps, not events: the
        event intake's hot path never comes here."""
        hooks = self._registry.hooks
        if not hooks:
            return
        now = time.monotonic()
        attempts = self._registry.settings.attempts
        hooks.emit(
            UnplugRecord(
                kind=kind,
                unplug_id=self.id,
                uri=self._registry.conn.uri,
                domain=self.domain,
                domain_uuid=self.key[0],
                alias=self.key[1],
                attempt=min(self.used + 1, attempts),
                attempts=attempts,
                sent=self.sent,
                callers=self.callers,
                busy_refusals=self.busy_refusals,
                resumed=self.resumed,
                time=now,
                elapsed=now - self.started,
                **fields,
            )
        )

    def _ended(self, error: BaseException | None) -> None:
        """The unplug left the registry: tell the hooks in the same step, so a
        pending-unplugs gauge fed by ``started`` / ``ended`` always equals
        ``pending()``."""
        outcome: UnplugOutcome
        if error is None:
            outcome = "removed"
        elif isinstance(error, (Abandoned, asyncio.CancelledError)):
            outcome, error = "abandoned", None  # nobody came back, or the service closed
        else:
            found = outcome_of(error)
            outcome = "error" if found == "cancelled" else found
        request = self._request
        if request is not None and not request.done() and self._inside[0]:
            # Still inside libvirt (a close under it): it was handed to libvirt,
            # so it counts, now, before the end (nothing of an unplug after it).
            self.record("request_sent")
        self.record("ended", outcome=outcome, error=error)


def _settle(
    mine: asyncio.Future[LiveDone], error: BaseException | None, done: LiveDone | None
) -> None:
    if mine.done():
        return
    if error is None:
        assert done is not None
        mine.set_result(done)
    elif isinstance(error, asyncio.CancelledError):
        mine.cancel()
    else:
        mine.set_exception(error)


class _Journalled:
    """What only the journal needs of an unplug: with no journal, none of it
    is held (a few dozen bytes for each of thousands of pending unplugs)."""

    __slots__ = ("device", "resumed", "row", "run_id", "started_wall")

    def __init__(self, run_id: str | None, device: str | None, started_wall: float) -> None:
        self.run_id = run_id  # the domain's run (was it re-started since?)
        self.device = device  # what identifies the device besides its alias
        self.started_wall = started_wall
        self.row: int | None = None  # its row in the journal, once a request was noted
        self.resumed = False  # taken up from the journal after a restart


class Registry(Protocol):
    """What an unplug needs from the service (see :mod:`aiodetach._registry`)."""

    conn: Connection
    settings: DetachSettings
    hooks: Hooks
    journal: Journal | None
    deadlines: Deadlines
    loop: asyncio.AbstractEventLoop

    def forget(self, unplug: Unplug) -> None: ...

    def connection_lost(self, reason: str) -> None: ...


_IDENTITIES: dict[Identity, Identity] = {}
_IDENTITIES_MAX = 4096


def _shared(identity: Identity | None) -> Identity | None:
    """One copy of each identity (its strings interned): the same targets and
    tags recur across thousands of pending unplugs, and each would otherwise
    hold its own tuple and the strings of its own parse of a definition.
    The table is bounded (emptied when full): MACs and hostdev sources are
    unique, and it is only a cache."""
    if identity is None:
        return None
    found = _IDENTITIES.get(identity)
    if found is None:
        if len(_IDENTITIES) >= _IDENTITIES_MAX:
            _IDENTITIES.clear()
        found = tuple(sys.intern(part) if type(part) is str else part for part in identity)
        _IDENTITIES[found] = found
    return found


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome retrieved: nobody may be left to await it."""
    if not future.cancelled():
        future.exception()
