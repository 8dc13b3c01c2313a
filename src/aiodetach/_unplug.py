"""The live unplug's driver: performs what `aiodetach._machine` decides.

The rules of the live half are all in the pure machine; this module only
feeds it inputs (libvirt's events, the answers of the worker-thread calls,
timers, callers joining and leaving, the connection going and coming back)
and performs the actions it asks for (send the request in a worker thread,
read the domain's state or live XML through the shared reads, wait, wait
for a reconnect, record, end).  [`Unplug`][aiodetach.testing.Unplug] *is* its machine (it
subclasses `UnplugMachine`): thousands of unplugs may wait at once.

What the driver adds, and why:

- **No task while it waits.**  Every action is a call or a future with a
  done-callback that feeds the result back; an unplug in its window holds no
  task, no coroutine frame and no timer of its own: its window's end is an
  entry on one timer shared by every waiting unplug
  (`aiodetach._deadlines`).  Callers wait on a plain future each
  (`Unplug.follow()`): ten thousand pending unplugs hold no task, no ``shield``.
- **One input at a time.**  An input an action causes (a lost connection wakes
  every unplug) is queued and handled once the current one is done.
- **The wait armed is the machine's current one.**  Every wait carries the
  machine's token; when an input moves the machine on, the previous wait is
  disarmed before anything else is done.
- **A request inside libvirt is seen to its answer**, also after the unplug
  ended (a close under it): it was handed to libvirt, so it is recorded.
- **A request is journalled before it is sent** (with a journal): the row is
  committed in the request's worker thread just before libvirt is called,
  and the outcome when the unplug ends.  An unplug taken up from the
  journal after a restart (`Unplug.take_up()`) waits out what is left of
  its last request's window, *maybe sent*.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ._ending import Abandoned, LiveDone, ended_outcome, journal_outcome, outcome, settle
from ._following import LEFT, Following
from ._journal import Noted
from ._machine_io import (
    Abort,
    Action,
    Answered,
    ConnectionDown,
    End,
    Event,
    Input,
    Joined,
    LoseConnection,
    Phase,
    ReadState,
    ReadXml,
    Rebooted,
    Report,
    Resumed,
    Send,
    Stopped,
    Timer,
    Verdict,
    WaitReconnect,
    WaitUntil,
)
from ._recent import shared_identity
from ._unplug_calls import OUTSIDE, Journalled, Registry, retrieve
from ._xml import DeviceRef
from .instrumentation._dispatch import next_unplug_id
from .instrumentation._records import UnplugRecord, UnplugStep

if TYPE_CHECKING:
    from ._journal import Entry

_VOIDED = Report("request_voided")

__all__ = ["Abandoned", "LiveDone", "Phase", "Registry", "Unplug", "Verdict", "retrieve"]

Key = tuple[str, str]

_JOINED, _ABORT, _RESUMED, _DOWN = Joined(), Abort(), Resumed(), ConnectionDown()
_LEFT = LEFT
_REBOOTED = Rebooted()
_REMOVED, _SENDING, _GONE = Verdict.REMOVED, Phase.SENDING, Verdict.GONE
_REMOVED_IN, _REMOVED_OUT = Event(_REMOVED, in_libvirt=True), Event(_REMOVED, in_libvirt=False)


class Unplug(Following):
    """One device's live unplug: its machine, and the driver that acts for it."""

    __slots__ = (
        "_feeding",
        "_parked",
        "error",
        "id",
        "identity",
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
            Journalled(run_id, device, time.time()) if registry.journal is not None else None
        )
        # What a caller who read the definition after the device was gone
        # matches it by (see aiodetach._recent); the device's XML is not kept.
        self.identity = shared_identity(ref.identity) if ref is not None else None
        self.result: LiveDone | None = None  # how it ended, if the device was removed
        self.error: BaseException | None = None  # how it ended, if it failed
        self.id = next_unplug_id()  # names it in the hooks' records
        self.started = time.monotonic()
        self._request: asyncio.Future[bool] | None = None  # the latest request's thread
        self._inside = OUTSIDE  # that request's [handed to libvirt, generation]
        self._task: asyncio.Task[None] | None = None  # waiting for a reconnect
        self.timer: asyncio.TimerHandle | None = None
        self._parked = False  # in its window on the shared deadlines (or its own timer)
        self._feeding: list[Input] | None = None  # inputs queued while one is handled
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
        event: Input
        if verdict is _REMOVED:
            # The intake's hot path: no allocation, no hashing.
            event = _REMOVED_IN if self._inside[0] else _REMOVED_OUT
        elif isinstance(verdict, tuple):
            event = Stopped(verdict[1])
        else:
            event = Event(verdict, self._inside[0])
        if self.phase is _SENDING or verdict is _GONE:
            # Kept at once while the request is out (no action comes of it);
            # GONE is the service's own finding (a journal take-up), not an
            # event: it holds when the caller's step ends.
            self._feed(event)
        else:
            self._registry.loop.call_soon(self._feed, event)

    def wake(self) -> None:
        """libvirt's RESUMED for the domain (handled in a step of its own)."""
        self._registry.loop.call_soon(self._feed, _RESUMED)

    def guest_reset(self) -> None:
        """libvirt's REBOOT for the domain (handled in a step of its own)."""
        self._registry.loop.call_soon(self._feed, _REBOOTED)

    def connection_down(self) -> None:
        self._feed(_DOWN)

    def join(self) -> None:
        """A caller waits for this unplug (the first, or one asking again)."""
        self._feed(_JOINED)

    def abort(self) -> None:
        """End it as cancelled: the service closes."""
        self._feed(_ABORT)

    def start(self) -> None:
        """Send the first request, one loop step after the first caller joined
        (it follows the unplug first: see `follow()`)."""
        self._registry.loop.call_soon(self._begin)

    def _begin(self) -> None:
        for _ in range(self.swept()):
            self._feed(_LEFT)  # cancelled in the step it joined: nothing is sent
        self._perform(self.begin(self._registry.loop.time()), self.token)

    def linger(self, sent: int) -> None:
        """Every attempt used, its last caller cancelled as it ended (see
        `Registry.untold()`): idle one ``timeout``; a caller back gets a look."""
        registry = self._registry
        actions = self.taken_up(sent, registry.settings.attempts - 1, 0.0, registry.loop.time())
        self._perform(actions, self.token)

    def take_up(self, entry: Entry) -> None:
        """Continue an unplug found unfinished in the journal (see
        `UnplugMachine.taken_up()`; the linger's ``timeout`` is the
        machine's own limit)."""
        journalled = self._journalled
        assert journalled is not None  # taken up from a journal
        journalled.resumed = True
        journalled.row = entry.row
        journalled.taken = Noted(entry.sent, entry.sent_at, entry.answered_at)
        self.persistent_done = entry.persistent_done
        journalled.started_wall = entry.started_at
        # A clock set back must not stretch the window beyond one timeout.
        now = time.time()
        left = min(max(entry.window_end(now) - now, 0.0), entry.timeout)
        loop_now = self._registry.loop.time()
        self._perform(self.taken_up(entry.sent, entry.used, left, loop_now), self.token)

    # ------------------------------------------------------------- the loop
    def _feed(self, event: Input) -> None:
        """Hand one input to the machine and perform its actions; inputs that
        arrive meanwhile (from those actions) are handled after it."""
        queued = self._feeding
        if queued is not None:
            queued.append(event)
            return
        self._feeding = queued = []
        gone = 0 if event is _JOINED or event is _LEFT else self.swept()
        if gone:
            queued += [_LEFT] * (gone - 1) + [event]
            event = _LEFT
        loop = self._registry.loop
        try:
            while True:
                before = self.token
                refused = self.not_taken
                actions = self.handle(event, loop.time())
                # Before the actions: a re-send among them is noted after this.
                if isinstance(event, Answered):
                    self.journal_answer(taken=self.not_taken == refused)
                elif self._journalled is not None and _VOIDED in actions:
                    self.journal_voided()
                self._perform(actions, before)
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
        deadlines (see `aiodetach._deadlines`): go on if it is still
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

    # ------------------------------------------------------------------ end
    def _finish(self, end: End) -> None:
        """The unplug is over: leave the registry, journal and report it, then
        tell the callers (in that order, as one step)."""
        self._disarm()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        settings = self._registry.settings
        error, done, step = outcome(
            end,
            domain=self.domain,
            alias=self.key[1],
            sent=self.sent,
            busy_refusals=self.busy_refusals,
            timeout=settings.timeout,
        )
        if step is not None:
            self.record(step[0], **step[1])  # type: ignore[arg-type]
        self.result, self.error = done, error
        self._registry.forget(self)
        journal, journalled = self._registry.journal, self._journalled
        row = journalled.row if journalled is not None else None
        written = journal_outcome(error, done) if journal is not None else None
        if journal is not None and row is not None and written is not None:
            journal.finish_soon(row, *written)
        request = self._request
        if request is not None and not request.done() and self._inside[0]:
            # Still inside libvirt (a close under it): it was handed to libvirt,
            # so it counts, now, before the end (nothing of an unplug after it).
            self.record("request_sent")
        # In the same step as leaving the registry, so that a pending-unplugs
        # gauge fed by ``started`` / ``ended`` always equals ``pending()``.
        said, carried = ended_outcome(error)
        self.record("ended", outcome=said, error=carried)
        followers, self._followers = self._followers, None
        if followers is None:
            return
        if not isinstance(followers, list):
            settle(followers, error, done)
            return
        for mine in followers:
            settle(mine, error, done)

    # ------------------------------------------------------------ records
    def record(self, kind: UnplugStep, **fields: Any) -> None:
        """Tell the hooks about a step (loop thread).  Steps, not events: the
        event intake's hot path never comes here."""
        hooks = self._registry.hooks
        if not hooks:
            return
        now = time.monotonic()
        attempts = self._registry.settings.attempts
        # The window's end on the records' clock (the loop's may differ, uvloop's).
        deadline = (
            now + (self.deadline - self._registry.loop.time())
            if self.phase is Phase.WAITING
            else None
        )
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
                deadline=deadline,
                time=now,
                elapsed=now - self.started,
                **fields,
            )
        )
