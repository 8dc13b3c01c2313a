"""A hypothesis state machine against a reference model of the live unplug.

The machine owns an event loop whose clock is *virtual* (``loop.time()`` only
moves when a time rule says), so windows and busy back-offs end exactly when
the model expects, and drives the fake hypervisor (one device, ``manual``
unplug, its first requests optionally refused as "guest is busy", re-plugged
after it is gone) through arbitrary orders of: callers arriving, leaving and
coming back; the service's own worker-thread calls held where the model says
they happen (a request waiting for a free thread, a request inside libvirt,
the re-check's state read and live-XML read) and released; the guest
releasing the device with or without an event, rejecting it; late events;
time passing; the domain paused and resumed (with or without RESUMED); and
the service closed at any of those points.

The model (``_ModelUnplug`` and the ``_m_*`` methods) is written from these
rules, not from the implementation's code:

- one unplug per device; a caller arriving while it exists joins it (no
  request).  A request's window starts when libvirt answers it.  When a
  window ends: read the domain state (paused: wait, no attempt used, a full
  window once it runs again), then the live XML (gone: success "xml"), else an
  attempt is used: re-send, or DetachTimeout once ``attempts`` are used.
- a verdict (DEVICE_REMOVED: success "event"; DEVICE_REMOVAL_FAILED:
  DetachFailed) is honoured wherever it lands, before any further request:
  also while a request or a re-check read is in its thread, or while a
  re-send waits for one.
- callers leaving do not cancel: the last caller leaving while a request of
  ours was handed to libvirt (in its thread, or accepted) leaves an orphan,
  kept through its window (paused: until the domain runs again and that fresh
  window ends) and, when its next step (re-check, re-send, DetachTimeout)
  falls due with nobody waiting, for one more ``timeout`` (idle), unless a
  verdict arrives first.  A caller coming back meanwhile joins it and carries
  on with the attempts used (an idle one that used them all: DetachTimeout at
  once); after that, it is dropped without a re-check or re-send and a caller
  starts afresh.  All callers leaving before the request was handed to a
  thread, or while backing off "busy": nothing is sent or kept.
- "guest is busy" with no request of this unplug ever accepted: back off
  ``min(base * 1.5**k, 5, timeout)`` (``base = min(1, timeout / 4)``) and send
  again, using no attempt and not counted in ``attempts``; busy for a whole
  ``timeout`` uses an attempt.  Events while no request of ours is pending are
  early: a REMOVED is checked against the live XML (gone: success "xml";
  there: ignored), a REMOVAL_FAILED ignored.
- ``aclose()`` at any point: every caller still waiting gets ServiceClosed,
  ``pending()`` is empty, nothing is handed to the worker threads after
  closing began, the connection is closed.

After every step: each caller's state (waiting, or its exact outcome:
attempts, confirmed_by, joined) matches the model, ``svc.pending()`` matches
it (orphans included) and so does the Prometheus hook's
``aiodetach_pending_unplugs`` gauge, ``aiodetach_requests_total`` counts the
requests that the fake answered (accepted or refused) and ``aiodetach_detaches_total`` the callers
that finished; a hook that raises at every step is installed too, and changes
none of this; every record is handed to the hooks on the loop thread, the requests (and busy refusals) that reached the
fake match it, the calls held in worker threads are exactly the ones the
model says are under way, and at most one request is ever inside a worker
thread.

The step-by-step tests at the bottom replay what the machine found while it
was written (each failed then): a busy back-off cut short by an ignored
event, a busy refusal counted as an attempt, a stale event hiding the real
verdict, a verdict not stopping a re-send queued for a thread.  Should the
implementation ever knowingly disagree with a rule again, :class:`_Known`
lets the random machine avoid that step combination while a strict-xfail
test pins it; today nothing is avoided.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from prometheus_client import CollectorRegistry

from _depth import examples
from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach.errors import DetachFailed, DetachTimeout, DeviceNotFound, ServiceClosed
from aiodetach.instrumentation import Record, prometheus_hook
from aiodetach.testing import FakeHypervisor, Unplug

TIMEOUT = 10.0
ATTEMPTS = 2
ALIAS = "ua-d"
BUSY_BASE = min(1.0, TIMEOUT / 4)
BUSY_CAP = 5.0

# What a rule may hold in a worker thread (the next such call of the service's own):
QUEUE = "queue"  # a request waiting for a free worker thread (not yet handed to it)
REQUEST = "detach_live"  # a request inside libvirt's call
STATE = "lookup"  # the re-check's (or a paused domain's) state read
XML = "domain_xml"  # the re-check's live-XML read

_thread = threading.local()
"""Per worker thread: ``own`` (a call of the service's own tasks, not of a
caller's front) and ``queued`` (it waited at the "no free thread" gate)."""


class _Holds:
    """Worker-thread calls the test holds, one at a time, until it releases them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed: str | None = None
        self.skip = 0
        self.held: dict[str, threading.Event] = {}
        self.closed = False

    def arm(self, kind: str | None, skip: int = 0) -> None:
        with self.lock:
            self.armed, self.skip = kind, skip

    def take(self, kind: str) -> threading.Event | None:
        """The gate to wait at, if this call is the one armed (after ``skip`` others)."""
        with self.lock:
            if self.armed != kind or self.closed:
                return None
            if self.skip:
                self.skip -= 1
                return None
            self.armed = None
            gate = self.held[kind] = threading.Event()
            return gate

    def release(self, kind: str) -> None:
        with self.lock:
            gate = self.held.pop(kind)
        gate.set()

    def release_all(self) -> None:
        with self.lock:
            self.closed = True
            gates = list(self.held.values())
            self.held.clear()
        for gate in gates:
            gate.set()

    def kinds(self) -> set[str]:
        with self.lock:
            return set(self.held)

    def count(self) -> int:
        with self.lock:
            return len(self.held)


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock moves only when told, and which sees every thread call."""

    def __init__(self, holds: _Holds) -> None:
        super().__init__()
        self.now = 1000.0
        self.holds = holds
        self.outstanding = 0
        """Worker-thread calls not yet returned in their thread and seen by the loop."""
        self.count_lock = threading.Lock()
        self.callers: set[asyncio.Task[Any]] = set()
        self.closing = False
        self.after_close: list[str] = []
        """Calls handed to the service's worker threads after closing began."""

    def time(self) -> float:
        return self.now

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        # A task a caller starts (its shared read, see aiodetach._reads) is
        # that caller's front too: its calls are never held as the unplug's.
        task = super().create_task(coro, **kwargs)
        shared_read = getattr(coro, "__qualname__", "") == "SharedReads._run"
        if shared_read and asyncio.current_task(self) in self.callers:
            self.callers.add(task)
        return task

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:  # type: ignore[override]
        own = asyncio.current_task(self) not in self.callers
        if executor is not None and self.closing:
            self.after_close.append(repr(func))
        # "No free thread": the call waits before it runs (the gate is counted
        # as held from now on, as it cannot run before it is released).
        gate = self.holds.take(QUEUE) if own and executor is not None else None
        with self.count_lock:
            self.outstanding += 1
        ends = [False, False]  # returned in its thread; its future done on the loop

        def end(which: int) -> None:
            with self.count_lock:
                ends[which] = True
                if all(ends):
                    self.outstanding -= 1

        def counted() -> Any:
            _thread.own, _thread.queued = own, gate is not None
            try:
                if gate is not None:
                    gate.wait(30)
                return func(*args)
            finally:
                _thread.own = _thread.queued = False
                end(0)

        future = super().run_in_executor(executor, counted)
        future.add_done_callback(lambda _f: end(1))
        return future


class _TrackedFake(FakeHypervisor):
    """The fake, plus: the service's own calls recorded and holdable."""

    def __init__(self, holds: _Holds) -> None:
        super().__init__()
        self.holds = holds
        self.track = threading.Lock()
        self.live_in_thread = 0
        self.max_live_in_thread = 0
        self.own_calls: list[str] = []
        self.queued_calls: list[str] = []
        self.answered = 0  # live requests libvirt answered, accepted or refused

    def _own(self, kind: str) -> None:
        if not getattr(_thread, "own", False):
            return  # a caller's front: never held
        with self.track:
            self.own_calls.append(kind)
            if getattr(_thread, "queued", False):
                self.queued_calls.append(kind)
        gate = self.holds.take(kind)
        if gate is not None:
            gate.wait(30)

    def lookup(self, ref: str) -> Any:
        self._own(STATE)
        return super().lookup(ref)

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        self._own(XML)
        return super().domain_xml(uuid, inactive=inactive)

    def detach_live(self, uuid: str, alias: str) -> None:
        with self.track:
            self.live_in_thread += 1
            self.max_live_in_thread = max(self.max_live_in_thread, self.live_in_thread)
        try:
            self._own(REQUEST)
            super().detach_live(uuid, alias)
        finally:
            with self.track:
                self.live_in_thread -= 1
                self.answered += 1

    def close(self) -> None:
        super().close()
        self.holds.release_all()  # a closed connection unblocks the calls in flight


# ---------------------------------------------------------------- the model
class P(enum.Enum):
    """Where the model's unplug is (only the I/O phases that the test holds)."""

    QUEUED = "its request waits for a worker thread (held)"
    IN_THREAD = "its request is inside libvirt (held)"
    WAITING = "accepted: the attempt's window runs until deadline"
    READING = "a re-check or paused-domain read is in its thread (held)"
    PAUSED = "the window ran out on a paused domain: looks again at deadline"
    BACKING_OFF = "refused as busy with nothing pending: sends again at deadline"
    IDLE = "HEAD: nobody waits, next step due; kept until deadline"


TIMED = (P.WAITING, P.PAUSED, P.BACKING_OFF, P.IDLE)


@dataclass
class _ModelUnplug:
    callers: set[int]
    phase: P = P.QUEUED
    deadline: float = 0.0
    sent: int = 0  # requests that count (not refused as busy)
    used: int = 0  # attempts used up
    handed: bool = False  # a request of ours reached libvirt (none refused as busy since)
    accepted: bool = False  # libvirt accepted a request of this unplug
    verdict: str | None = None  # "removed" / "failed", landed while I/O was in a thread
    tentative: bool = False  # an early REMOVED: counts only once the live XML agrees
    reading: str = ""  # STATE / XML while READING
    looking: bool = False  # READING: a paused domain's look, not a re-check
    busy_refusals: int = 0
    busy_since: float | None = None
    resume: str | None = None
    early_landed: bool = False  # not the model's: for DetachMachine.known only


@dataclass
class _Expected:
    kind: str  # ok, failed, timeout, not-found, cancelled, closed
    attempts: int = 0
    confirmed_by: str | None = None
    joined: bool = False


@dataclass
class _Known:
    """Step combinations where the implementation disagrees with the rules
    (pinned by the ``test_disagreement_*`` tests); the random machine avoids them."""

    wake_while_backing_off: bool = False
    verdict_while_queued: bool = False
    real_event_after_early: bool = False
    busy_with_verdict: bool = False


class DetachMachine(RuleBasedStateMachine):
    known = _Known()  # no known disagreement: nothing is avoided

    def __init__(self) -> None:
        super().__init__()
        self.holds = _Holds()
        self.loop = _VirtualClockLoop(self.holds)
        self.fake = _TrackedFake(self.holds)
        self.vm = self.fake.add_domain("vm")
        conf = DetachSettings(attempts=ATTEMPTS, timeout=TIMEOUT, max_threads=4)
        self.registry = CollectorRegistry()
        self.off_loop: list[Record] = []
        loop_thread = threading.get_ident()

        def on_loop_thread(record: Record) -> None:
            if threading.get_ident() != loop_thread:
                self.off_loop.append(record)

        def broken(record: Record) -> None:
            raise RuntimeError(f"a broken hook ({record.kind})")

        self.svc = DetachService(
            backend=self.fake,
            settings=conf,
            hooks=[broken, prometheus_hook(self.registry), on_loop_thread],
            log=False,
        )
        self.loop.run_until_complete(self.svc.open())
        self.key = (self.vm.uuid, ALIAS)
        self.tasks: dict[int, asyncio.Task[DetachResult]] = {}
        self.expected: dict[int, _Expected | None] = {}  # None: still waiting
        self.joined: set[int] = set()
        self.unplug: _ModelUnplug | None = None
        self.live = True
        self.paused = False
        self.busy_left = 0
        self.reached = 0  # requests that reached the fake
        self.busy_seen = 0  # of which refused as busy
        self.next_id = 0
        self.closed = False
        self.want_hold: str | None = None  # what this step may hold, if the model gets there
        self.armed: str | None = None  # ... and what it will hold
        self.skip = 0  # QUEUE: the service's own calls of this step before the request
        self.step_reads = 0  # the service's own reads so far in this step
        self.quiet = False  # this step must make no call of the service's own
        self.steps = 0
        self.busy = 0
        self.close_after = 0

    # ------------------------------------------------------------ the model
    @property
    def now(self) -> float:
        return self.loop.now

    def _take(self, kind: str) -> bool:
        """The model reaches a call of ``kind``: held if this step holds it."""
        if self.want_hold != kind:
            return False
        self.want_hold, self.armed = None, kind
        self.skip = self.step_reads if kind == QUEUE else 0
        return True

    def _end(self, u: _ModelUnplug, kind: str, confirmed_by: str | None = None) -> None:
        for cid in u.callers:
            self.expected[cid] = _Expected(kind, u.sent, confirmed_by, cid in self.joined)
        self.unplug = None

    def _drop(self) -> None:
        """Nobody waits and nothing of ours is pending (or its window is over)."""
        self.unplug = None

    def _honour(self, u: _ModelUnplug) -> None:
        if u.verdict == "removed":
            self._end(u, "ok", "event")
        else:
            self._end(u, "failed")

    def _m_due(self, u: _ModelUnplug) -> None:
        """A request is due: the first, a re-send, or after a busy back-off."""
        if not u.callers:
            if u.accepted:
                self._idle(u, "send")
            else:
                self._drop()  # nothing is sent that nobody wants
            return
        u.phase = P.QUEUED
        if not self._take(QUEUE):
            self._m_in_thread(u)

    def _m_in_thread(self, u: _ModelUnplug) -> None:
        """A worker thread takes the request."""
        if not u.callers:
            # All left before it was handed to a thread: not sent.  A re-send
            # (a request of ours was accepted before) idles like any step due.
            if u.accepted and u.verdict is None:
                self._idle(u, "send")
            else:
                self._drop()
            return
        u.handed = True
        if self._take(REQUEST):
            u.phase = P.IN_THREAD
        else:
            self._m_answered(u)

    def _m_answered(self, u: _ModelUnplug) -> None:
        """libvirt answers the request (the fake acts on it now)."""
        u.early_landed = False
        if u.tentative:
            # An early REMOVED is checked against the live XML: the device is
            # either gone (the request below finds it missing: "xml") or
            # still there (the REMOVED was stale: ignored).
            u.verdict, u.tentative = None, False
        if not self.live:  # "no device found with alias": not refused as busy, so it counts
            u.sent += 1
            if u.verdict is not None:
                self._honour(u)
            else:
                self._end(u, "ok", "xml")
            return
        self.reached += 1
        if self.busy_left:
            self.busy_left -= 1
            self.busy_seen += 1
            if u.verdict is not None:
                self._honour(u)
                return
            assert not u.accepted  # this fake refuses only its first requests as busy
            self._m_busy(u)
            return
        u.sent += 1
        u.accepted = True
        if u.verdict is not None:
            self._honour(u)
            return
        u.phase, u.deadline = P.WAITING, self.now + TIMEOUT  # the window starts at the answer

    def _m_busy(self, u: _ModelUnplug) -> None:
        """Refused as busy, none of this unplug's requests ever accepted: back off."""
        u.handed = False  # nothing of ours is pending in the guest
        if u.busy_since is None:
            u.busy_since = self.now
        elif self.now - u.busy_since >= TIMEOUT:  # busy for a whole timeout: an attempt
            u.used += 1
            u.busy_since = self.now
            if u.used >= ATTEMPTS:
                self._end(u, "timeout")
                return
        if not u.callers:
            self._drop()
            return
        delay = min(BUSY_BASE * 1.5**u.busy_refusals, BUSY_CAP, TIMEOUT)
        u.busy_refusals += 1
        u.phase, u.deadline = P.BACKING_OFF, self.now + delay

    def _m_window_over(self, u: _ModelUnplug) -> None:
        if not u.callers:
            self.quiet = True
            self._idle(u, "recheck")
            return
        self._m_read_state(u, looking=False)

    def _idle(self, u: _ModelUnplug, resume: str | None) -> None:
        u.phase, u.resume, u.deadline = P.IDLE, resume, self.now + TIMEOUT

    def _m_read_state(self, u: _ModelUnplug, *, looking: bool) -> None:
        u.phase, u.reading, u.looking = P.READING, STATE, looking
        if not self._take(STATE):
            self.step_reads += 1
            self._m_state_known(u)

    def _m_state_known(self, u: _ModelUnplug) -> None:
        if u.verdict is not None:
            self._honour(u)  # landed during the read: no further request
        elif self.paused:
            u.phase, u.deadline = P.PAUSED, self.now + TIMEOUT  # no clock runs while paused
        elif u.looking:
            u.phase, u.deadline = P.WAITING, self.now + TIMEOUT  # runs again: a full window
        else:
            u.reading = XML
            if not (u.callers and self._take(XML)):
                self.step_reads += 1
                self._m_xml_known(u)

    def _m_xml_known(self, u: _ModelUnplug) -> None:
        if u.verdict is not None:
            self._honour(u)  # landed during the read: no further request
        elif not self.live:
            self._end(u, "ok", "xml")
        else:
            u.used += 1
            if u.used >= ATTEMPTS:
                if u.callers:
                    self._end(u, "timeout")
                else:
                    self._idle(u, None)
            else:
                self._m_due(u)

    def _m_event(self, kind: str) -> None:
        """DEVICE_REMOVED ("removed") or DEVICE_REMOVAL_FAILED ("failed") arrives."""
        u = self.unplug
        if u is None:
            return
        if not u.handed:  # early: no request of ours is pending in libvirt
            assert u.phase in (P.QUEUED, P.BACKING_OFF), u
            if u.phase is P.QUEUED:
                u.early_landed = True
            if kind == "failed":
                return  # stale: ignored
            if u.phase is P.BACKING_OFF:
                if not self.live:
                    self._end(u, "ok", "xml")
                return  # still there: ignored, the back-off goes on
            if u.verdict is None:
                u.verdict, u.tentative = kind, True
            return
        if u.verdict is not None and not u.tentative:
            return  # the first verdict wins
        u.verdict, u.tentative = kind, False
        if u.phase in (P.WAITING, P.PAUSED, P.IDLE):
            self._honour(u)
        # else: acted on once the call in its thread returns, before any further request

    def _fire(self, u: _ModelUnplug) -> None:
        if u.phase is P.IDLE:
            self.quiet = True
            self._drop()
        elif u.phase is P.WAITING:
            self._m_window_over(u)
        elif u.phase is P.PAUSED:
            self._m_read_state(u, looking=True)
        else:
            self._m_due(u)  # the back-off is over

    # ----------------------------------------------------------- driving
    def settle(self) -> None:
        stable = 0
        for _ in range(5000):
            self.loop.run_until_complete(asyncio.sleep(0))
            with self.loop.count_lock:
                idle = self.loop.outstanding == self.holds.count()
            idle = idle and not self.loop._ready  # type: ignore[attr-defined]
            stable = stable + 1 if idle else 0
            if stable >= 3:
                return
            time.sleep(0.0002)
        raise AssertionError("the service did not settle")

    def act(self, action: Callable[[], object]) -> None:
        """Arm what the model says this step holds, act, settle, disarm."""
        self.steps += 1
        self.holds.arm(self.armed, self.skip)
        self.armed = self.want_hold = None
        self.skip = self.step_reads = 0
        before = len(self.fake.own_calls)
        action()
        self.settle()
        self.holds.arm(None)
        if self.quiet:
            self.quiet = False
            assert self.fake.own_calls[before:] == [], self.fake.own_calls[before:]

    def in_phase(self, *phases: P) -> bool:
        return self.unplug is not None and self.unplug.phase in phases

    # ------------------------------------------------------------- rules
    @initialize(busy=st.sampled_from([0, 0, 1, 2, 9]), close_after=st.integers(0, 40))
    def device(self, busy: int, close_after: int) -> None:
        """The device; its first ``busy`` requests are refused as "guest is busy"
        (again after each re-plug).  The service may close after ``close_after`` steps."""
        self.busy = self.busy_left = busy
        self.close_after = close_after
        self.dev = self.vm.add_disk("vdb", alias=ALIAS, unplug=Unplug("manual", busy_first=busy))

    @precondition(lambda self: not self.closed)
    @rule(hold=st.sampled_from([None, QUEUE, REQUEST]))
    def caller_arrives(self, hold: str | None) -> None:
        cid = self.next_id
        self.next_id += 1
        self.expected[cid] = None
        u = self.unplug
        if not self.live and u is None:
            self.expected[cid] = _Expected("not-found")
        elif u is not None:
            # Joins it, orphan or not: no new request.  Also when the device
            # already left the live XML (its event lost or not yet here): the
            # unplug in flight is the one that removed it.
            u.callers.add(cid)
            self.joined.add(cid)
            if u.phase is P.IDLE:
                self.want_hold = hold
                if u.resume is None:
                    self._end(u, "timeout")
                elif u.resume == "recheck":
                    self._m_read_state(u, looking=False)
                else:
                    self._m_due(u)
        else:
            self.unplug = u = _ModelUnplug(callers={cid})
            self.want_hold = hold
            self._m_due(u)

        def start() -> None:
            task = self.loop.create_task(
                self.svc.detach("vm", alias=ALIAS, live=True, persistent=False)
            )
            self.loop.callers.add(task)
            self.tasks[cid] = task

        self.act(start)

    @precondition(lambda self: self.in_phase(P.QUEUED))
    @rule(hold=st.booleans())
    def thread_frees(self, hold: bool) -> None:
        """The request that waited for a worker thread gets one."""
        u = self.unplug
        assert u is not None
        if u.verdict is not None and not u.tentative and u.callers:
            self._honour(u)  # acted on before any further request
        else:
            self.want_hold = REQUEST if hold else None
            self._m_in_thread(u)
        self.act(lambda: self.holds.release(QUEUE))
        assert set(self.fake.queued_calls) <= {REQUEST}, self.fake.queued_calls

    @precondition(lambda self: self.in_phase(P.IN_THREAD))
    @rule()
    def request_returns(self) -> None:
        u = self.unplug
        assert u is not None
        self._m_answered(u)
        self.act(lambda: self.holds.release(REQUEST))

    @precondition(lambda self: self.in_phase(P.READING))
    @rule(hold_xml=st.booleans())
    def read_returns(self, hold_xml: bool) -> None:
        u = self.unplug
        assert u is not None
        kind = u.reading
        if kind == STATE:
            self.want_hold = XML if hold_xml else None
            self._m_state_known(u)
        else:
            self._m_xml_known(u)
        self.act(lambda: self.holds.release(kind))

    def _may_decide(self, kind: str, *, gone: bool = False) -> bool:
        """False where a known disagreement (:attr:`known`) would fail the run."""
        u, k = self.unplug, self.known
        if u is None:
            return True
        if k.wake_while_backing_off and u.phase is P.BACKING_OFF:
            return kind == "removed" and (gone or not self.live)  # else: ignored, but wakes
        if k.verdict_while_queued and u.phase is P.QUEUED and u.handed:
            return False
        if k.real_event_after_early and u.phase is P.IN_THREAD and u.early_landed:
            return False
        busy = self.busy_left and self.live and not gone
        return not (k.busy_with_verdict and u.phase is P.IN_THREAD and busy and kind == "removed")

    def guest_events(self) -> list[str]:
        """What the guest (or libvirt) may do now (the guest acts on unplugs only)."""
        kinds = []
        if self.live and self.unplug is not None:
            kinds.append("releases-silently")  # removed, DEVICE_REMOVED lost
            if self._may_decide("removed", gone=True):
                kinds.append("releases")
            if self._may_decide("failed"):
                kinds.append("rejects")
        if self._may_decide("removed"):
            kinds.append("late-removed")  # not sent now: late (of an earlier unplug) or duplicate
        return kinds

    @precondition(lambda self: not self.closed and self.guest_events())
    @rule(data=st.data())
    def guest_event(self, data: st.DataObject) -> None:
        self.guest(data.draw(st.sampled_from(self.guest_events()), label="event"))

    def guest(self, kind: str) -> None:
        action: Callable[[], None]
        if kind in ("releases", "releases-silently"):
            emit = kind == "releases"
            self.live = False
            if emit:
                self._m_event("removed")
            action = lambda: self.fake.complete("vm", ALIAS, emit=emit)  # noqa: E731
        elif kind == "rejects":
            self._m_event("failed")
            action = lambda: self.fake.reject("vm", ALIAS)  # noqa: E731
        else:
            assert kind == "late-removed", kind
            self._m_event("removed")
            action = lambda: self.fake.emit_removed("vm", ALIAS)  # noqa: E731
        self.act(action)

    @precondition(lambda self: not self.closed and not self.live and self.unplug is None)
    @rule()
    def device_replugged(self) -> None:
        """The device is hot-plugged again under the same alias (busy again at first)."""
        self.live = True
        self.busy_left = self.busy

        def plug() -> None:
            with self.fake._lock:
                self.dev.live, self.dev.pending_since, self.dev.requests = True, None, 0

        self.act(plug)

    @precondition(lambda self: not self.closed and not self.paused)
    @rule()
    def domain_pauses(self) -> None:
        self.paused = True
        self.act(lambda: self.fake.pause_domain("vm"))

    @precondition(
        lambda self: (
            not self.closed
            and self.paused
            and not (self.known.wake_while_backing_off and self.in_phase(P.BACKING_OFF))
        )
    )
    @rule()
    def domain_resumes(self) -> None:
        """The domain runs again, and libvirt says so (RESUMED)."""
        self.paused = False
        u = self.unplug
        if u is not None and u.phase is P.PAUSED:
            self._m_read_state(u, looking=True)  # a full window from now, no new request
        self.act(lambda: self.fake.resume_domain("vm"))

    @precondition(lambda self: not self.closed and self.paused)
    @rule()
    def domain_resumes_silently(self) -> None:
        """The domain runs again; the RESUMED event is lost (the next look sees it)."""
        self.paused = False
        self.act(lambda: self.fake.resume_domain("vm", emit=False))

    def _pass_time(self, to: float, hold: str | None) -> None:
        self.loop.now = to
        u = self.unplug
        if u is not None and u.phase in TIMED and self.now >= u.deadline:
            self.want_hold = hold
            self._fire(u)
        self.act(lambda: None)

    @precondition(lambda self: not self.closed and self.unplug is not None)
    @rule(
        dt=st.sampled_from([1.0, 4.0, TIMEOUT]),
        hold=st.sampled_from([None, QUEUE, REQUEST, STATE, XML]),
    )
    def time_passes(self, dt: float, hold: str | None) -> None:
        self._pass_time(self.now + dt, hold)

    @precondition(lambda self: not self.closed and self.in_phase(*TIMED))
    @rule(hold=st.sampled_from([None, QUEUE, REQUEST, STATE, XML]))
    def time_to_deadline(self, hold: str | None) -> None:
        """Exactly to the model's next deadline (window, paused look, back-off)."""
        assert self.unplug is not None
        self._pass_time(self.unplug.deadline, hold)

    @precondition(lambda self: any(v is None for v in self.expected.values()))
    @rule(data=st.data())
    def caller_cancelled(self, data: st.DataObject) -> None:
        waiting = sorted(c for c, v in self.expected.items() if v is None)
        self.cancel(data.draw(st.sampled_from(waiting), label="caller"))

    def cancel(self, cid: int) -> None:
        self.expected[cid] = _Expected("cancelled")
        u = self.unplug
        assert u is not None
        u.callers.discard(cid)
        if not u.callers and u.phase is P.BACKING_OFF:
            self._drop()  # nothing of ours pending: nothing remembered
        self.act(self.tasks[cid].cancel)

    @precondition(lambda self: not self.closed and self.steps >= self.close_after)
    @rule()
    def service_closes(self) -> None:
        """``aclose()`` at whatever point the unplug is: the callers get ServiceClosed."""
        for cid, want in self.expected.items():
            if want is None:
                self.expected[cid] = _Expected("closed")
        self.unplug = None
        self.closed = True
        self.loop.closing = True
        self.act(lambda: self.loop.run_until_complete(self.svc.aclose()))
        assert self.svc.pending() == []
        assert self.loop.after_close == [], self.loop.after_close
        assert not self.fake.connected

    @precondition(lambda self: self.closed)
    @rule()
    def service_closes_again(self) -> None:
        self.act(lambda: self.loop.run_until_complete(self.svc.aclose()))  # idempotent

    # ------------------------------------------------------------ checks
    @invariant()
    def callers_match_the_model(self) -> None:
        for cid, want in self.expected.items():
            task = self.tasks[cid]
            if want is None:
                assert not task.done(), (cid, task)
                continue
            assert task.done(), (cid, want)
            if want.kind == "cancelled":
                assert task.cancelled(), (cid, want, task)
                continue
            assert not task.cancelled(), (cid, want)
            exc = task.exception()
            if want.kind == "ok":
                assert exc is None, (cid, want, exc)
                result = task.result()
                got = (result.attempts, result.confirmed_by, result.joined)
                assert got == (want.attempts, want.confirmed_by, want.joined), (cid, want, result)
                continue
            cls = {
                "failed": DetachFailed,
                "timeout": DetachTimeout,
                "not-found": DeviceNotFound,
                "closed": ServiceClosed,
            }[want.kind]
            assert isinstance(exc, cls), (cid, want, exc)
            if isinstance(exc, DetachTimeout):
                assert exc.attempts == want.attempts, (cid, want, exc.attempts)

    @invariant()
    def one_unplug_and_one_request_at_a_time(self) -> None:
        want = [self.key] if self.unplug is not None else []
        assert self.svc.pending() == want
        assert self.fake.max_live_in_thread <= 1
        assert len(self.fake.requests) == self.reached
        assert self.fake.busy_refusals == self.busy_seen

    @invariant()
    def metrics_match_the_model(self) -> None:
        sample = self.registry.get_sample_value
        assert sample("aiodetach_pending_unplugs") == len(self.svc.pending())
        # A request counts once libvirt answered it, or, if the unplug ends
        # while it is still inside libvirt (a close), at that end.
        requests = sample("aiodetach_requests_total") or 0.0
        in_thread = self.fake.live_in_thread
        assert self.fake.answered <= requests <= self.fake.answered + in_thread
        finished = sum(
            sample("aiodetach_detaches_total", {"outcome": o}) or 0.0
            for o in ("removed", "failed", "timeout", "stopped", "error", "cancelled")
        )
        assert finished == sum(task.done() for task in self.tasks.values())
        assert self.off_loop == []

    @invariant()
    def held_calls_match_the_model(self) -> None:
        u = self.unplug
        want: set[str] = set()
        if u is not None and u.phase is P.QUEUED:
            want = {QUEUE}
        elif u is not None and u.phase is P.IN_THREAD:
            want = {REQUEST}
        elif u is not None and u.phase is P.READING:
            want = {u.reading}
        assert self.holds.kinds() == want, (self.holds.kinds(), u)

    def teardown(self) -> None:
        self.holds.release_all()
        try:
            self.loop.run_until_complete(self.svc.aclose())
            for task in self.tasks.values():
                if not task.done():
                    task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            for task in self.tasks.values():
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: checked by the invariants
        finally:
            self.fake.cancel_timers()
            self.loop.close()


DetachMachine.TestCase.settings = settings(
    max_examples=examples(150),  # 500 in CI's everything stage (tests/_depth.py)
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDetachModel = DetachMachine.TestCase


# ------------------------------------------------- explicit reproductions
Step = tuple[str, dict[str, Any]]


def _replay(*steps: Step) -> None:
    """Run these steps of the machine (rules, or ``guest`` / ``cancel``) with
    nothing avoided, checking every invariant after each."""
    machine = DetachMachine()
    machine.known = _Known()
    try:
        for name, kwargs in steps:
            getattr(machine, name)(**kwargs)
            machine.callers_match_the_model()
            machine.one_unplug_and_one_request_at_a_time()
            machine.metrics_match_the_model()
            machine.held_calls_match_the_model()
    finally:
        machine.teardown()


def test_orphan_window_over_then_a_fresh_unplug() -> None:
    """An orphan whose window ends with no caller idles one more timeout, then
    is dropped (not listed, no re-check, no re-send); a caller after that
    starts afresh (a new request, attempts from 1)."""
    _replay(
        ("device", {"busy": 0, "close_after": 99}),
        ("caller_arrives", {"hold": None}),
        ("cancel", {"cid": 0}),  # an orphan: request accepted, window running
        ("time_to_deadline", {"hold": None}),  # its window ends: idle, still listed
        ("time_to_deadline", {"hold": None}),  # nobody came back: dropped
        ("caller_arrives", {"hold": None}),  # a fresh unplug: request 2, attempt 1
        ("guest", {"kind": "releases"}),
    )


def test_orphan_rejoined_within_its_window() -> None:
    """Rule 1: a caller who comes back within the window joins (no request),
    then re-checks and re-sends with the attempts used counted."""
    _replay(
        ("device", {"busy": 0, "close_after": 99}),
        ("caller_arrives", {"hold": REQUEST}),
        ("cancel", {"cid": 0}),  # an orphan with its request in libvirt
        ("request_returns", {}),  # accepted: the window starts now
        ("time_passes", {"dt": 4.0, "hold": None}),
        ("caller_arrives", {"hold": None}),  # joins: no request
        ("time_to_deadline", {"hold": STATE}),  # re-check, state read held
        ("guest", {"kind": "rejects"}),  # lands during the state read
        ("read_returns", {"hold_xml": False}),  # DetachFailed, no further request
    )


@pytest.mark.parametrize("wake", ["rejects", "late-removed", "resumed"])
def test_an_ignored_event_does_not_cut_the_busy_back_off_short(wake: str) -> None:
    steps: list[Step] = [("device", {"busy": 1, "close_after": 99})]
    if wake == "resumed":
        steps.append(("domain_pauses", {}))
    steps.append(("caller_arrives", {"hold": None}))  # refused as busy: backs off 1 s
    if wake == "resumed":
        steps.append(("domain_resumes", {}))  # the model: nothing sent before the delay
    else:
        steps.append(("guest", {"kind": wake}))  # early, device still there: ignored
    _replay(*steps)


def test_a_busy_refusal_is_not_counted_when_a_verdict_is_pending() -> None:
    _replay(
        ("device", {"busy": 1, "close_after": 99}),
        ("caller_arrives", {"hold": REQUEST}),  # the request is in libvirt
        ("guest", {"kind": "late-removed"}),  # DEVICE_REMOVED meanwhile: honoured
        ("request_returns", {}),  # refused as busy: attempts should be 0, not 1
    )


@pytest.mark.parametrize(("stale", "real"), [("late-removed", "rejects"), ("rejects", "rejects")])
def test_a_stale_event_does_not_hide_the_real_verdict(stale: str, real: str) -> None:
    _replay(
        ("device", {"busy": 0, "close_after": 99}),
        ("caller_arrives", {"hold": QUEUE}),  # its request waits for a worker thread
        ("guest", {"kind": stale}),  # early, device still there: to be ignored
        ("thread_frees", {"hold": True}),  # the request is now inside libvirt
        ("guest", {"kind": real}),  # the guest rejects it: DetachFailed is due
        ("request_returns", {}),  # the implementation waits, then re-sends on top
    )


def test_a_verdict_stops_a_resend_queued_for_a_thread() -> None:
    _replay(
        ("device", {"busy": 0, "close_after": 99}),
        ("caller_arrives", {"hold": None}),
        ("time_to_deadline", {"hold": QUEUE}),  # re-check done, the re-send waits
        ("guest", {"kind": "rejects"}),  # DEVICE_REMOVAL_FAILED: no further request
        ("thread_frees", {"hold": False}),  # the implementation sends it anyway
    )
