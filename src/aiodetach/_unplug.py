"""The live unplug of one device, as an explicit state machine.

This module *is* the live half of the protocol; read it top to bottom.

One :class:`Unplug` exists per (domain UUID, alias) at a time, whatever the
number of callers: a second caller joins it, so no second request is ever
sent while one of ours is pending in the guest.  The unplug belongs to the
*device*, not to its callers: when the last caller leaves (its own deadline,
a cancellation), a request already in libvirt is remembered through its
attempt window and for one more ``timeout`` after it (``IDLE``), with the
attempts used so far; a caller who asks again meanwhile carries on from
there instead of starting over.  Nothing is ever sent for nobody.

Phases (``Phase``) and what moves them::

    QUEUED ──send──▶ SENDING ──accepted / "in progress"──▶ WAITING
       ▲               │  "guest is busy" and none of ours pending
       │               ▼
       │          BACKING_OFF ──delay──▶ QUEUED       (no attempt used)
       │
    WAITING ──window over──▶ RECHECKING ──paused──▶ PAUSED ──runs again──▶ WAITING
                                 │ still attached: an attempt used
                                 └──────────────▶ QUEUED (re-send) or DetachTimeout

    a step due with no caller ──▶ IDLE ──a caller joins──▶ that step
                                   └──── ``timeout`` later, nobody came: dropped

Inputs that are not the driver's own I/O land in :meth:`Unplug.decide`
(libvirt events, the domain stopping), :meth:`Unplug.wake` (resumed,
connection lost) and the caller count (``join`` / :meth:`Unplug.leave`).
They only record and wake; the driver acts on them at one place, the top of
:meth:`Unplug._drive`, which every step returns to.  Hence the rules:

- **No task while it waits.**  The driver is a task only while it has I/O
  to do (sending, re-checking, riding out a reconnect, backing off,
  lingering).  In ``WAITING`` it *parks*: the task ends, and the window's
  end (one timer for all parked unplugs, :mod:`aiodetach._deadlines`) or a
  wake-up (an event, a lost connection) drives it on in a new task, or ends
  it on the spot when a verdict came (:meth:`Unplug._resume`).
  Callers wait on a plain future each (:meth:`Unplug.follow`), so ten
  thousand pending unplugs hold no task and no ``shield`` of their own.

- **A verdict is honoured wherever it lands**: an event that arrives while a
  request is in its thread, during a re-check or a state read, is acted on
  before any further request.
- **An event from before our request is checked**: a ``DEVICE_REMOVED`` that
  arrives before any request of ours was handed to libvirt (a late event of
  an earlier unplug of a device since re-attached under the same alias) is
  confirmed against the live XML before it counts; a stale
  ``DEVICE_REMOVAL_FAILED`` is ignored.
- **"guest is busy" before anything is pending is not "in progress"**: right
  after a native-PCIe hot-plug QEMU refuses ``device_del`` while the slot's
  power indicator blinks.  With no request of ours pending, the request was
  simply not accepted: back off and send again, using up no attempt.
- **A request is journalled before it is sent** (with a journal): the row is
  committed in the request's worker thread just before libvirt is called.
  An unplug taken up from the journal after a restart (:meth:`Unplug.take_up`)
  starts in ``WAITING`` for what is left of its last request's window (the
  row may say "sent" though the process died before sending: *maybe sent*,
  so the window is waited out either way), or ``IDLE`` if that window is
  over; from there the usual rules apply, with its attempts counted.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ._connection import Connection
from ._deadlines import Deadlines
from ._errors_map import is_alias_missing, is_busy, is_connection_error, is_in_progress, map_error
from ._journal import Journal, RequestNote, fault_point
from ._settings import DetachSettings
from ._xml import Definition, DeviceRef, Identity, has_alias
from .backend import BackendError, DomainState, ErrorCode
from .errors import (
    ConnectionLost,
    DetachError,
    DetachFailed,
    DetachTimeout,
    DomainStopped,
    JournalError,
    ServiceClosed,
)
from .instrumentation._dispatch import Hooks, next_unplug_id
from .instrumentation._records import UnplugOutcome, UnplugRecord, UnplugStep, outcome_of

if TYPE_CHECKING:
    from ._journal import Entry

__all__ = ["Abandoned", "LiveDone", "Phase", "Registry", "Unplug", "Verdict", "retrieve"]

Key = tuple[str, str]

_OUTSIDE = [False]
"""No request of this unplug is inside libvirt (never written: each request
gets a list of its own, see ``Unplug._send``)."""

BUSY_BACKOFF_MAX = 5.0
"""Cap of the "guest is busy" back-off, in seconds (the blink lasts ~5 s)."""


class Phase(enum.Enum):
    QUEUED = "queued"  # the next request is due (nothing of this attempt in libvirt)
    SENDING = "sending"  # the request is inside its worker thread
    WAITING = "waiting"  # libvirt has it; the attempt's window runs
    RECHECKING = "rechecking"  # the window ran out: reading state and live XML
    PAUSED = "paused"  # the domain is paused: no clock runs
    BACKING_OFF = "backing-off"  # "guest is busy" before any request of ours was accepted
    IDLE = "idle"  # nobody waits and the next step is due: kept a while for a caller to return
    DONE = "done"


class Verdict(enum.Enum):
    REMOVED = "removed"  # DEVICE_REMOVED
    FAILED = "failed"  # DEVICE_REMOVAL_FAILED
    GONE = "gone"  # absent from the live XML (its event was lost)


Decision = Verdict | tuple[str, str]  # ("stopped", reason) for a stopped domain


@dataclass(frozen=True, slots=True)
class LiveDone:
    """How a live unplug ended well: requests sent, and how removal was learnt."""

    sent: int
    confirmed_by: Literal["event", "xml"]


class Abandoned(Exception):
    """Nobody waits for this unplug any more, and nobody came back for it."""


class Unplug:
    """One device's live unplug: its phase, its inputs and its driver."""

    __slots__ = (
        "_followers",
        "_inside",
        "_journalled",
        "_parked",
        "_registry",
        "_request",
        "accepted",
        "busy_refusals",
        "busy_since",
        "callers",
        "deadline",
        "device",
        "domain",
        "early",
        "generation",
        "handed",
        "id",
        "identity",
        "key",
        "persistent_done",
        "phase",
        "result",
        "resume",
        "sent",
        "started",
        "task",
        "timer",
        "used",
        "verdict",
        "waiter",
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
        self.id = next_unplug_id()  # names it in the hooks' records
        self.started = time.monotonic()
        self.phase = Phase.QUEUED
        self.verdict: Decision | None = None
        self.early = False  # the verdict arrived before any request of ours reached libvirt
        self.handed = False  # a request of ours reached libvirt (set in its worker thread)
        self.accepted = False  # libvirt accepted one: an unplug of ours may be pending
        self._request: asyncio.Future[bool] | None = None  # the latest request's thread
        self._inside = _OUTSIDE  # whether that request is inside libvirt (set in its thread)
        self.sent = 0  # requests that counted (busy refusals do not)
        self.used = 0  # attempts used up
        self.busy_refusals = 0
        self.busy_since: float | None = None
        self.callers = 0
        self.deadline = 0.0  # when the window (WAITING), back-off or linger (IDLE) ends
        self.generation = 0  # of the connection the last request went out on
        self.waiter: asyncio.Future[bool] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None  # the driver, while it has a step to run
        self._parked = False  # WAITING with no task: a wake-up or the deadline resumes it
        # see follow(): one caller's future alone (the usual case), or a list
        self._followers: asyncio.Future[LiveDone] | list[asyncio.Future[LiveDone]] | None = None
        self.persistent_done = False  # a caller removed the device from the persistent definition
        self.resume: Phase | None = None  # what IDLE goes on with (None: DetachTimeout is due)

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
    def decide(self, verdict: Decision) -> None:
        """An event about this device or its domain (loop thread).

        The first wins, except that a verdict that counts at once replaces an
        early one still to be checked: a stale event must never hide the real
        answer to our request.
        """
        early = not self.handed and isinstance(verdict, Verdict)
        if self.verdict is None or (self.early and not early):
            self.verdict, self.early = verdict, early
        self.wake()

    def wake(self) -> None:
        if self._parked:
            # Resumed in a step of its own: an event's dispatch only schedules it.
            self._registry.loop.call_soon(self._resume, False)
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def follow(self) -> asyncio.Future[LiveDone]:
        """A future of the caller's own that gets how the unplug ended.

        The caller's cancellation cancels only that future, never the unplug:
        what ``asyncio.shield`` of a shared future would do, for one plain
        future per caller (the unplug has no future or task of its own while
        it waits, see :meth:`_park`).  Hand it back to :meth:`unfollow`.
        """
        mine: asyncio.Future[LiveDone] = self._registry.loop.create_future()
        if self.phase is Phase.DONE:
            # Over already: a caller sharing an unplug that removed the device
            # between its read and its join (see aiodetach._recent).
            assert self.result is not None, "only an unplug that removed the device is shared"
            mine.set_result(self.result)
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

    def join(self) -> None:
        """A caller waits for this unplug (the first, or one asking again)."""
        self.callers += 1
        if self.phase is Phase.IDLE:
            self.wake()

    def leave(self) -> None:
        """A caller stopped waiting (its result, its error or its cancellation)."""
        self.callers -= 1
        if self.callers == 0 and self.phase is Phase.BACKING_OFF:
            self.wake()  # nothing of ours is pending: stop now

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

    def _end(self, error: BaseException | None, done: LiveDone | None = None) -> None:
        """The unplug is over: leave the registry, journal and report it, then
        tell the callers (in that order, as one step)."""
        self.phase = Phase.DONE
        self.result = done
        if self._parked:
            self._unpark()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._registry.forget(self)
        self._note_end(error)
        self._ended(error)
        followers, self._followers = self._followers, None
        if followers is None:
            followers = []
        elif not isinstance(followers, list):
            followers = [followers]
        for mine in followers:
            if mine.done():
                continue
            if error is None:
                assert done is not None
                mine.set_result(done)
            elif isinstance(error, asyncio.CancelledError):
                mine.cancel()
            else:
                mine.set_exception(error)

    @property
    def over(self) -> bool:
        return self.phase is Phase.DONE

    def abort(self) -> None:
        """End it as cancelled (the service closes); a running driver task is
        cancelled instead.  A task that has just parked the unplug is already
        done (its done-callback, which clears ``task``, runs one step later):
        cancelling it would do nothing and leave the unplug parked on its timer."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        elif self.phase is not Phase.DONE:
            self._end(asyncio.CancelledError())

    # ------------------------------------------------------------- driver
    def start(self) -> None:
        """Begin driving it (the registry calls this once)."""
        self._spawn()

    def _spawn(self) -> None:
        self.task = task = self._registry.loop.create_task(self._drive())
        task.add_done_callback(self._driven)

    def _driven(self, task: asyncio.Task[None]) -> None:
        """Done callback of a driver task: one cancelled before its first step
        (a service closing at once) never ran its ``except``."""
        if self.task is task:
            self.task = None
        retrieve(task)
        if task.cancelled() and self.phase is not Phase.DONE:
            self._end(asyncio.CancelledError())

    def _park(self) -> None:
        """Wait for the window's end or a wake-up with no task at all: this is
        where ten thousand pending unplugs spend their time, and a task with
        its coroutine frames is most of what each would hold (measured: ~1.3
        KiB of ~5 KiB per pending detach)."""
        self._parked = True
        if self.timer is not None:
            # The driver's last sleep's (spent or cancelled): while parked,
            # ``timer`` is set only for a window that is not on the queue.
            self.timer.cancel()
            self.timer = None
        if not self._registry.deadlines.add(self):
            # Its window ends before the last one queued (one taken up from
            # the journal, say): a timer of its own.
            self.timer = self._registry.loop.call_at(self.deadline, self._window_over)

    def window_over(self, when: float) -> bool:
        """Its entry for the window ending at ``when`` came up in the shared
        deadlines (see :mod:`aiodetach._deadlines`): resume if it is still
        parked on that window (not woken since, not parked again on a later
        one, not on a timer of its own).  False: the entry was stale."""
        if self.parked_on(when):
            self._parked = False  # its entry is used up (taken off the queue)
            self._go_on(True)
            return True
        return False

    def parked_on(self, when: float) -> bool:
        return self._parked and self.timer is None and self.deadline == when

    def _window_over(self) -> None:
        self._resume(True)  # (a method of its own: no argument tuple held per timer)

    def _unpark(self) -> None:
        """Leave the park before its queue entry came up (that entry is stale)."""
        self._parked = False
        if self.timer is None:
            self._registry.deadlines.left()

    def _resume(self, expired: bool) -> None:
        if not self._parked:
            return  # resumed already (the timer and a wake-up both came)
        self._unpark()
        self._go_on(expired)

    def _go_on(self, expired: bool) -> None:
        timer, self.timer = self.timer, None
        if expired:
            self.deadline = min(self.deadline, self._registry.loop.time())  # the window is over
        elif timer is not None:
            timer.cancel()
        if self.verdict is not None and not self.early:
            self._conclude()  # the usual end (DEVICE_REMOVED): acted on here, with no task
            return
        self._spawn()

    def _conclude(self) -> None:
        """End on the verdict (not an early one: that is confirmed first)."""
        assert self.verdict is not None
        try:
            done = self._finish(self.verdict)
        except DetachError as exc:
            self._end(exc)
        else:
            self._end(None, done)

    async def _drive(self) -> None:
        """Drive the unplug until it ends, or parks while its window runs (the
        next wake-up or the window's end drives it on).  The one place where
        verdicts are acted on (:meth:`_resume` is its shortcut for a verdict
        that arrived while parked)."""
        try:
            while True:
                if self.verdict is not None:
                    if not self.early:
                        self._conclude()
                        return
                    await self._confirm_early()
                    continue
                phase = self.phase
                if phase is Phase.QUEUED:
                    await self._send()
                elif phase is Phase.WAITING:
                    if await self._wait_window():
                        return  # parked: no task until the next wake-up
                elif phase is Phase.RECHECKING:
                    await self._recheck()
                elif phase is Phase.PAUSED:
                    await self._wait_paused()
                elif phase is Phase.BACKING_OFF:
                    await self._back_off()
                elif phase is Phase.IDLE:
                    await self._linger()
                else:  # pragma: no cover - SENDING/DONE never reach here
                    raise AssertionError(f"unplug {self.key} in phase {phase}")  # noqa: TRY301
        except BaseException as exc:
            if self.phase is not Phase.DONE:
                self._end(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation and the like: the task says so too

    async def _send(self) -> None:
        if self.callers == 0:
            if not self.accepted:
                raise Abandoned  # nothing of ours ever reached the guest: nothing to keep
            self._idle(Phase.QUEUED)  # a re-send is due, for nobody
            return
        conn = self._registry.conn
        self.phase = Phase.SENDING
        self.sent += 1
        self.generation = conn.generation
        backend = conn.backend
        uuid, alias = self.key
        journal = self._registry.journal
        journalled = self._journalled
        note = self._note() if journal is not None else None

        def request() -> bool:
            # In the worker thread.  A request whose callers all left while it
            # waited for this thread is not sent (nobody wants it), nor one
            # whose unplug an event decided meanwhile.
            if self.callers == 0 or (self.verdict is not None and not self.early):
                return False
            if journal is not None and journalled is not None and note is not None:
                # Durable before libvirt hears of it: a restart finds it.
                journalled.row = journal.note_request(journalled.row, note)
            # From here on an event for this alias can be our request's own.
            self.handed = inside[0] = True
            try:
                backend.detach_live(uuid, alias)
            finally:
                # The guest's window starts when libvirt answers (see _start_window).
                if journal is not None and journalled is not None and journalled.row is not None:
                    journal.answered_soon(journalled.row)
            if journal is not None:
                fault_point("request.sent")
            return True

        inside = self._inside = [False]  # this request's own "handed to libvirt"
        future = self._request = conn.submit(request)
        future.add_done_callback(self._answered)
        try:
            # Shielded: a request inside libvirt is always seen to its answer.
            sent = await asyncio.shield(future)
        except BackendError as err:
            await self._refused(err)
            return
        except JournalError as err:
            self.sent -= 1  # not recorded, so not sent
            err.domain, err.alias = self.domain, alias
            raise
        if not sent:  # decided meanwhile, or nobody waited when its thread was free
            self.sent -= 1
            self.phase = Phase.QUEUED  # run() acts on a verdict first
            return
        self.accepted = True
        self.busy_since = None
        self._start_window()

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

    def _note_end(self, error: BaseException | None) -> None:
        """Write the outcome to the journal (queued, off the loop).

        What leaves the guest's unplug possibly still running is *not* an
        outcome: the service closing (cancellation, :class:`ServiceClosed`), a
        daemon given up on (:class:`ConnectionLost`), a journal that failed.
        Such a row stays unfinished and the next ``open()`` takes it up.
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
        elif not isinstance(
            error, (asyncio.CancelledError, ConnectionLost, ServiceClosed, JournalError)
        ):
            found = outcome_of(error)
            journal.finish_soon(
                row, found if found in ("failed", "timeout", "stopped") else "error"
            )

    def take_up(self, entry: Entry, timeout: float) -> None:
        """Continue an unplug found unfinished in the journal (before its driver
        starts).  Its last request is *maybe sent*: its window is waited out
        (what is left of it), then, once a caller is back, the re-check and
        re-send rules apply with the attempts it used counted.  With the
        window over, it lingers ``timeout`` for a caller, as any unplug whose
        callers left (rule 3)."""
        journalled = self._journalled
        assert journalled is not None  # taken up from a journal
        journalled.resumed = True
        journalled.row = entry.row
        self.sent, self.used = entry.sent, entry.used
        self.accepted = self.handed = True  # events for the alias are our request's
        self.persistent_done = entry.persistent_done
        journalled.started_wall = entry.started_at
        self.generation = self._registry.conn.generation
        # A clock set back must not stretch the window beyond one timeout.
        now = time.time()
        left = min(max(entry.window_end(now) - now, 0.0), entry.timeout)
        if left > 0:
            self.deadline = self._registry.loop.time() + left
            self.phase = Phase.WAITING
        else:
            self.resume = Phase.RECHECKING
            self.deadline = self._registry.loop.time() + timeout  # the linger's end
            self.phase = Phase.IDLE

    def _answered(self, future: asyncio.Future[bool]) -> None:
        """libvirt answered a request (loop thread, before the driver resumes).

        A callback rather than a step of the driver so that a request is
        counted even when the driver was cancelled meanwhile (a service
        closing while the request is inside libvirt): a request counts once
        it was handed to libvirt, accepted or refused.
        """
        retrieve(future)
        if future.cancelled():
            return
        if self._request is future:
            # Answered: not inside libvirt any more, and nothing to hold while waiting.
            self._request, self._inside = None, _OUTSIDE
        error = future.exception()
        if isinstance(error, BackendError) and is_busy(error) and not self.accepted:
            # Not taken ("guest is busy" before anything of ours was accepted):
            # it does not count, here already so that the record says so.
            self.sent -= 1
            self.handed = False
        if self.phase is Phase.DONE:
            # Answered after the unplug ended (the service closed under it):
            # the unplug's records are over, and a hook may have dropped it.
            return
        if (error is None and future.result()) or isinstance(error, BackendError):
            self.record("request_sent")

    async def _refused(self, err: BackendError) -> None:
        """libvirt did not take the request: what does that mean?"""
        busy = is_busy(err) and not self.accepted  # not counted: see _answered
        if self.verdict is not None and not self.early:
            self.phase = Phase.QUEUED
            return  # an event decided it meanwhile (run() reports it)
        alias = self.key[1]
        if busy:
            self._start_back_off()
            return
        if is_in_progress(err):
            # An unplug (ours, or someone else's) is pending: wait for it.
            self.record("in_progress", reason=err.message)
            self.accepted = True
            self._start_window()
            return
        if is_connection_error(err) and self._registry.conn.state == "open":
            # It may or may not have reached QEMU: treat it as sent and wait
            # (the wait rides out the reconnect), never re-send at once.
            self._registry.connection_lost("call failed: " + err.message)
            self.accepted = True
            self._start_window()
            return
        if is_alias_missing(err) and not await self._still_there():
            self.verdict, self.early = Verdict.GONE, False
            return
        if err.code == ErrorCode.OPERATION_INVALID and "not running" in err.message:
            raise self._stopped("stopped")
        if err.code == ErrorCode.NO_DOMAIN:
            raise self._stopped("undefined")
        raise map_error(err, domain=self.domain, alias=alias, action="live detach") from None

    def _start_window(self) -> None:
        # The clock starts once libvirt has answered, not when the request was
        # queued: a request that waited for a worker thread in a mass detach
        # spent none of the guest's time.
        self.deadline = self._registry.loop.time() + self._registry.settings.timeout
        self.phase = Phase.WAITING

    async def _wait_window(self) -> bool:
        """The attempt's window runs: True when parked until it ends or a
        wake-up comes (then the driver task ends, see :meth:`_park`)."""
        conn = self._registry.conn
        while self.verdict is None:
            if not conn.is_up or self.generation != conn.generation:
                await self._ride_out_reconnect()
                continue
            if self._registry.loop.time() < self.deadline:
                self._park()
                return True
            if self.callers == 0:
                self._idle(Phase.RECHECKING)  # the window is over and nobody waits
            else:
                self.phase = Phase.RECHECKING
            return False
        return False

    async def _ride_out_reconnect(self) -> None:
        """Events of a lost connection are lost for good: once back, ask the
        live XML, and keep waiting out this attempt if the device is still
        there (no new request)."""
        conn = self._registry.conn
        if not conn.is_up:
            self.record("waiting_for_reconnect")
        await conn.wait_up()
        self.generation = conn.generation
        if self.verdict is None and not await self._still_there() and self.verdict is None:
            self.verdict, self.early = Verdict.GONE, False

    async def _recheck(self) -> None:
        """The window ran out with no verdict: look before sending again."""
        settings, alias = self._registry.settings, self.key[1]
        state = await self._domain_state()
        if self.verdict is not None:
            return
        if state is DomainState.PAUSED:
            # A paused guest cannot answer: this attempt has not really been
            # tried.  No new request (ours is still queued in QEMU); once the
            # vCPUs run again the guest gets a full timeout.
            self.record("paused")
            self.phase = Phase.PAUSED
            return
        self.record("attempt_timed_out", timeout=settings.timeout)
        xml = await self._live_xml()
        if self.verdict is not None:
            return  # e.g. DEVICE_REMOVAL_FAILED during the read: never re-send on top of it
        if not has_alias(xml, alias):
            self.verdict, self.early = Verdict.GONE, False
            return
        self.used += 1
        if self.used < settings.attempts:
            self.phase = Phase.QUEUED
        elif self.callers == 0:
            self._idle(None)  # the attempts are used up: the next caller learns it at once
        else:
            raise self._timeout()

    async def _wait_paused(self) -> None:
        """No clock runs while paused.  Woken by libvirt's RESUMED; looks again
        every ``timeout`` seconds in case that event was lost."""
        while True:
            await self._sleep(self._registry.loop.time() + self._registry.settings.timeout)
            if self.verdict is not None:
                return
            state = await self._domain_state()
            if self.verdict is not None:
                return
            if state is not DomainState.PAUSED:
                self.record("resumed")
                self._start_window()
                return

    def _start_back_off(self) -> None:
        """QEMU refused with "guest is busy" and nothing of ours is pending."""
        settings = self._registry.settings
        now = self._registry.loop.time()
        if self.busy_since is None:
            self.busy_since = now
        elif now - self.busy_since >= settings.timeout:
            # A slot busy for a whole attempt's time costs an attempt, so a
            # slot that never settles still ends in DetachTimeout.
            self.used += 1
            self.busy_since = now
            if self.used >= settings.attempts:
                raise self._timeout()
        base = min(1.0, settings.timeout / 4)
        delay = min(base * 1.5**self.busy_refusals, BUSY_BACKOFF_MAX, settings.timeout)
        self.busy_refusals += 1
        self.record("busy_backoff", delay=delay)
        self.deadline = now + delay
        self.phase = Phase.BACKING_OFF

    async def _back_off(self) -> None:
        """Wait out the back-off; only a verdict or the last caller leaving
        cuts it short (an event checked and ignored, or RESUMED, does not)."""
        while self.callers > 0 and self.verdict is None:
            if await self._sleep(self.deadline):
                self.phase = Phase.QUEUED
                return
        if self.verdict is None:  # the last caller left: nothing of ours is pending
            raise Abandoned

    def _idle(self, resume: Phase | None) -> None:
        self.resume = resume
        # No window runs any more (each caller of _idle is past it): the
        # deadline is the linger's end.
        self.deadline = self._registry.loop.time() + self._registry.settings.timeout
        self.phase = Phase.IDLE

    async def _linger(self) -> None:
        """Nobody waits and the next step is due.  The device's unplug, its
        attempts used so far and any request of ours still in the guest are
        kept for one more ``timeout``: a caller who asks again (after its own
        deadline, say) carries on from here instead of starting over, so a
        retry loop can neither re-send early nor send more than ``attempts``."""
        expired = await self._sleep(self.deadline)
        if self.verdict is not None:
            return
        if self.callers == 0:
            if expired:
                raise Abandoned
            return  # woken for something else: keep lingering
        if self.resume is None:
            raise self._timeout()
        self.phase = self.resume

    async def _confirm_early(self) -> None:
        """A verdict arrived before any request of ours was in libvirt."""
        verdict = self.verdict
        self.verdict, self.early = None, False  # an event during the read is recorded anew
        if verdict is Verdict.REMOVED and not await self._still_there():
            self.verdict, self.early = Verdict.GONE, False
            return
        self.record(
            "stale_event_ignored",
            reason=verdict.value if isinstance(verdict, Verdict) else str(verdict),
        )

    # ------------------------------------------------------------ helpers
    def _sleep(self, deadline: float) -> asyncio.Future[bool]:
        """Until ``deadline`` or a wake-up: True if the deadline passed.

        A future and a timer, not a coroutine with ``asyncio.timeout``: this
        is where ten thousand pending unplugs wait, and each saves a frame and
        a timeout object (measured: ~0.3 KiB per pending detach).
        """
        if self.timer is not None:
            self.timer.cancel()  # the previous wait's, if it was woken early
        self.waiter = waiter = self._registry.loop.create_future()
        self.timer = self._registry.loop.call_at(deadline, _expire, waiter)
        return waiter

    async def _domain_state(self) -> DomainState:
        """The domain's state now.  Raises DomainStopped if it is not active."""
        conn = self._registry.conn
        try:
            current = await conn.lookup(self.key[0], by="unplugs")
        except BackendError as err:
            if err.code == ErrorCode.NO_DOMAIN:  # a transient domain went away
                raise self._stopped("undefined") from None
            raise map_error(
                err, domain=self.domain, alias=self.key[1], action="domain lookup"
            ) from None
        if not current.state.is_active:
            # libvirt's STOPPED event may have landed during the read: its detail is better.
            reason = self.verdict[1] if isinstance(self.verdict, tuple) else "stopped"
            raise self._stopped(reason)
        return current.state

    async def _live_xml(self) -> Definition:
        conn = self._registry.conn
        try:
            return await conn.definition(self.key[0], inactive=False, by="unplugs")
        except BackendError as err:
            raise map_error(
                err, domain=self.domain, alias=self.key[1], action="reading the XML"
            ) from None

    async def _still_there(self) -> bool:
        """Re-read state and live XML: is the device still attached?"""
        await self._domain_state()
        return has_alias(await self._live_xml(), self.key[1])

    def _finish(self, decision: Decision) -> LiveDone:
        if decision is Verdict.REMOVED or decision is Verdict.GONE:
            confirmed_by: Literal["event", "xml"] = (
                "event" if decision is Verdict.REMOVED else "xml"
            )
            self.record("removed", confirmed_by=confirmed_by)
            return LiveDone(self.sent, confirmed_by)
        if decision is Verdict.FAILED:
            self.record("removal_failed")
            raise DetachFailed(
                "the guest rejected the unplug (DEVICE_REMOVAL_FAILED); not retried",
                domain=self.domain,
                alias=self.key[1],
            )
        assert isinstance(decision, tuple)
        raise self._stopped(decision[1])

    def _stopped(self, reason: str) -> DomainStopped:
        self.record("domain_stopped", reason=reason)
        what = "disappeared" if reason == "undefined" else f"stopped ({reason})"
        return DomainStopped(
            f"the domain {what} before the guest released the device",
            domain=self.domain,
            alias=self.key[1],
            reason=reason,
        )

    def _timeout(self) -> DetachTimeout:
        settings = self._registry.settings
        self.record("timed_out")
        busy = f", {self.busy_refusals} refused as busy" if self.busy_refusals else ""
        return DetachTimeout(
            f"the guest did not release the device after {self.sent} request(s) of "
            f"{settings.timeout:g} s each{busy}",
            domain=self.domain,
            alias=self.key[1],
            attempts=self.sent,
            timeout=settings.timeout,
        )


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


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


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
