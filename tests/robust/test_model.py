"""Item 5: a hypothesis state machine against a reference model of the live protocol.

The machine owns an event loop whose clock is *virtual* (``loop.time()`` only
moves when the ``time_passes`` rule says), so timeouts happen exactly when the
model expects them, and drives the fake hypervisor (one device, ``manual``
unplug) through arbitrary orders of: callers arriving, a request held in its
worker thread and released, the guest releasing the device with or without an
event, rejecting it, late events, timeouts, cancellations, and the domain
paused and resumed (with or without libvirt's RESUMED event).  After every
step each caller's state (pending or its exact outcome) must match the model,
and at most one request per device is ever inside a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach.errors import DetachFailed, DetachTimeout, DeviceNotFound
from aiodetach.testing import FakeHypervisor, Unplug

TIMEOUT = 10.0
ATTEMPTS = 3
ALIAS = "ua-d"


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    outstanding = 0
    """Worker-thread calls submitted and not yet returned in their thread."""
    _count = threading.Lock()

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:  # type: ignore[override]
        with self._count:
            self.outstanding += 1

        def counted() -> Any:
            try:
                return func(*args)
            finally:
                with self._count:
                    self.outstanding -= 1

        return super().run_in_executor(executor, counted)


class _TrackedFake(FakeHypervisor):
    """The fake, plus: calls in worker threads counted, and a request that can be held."""

    def __init__(self) -> None:
        super().__init__()
        self.track = threading.Lock()
        self.active = 0
        self.held = 0
        self.hold_next = False
        self.gate: threading.Event | None = None
        self.live_in_thread = 0
        self.max_live_in_thread = 0

    def _tracked(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.track:
            self.active += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self.track:
                self.active -= 1

    def lookup(self, ref: str) -> Any:
        return self._tracked(super().lookup, ref)

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        return str(self._tracked(super().domain_xml, uuid, inactive=inactive))

    def detach_live(self, uuid: str, alias: str) -> None:
        gate = None
        with self.track:
            self.active += 1
            self.live_in_thread += 1
            self.max_live_in_thread = max(self.max_live_in_thread, self.live_in_thread)
            if self.hold_next:
                self.hold_next = False
                gate = self.gate = threading.Event()
                self.held += 1
        try:
            if gate is not None:
                gate.wait(30)
            super().detach_live(uuid, alias)
        finally:
            with self.track:
                self.active -= 1
                self.live_in_thread -= 1
                if gate is not None:
                    self.held -= 1


@dataclass
class _ModelUnplug:
    sent: int
    deadline: float
    callers: set[int] = field(default_factory=set)
    held: bool = False
    outcome: str | None = None  # "event" | "failed" (delivered, not yet acted on)
    in_pause: bool = False  # an attempt ran out on a paused domain: waiting for it to run


Expected = tuple[str, int, str | None]  # (kind, attempts, confirmed_by)


class DetachMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = _VirtualClockLoop()
        self.fake = _TrackedFake()
        self.vm = self.fake.add_domain("vm")
        self.dev = self.vm.add_disk("vdb", alias=ALIAS, unplug=Unplug.manual())
        conf = DetachSettings(attempts=ATTEMPTS, timeout=TIMEOUT, max_threads=4)
        self.svc = DetachService(backend=self.fake, settings=conf)
        self.loop.run_until_complete(self.svc.open())
        self.tasks: dict[int, asyncio.Task[DetachResult]] = {}
        self.expected: dict[int, Expected | None] = {}  # None: still pending
        self.unplug: _ModelUnplug | None = None
        self.live = True
        self.paused = False
        self.reached = 0  # requests that reached the fake
        self.next_id = 0

    # -- driving -------------------------------------------------------------
    def settle(self) -> None:
        stable = 0
        for _ in range(5000):
            self.loop.run_until_complete(asyncio.sleep(0))
            with self.fake.track, self.loop._count:
                held, outstanding = self.fake.held, self.loop.outstanding
            idle = outstanding == held and not self.loop._ready  # type: ignore[attr-defined]
            stable = stable + 1 if idle else 0
            if stable >= 3:
                return
            time.sleep(0.0002)
        raise AssertionError("the service did not settle")

    def _finish(self, kind: str, confirmed_by: str | None) -> None:
        unplug = self.unplug
        assert unplug is not None
        for caller in unplug.callers:
            self.expected[caller] = (kind, unplug.sent, confirmed_by)
        self.unplug = None

    def _send(self, unplug: _ModelUnplug) -> None:
        unplug.sent += 1
        unplug.deadline = self.loop.now + TIMEOUT
        if self.fake.hold_next:
            unplug.held = True
        else:
            self.reached += 1

    def _after_request(self, unplug: _ModelUnplug) -> None:
        """What the driver does once its request returned (not held)."""
        if unplug.outcome == "event":
            self._finish("ok", "event")
        elif unplug.outcome == "failed":
            self._finish("failed", None)
        elif not self.live:
            # The fake said "no device found with alias": re-checked, gone.
            self._finish("ok", "xml")

    # -- rules -----------------------------------------------------------------
    @precondition(lambda self: self.fake.held == 0 or self.unplug is not None)
    @rule(hold=st.booleans())
    def caller_arrives(self, hold: bool) -> None:
        cid = self.next_id
        self.next_id += 1
        self.expected[cid] = None
        if not self.live:
            self.expected[cid] = ("not-found", 0, None)
        elif self.unplug is None:
            self.fake.hold_next = hold
            self.unplug = _ModelUnplug(sent=0, deadline=0.0, callers={cid})
            self._send(self.unplug)
        else:
            self.unplug.callers.add(cid)
        self.tasks[cid] = self.loop.create_task(self.svc.detach("vm", alias=ALIAS, live=True))
        self.settle()
        self.fake.hold_next = False

    @precondition(lambda self: self.fake.held > 0)
    @rule()
    def request_returns(self) -> None:
        gate = self.fake.gate
        assert gate is not None
        gate.set()
        self.reached += self.live  # the fake records only requests for a present device
        unplug = self.unplug
        self.settle()
        if unplug is not None and unplug is self.unplug:
            unplug.held = False
            self._after_request(unplug)
            self.settle()

    @precondition(lambda self: self.live)
    @rule(emit=st.booleans())
    def guest_releases(self, emit: bool) -> None:
        self.fake.complete("vm", ALIAS, emit=emit)
        self.live = False
        unplug = self.unplug
        if unplug is not None and emit and unplug.outcome is None:
            unplug.outcome = "event"
            if not unplug.held:
                self._after_request(unplug)
        self.settle()

    @precondition(lambda self: self.live)
    @rule()
    def guest_rejects(self) -> None:
        self.fake.reject("vm", ALIAS)
        unplug = self.unplug
        if unplug is not None and unplug.outcome is None:
            unplug.outcome = "failed"
            if not unplug.held:
                self._after_request(unplug)
        self.settle()

    @precondition(lambda self: self.unplug is None or self.unplug.outcome is not None)
    @rule()
    def late_or_duplicate_event(self) -> None:
        """A DEVICE_REMOVED nobody waits for (or already decided) changes nothing."""
        self.fake.emit_removed("vm", ALIAS)
        self.settle()

    @precondition(lambda self: not self.paused)
    @rule()
    def domain_pauses(self) -> None:
        self.fake.pause_domain("vm")
        self.paused = True
        self.settle()

    @precondition(lambda self: self.paused)
    @rule(emit=st.booleans())
    def domain_resumes(self, emit: bool) -> None:
        self.fake.resume_domain("vm", emit=emit)
        self.paused = False
        unplug = self.unplug
        if emit and unplug is not None and unplug.in_pause and unplug.outcome is None:
            unplug.in_pause = False  # a full timeout from now, no new request
            unplug.deadline = self.loop.now + TIMEOUT
        self.settle()

    @precondition(lambda self: self.fake.held == 0)
    @rule()
    def time_passes(self) -> None:
        unplug = self.unplug
        self.loop.now += TIMEOUT
        if unplug is not None and unplug.outcome is None:
            if unplug.in_pause:
                if not self.paused:  # resumed, event lost: the look every TIMEOUT sees it
                    unplug.in_pause = False
                    unplug.deadline = self.loop.now + TIMEOUT
            elif self.loop.now >= unplug.deadline:
                if self.paused:
                    unplug.in_pause = True  # no request, no attempt used up
                elif not self.live:
                    self._finish("ok", "xml")
                elif unplug.sent < ATTEMPTS:
                    self._send(unplug)
                else:
                    self._finish("timeout", None)
        self.settle()

    @precondition(lambda self: any(v is None for v in self.expected.values()))
    @rule(data=st.data())
    def caller_cancelled(self, data: st.DataObject) -> None:
        waiting = sorted(c for c, v in self.expected.items() if v is None)
        cid = data.draw(st.sampled_from(waiting))
        self.tasks[cid].cancel()
        self.expected[cid] = ("cancelled", 0, None)
        unplug = self.unplug
        assert unplug is not None
        unplug.callers.discard(cid)
        if not unplug.callers:
            self.unplug = None  # its request may still be held in the thread
        self.settle()

    # -- checks ----------------------------------------------------------------
    @invariant()
    def callers_match_the_model(self) -> None:
        for cid, want in self.expected.items():
            task = self.tasks[cid]
            if want is None:
                assert not task.done(), (cid, task)
                continue
            assert task.done(), (cid, want)
            kind, attempts, confirmed_by = want
            if kind == "cancelled":
                assert task.cancelled()
                continue
            exc = task.exception()
            if kind == "ok":
                assert exc is None, (cid, want, exc)
                result = task.result()
                assert (result.attempts, result.confirmed_by) == (attempts, confirmed_by), (
                    cid,
                    want,
                    result,
                )
            else:
                cls = {
                    "failed": DetachFailed,
                    "timeout": DetachTimeout,
                    "not-found": DeviceNotFound,
                }[kind]
                assert isinstance(exc, cls), (cid, want, exc)
                if isinstance(exc, DetachTimeout):
                    assert exc.attempts == attempts == ATTEMPTS

    @invariant()
    def one_unplug_and_one_request_at_a_time(self) -> None:
        want = [(self.vm.uuid, ALIAS)] if self.unplug is not None else []
        assert self.svc.pending() == want
        assert self.fake.max_live_in_thread <= 1
        assert len(self.fake.requests) == self.reached

    def teardown(self) -> None:
        if self.fake.gate is not None:
            self.fake.gate.set()
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
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDetachModel = DetachMachine.TestCase
