"""Closing and cancelling at any point, on the fake hypervisor.

``aclose()`` at any moment gives every caller still waiting
:class:`ServiceClosed` (0.1 also gave ``RuntimeError('cannot schedule new
futures after shutdown')`` and ``ConnectionLost``), no call reaches the
worker threads once closing began, and no connection is left open behind a
cancelled ``open()`` or a close during a reconnect.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodetach import DetachFleet, DetachService, DetachSettings
from aiodetach.errors import (
    ServiceClosed,
)
from aiodetach.instrumentation import DetachRecord, UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug

from ._gate_fake import GateFake, holding, settle

_CLOSE_DELAYS = [0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06, 0.12]


@pytest.mark.parametrize("delay", _CLOSE_DELAYS)
async def test_close_during_a_batch_gives_only_service_closed(
    fake: FakeHypervisor, delay: float
) -> None:
    vm = fake.add_domain("vm")
    rng = random.Random(delay)
    for i in range(40):
        plan = rng.choice([Unplug.now(), Unplug.later(0.01), Unplug.manual(), Unplug.never()])
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=plan)
    fake.call_latency = 0.002
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=0.05, max_threads=4))
    await svc.open()
    batch = asyncio.create_task(
        svc.detach_many([{"domain": "vm", "alias": f"ua-{i}"} for i in range(30)])
    )
    singles = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(30, 40)]
    await asyncio.sleep(delay)
    await svc.aclose()
    for outcome in await batch:
        if outcome.error is not None:
            assert isinstance(outcome.error, ServiceClosed), repr(outcome.error)
    for single in await asyncio.gather(*singles, return_exceptions=True):
        if isinstance(single, BaseException):
            assert isinstance(single, ServiceClosed), repr(single)
            assert single.domain == "vm"
    assert svc.pending() == []
    assert not fake.connected


async def test_no_call_reaches_the_threads_once_closing_began(
    fake: FakeHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is handed to the service's worker threads after ``aclose()``
    began (only the close itself runs, in the loop's default executor)."""
    vm = fake.add_domain("vm")
    for i in range(20):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug.never())
    loop = asyncio.get_running_loop()
    submit = loop.run_in_executor
    closing = False
    handed_after: list[object] = []

    def recording(executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        if closing and executor is not None:
            handed_after.append(getattr(func, "func", func))
        return submit(executor, func, *args)

    monkeypatch.setattr(loop, "run_in_executor", recording)
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=0.01, max_threads=2))
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(20)]
    await asyncio.sleep(0.05)  # reads, requests and re-sends all under way
    closing = True
    await svc.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert handed_after == []
    assert all(isinstance(r, ServiceClosed) for r in results), results


def _connects_slowly(fake: FakeHypervisor) -> threading.Event:
    """Each connect takes 0.2 s in its worker thread; the event says one began."""
    entered = threading.Event()

    def slow_open(name: str) -> None:
        if name == "open":
            entered.set()
            time.sleep(0.2)

    fake.before_call = slow_open
    return entered


async def test_cancelled_open_leaves_no_connection(fake: FakeHypervisor) -> None:
    """The connect is still in its thread when open() is cancelled: once it
    returns, the connection it made is closed (0.1: left open)."""
    entered = _connects_slowly(fake)
    svc = DetachService(backend=fake)
    opener = asyncio.create_task(svc.open())
    while not entered.is_set():
        await asyncio.sleep(0.005)
    opener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opener
    assert not fake.connected
    await asyncio.sleep(0.3)
    assert not fake.connected, "the connect that completed after the cancel was left open"
    with pytest.raises(ServiceClosed):
        await svc.detach("vm", alias="ua-d")


async def test_close_during_a_reconnect_leaves_no_connection(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(timeout=5, reconnect_timeout=10)
    svc = DetachService(backend=fake, settings=settings)
    await svc.open()
    waiter = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    while not fake.requests:
        await asyncio.sleep(0.005)
    entered = _connects_slowly(fake)
    fake.crash()
    fake.restart()
    while not entered.is_set():
        await asyncio.sleep(0.005)
    await svc.aclose()
    with pytest.raises(ServiceClosed):
        await waiter
    await asyncio.sleep(0.3)
    assert not fake.connected


async def test_caller_cancelled_during_close_sees_its_cancellation(
    fake: FakeHypervisor,
) -> None:
    """Its own cancellation wins over ServiceClosed: asyncio's contract."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=5))
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    while not fake.requests:
        await asyncio.sleep(0.005)
    task.cancel()
    await svc.aclose()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_close_while_persistent_step_runs(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    gate = threading.Event()
    fake.before_call = lambda name: gate.wait(0.3) if name == "detach_config" else None
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=5))
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await asyncio.sleep(0.05)
    closer = asyncio.create_task(svc.aclose())
    await asyncio.sleep(0.01)
    gate.set()
    await closer
    try:
        result = await task
    except ServiceClosed:
        return
    # The config detach finished before the close reached it: then so did the result.
    assert result.persistent


async def test_fleet_closed_while_connecting_gives_service_closed(fake: FakeHypervisor) -> None:
    """Callers waiting for a host's connection get ServiceClosed when the fleet
    closes (0.1: CancelledError, though nobody cancelled them)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    entered, release = threading.Event(), threading.Event()

    def slow_open(name: str) -> None:
        if name == "open":
            entered.set()
            release.wait(5)

    fake.before_call = slow_open
    fleet = DetachFleet(settings=DetachSettings(timeout=5), backend_factory=lambda _uri: fake)
    callers = [asyncio.create_task(fleet.detach("fake:///x", "vm", alias="ua-d")) for _ in range(2)]
    batch = asyncio.create_task(
        fleet.detach_many([{"uri": "fake:///x", "domain": "vm", "alias": "ua-d"}])
    )
    while not entered.is_set():
        await asyncio.sleep(0.005)
    closing = asyncio.create_task(fleet.aclose())
    await asyncio.sleep(0.02)
    release.set()
    await closing
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, ServiceClosed) for o in outcomes), outcomes
    (outcome,) = await asyncio.wait_for(batch, 5)
    assert isinstance(outcome.error, ServiceClosed), outcome
    # A connect that was never usable is not waited for by the close: the
    # connection it made once released is closed in the background as soon
    # as it returns (later than ``aclose()`` under load).
    for _ in range(200):
        if not fake.connected:
            break
        await asyncio.sleep(0.01)
    assert not fake.connected


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def _unraisable_guard() -> tuple[list[Any], Any]:
    seen: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _l, ctx: seen.append(ctx))
    return seen, loop


async def test_aclose_while_an_unplug_re_parks_gives_servicedclosed_promptly(
    gf: GateFake,
) -> None:
    """A parked unplug woken (here: a RESUMED event) re-parks in its new driver
    task's first step; aclose() in the same loop iteration must still end it."""
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    svc = DetachService(backend=gf, settings=DetachSettings(timeout=30))
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    await settle(0.1)  # request answered, parked
    gf.resume_domain("vm")  # wakes it: _resume is scheduled
    await asyncio.sleep(0)  # _resume ran: a new driver task is scheduled, we run after it
    started = time.monotonic()
    await svc.aclose()
    try:
        with pytest.raises(ServiceClosed) as info:
            await asyncio.wait_for(caller, 2)
    finally:
        if not caller.done():
            caller.cancel()
    assert time.monotonic() - started < 2
    assert (info.value.domain, info.value.alias) == ("vm", "ua-d")
    assert svc.pending() == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 60), st.integers(1, 12))
def test_aclose_at_any_step_of_a_mass_detach(steps: int, n: int) -> None:
    asyncio.run(_close_at(steps, n))


async def _close_at(steps: int, n: int) -> None:
    seen, _loop = _unraisable_guard()
    fake = GateFake()
    dom = fake.add_domain("vm")
    plans = [Unplug.never(), Unplug.manual(), Unplug.later(0.001), Unplug.now()]
    for i in range(n):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=plans[i % len(plans)])
    records: list[Any] = []
    svc = DetachService(
        backend=fake, settings=DetachSettings(timeout=30, attempts=3), hooks=[records.append]
    )
    await svc.open()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}")))
        if i % 3 == 0:
            await asyncio.sleep(0)
    for _ in range(steps):
        await asyncio.sleep(0)
    t0 = time.monotonic()
    await asyncio.wait_for(svc.aclose(), 5)
    _done, not_done = await asyncio.wait(tasks, timeout=1.0)
    for t in not_done:
        t.cancel()
    await asyncio.gather(*not_done, return_exceptions=True)
    fake.cancel_timers()
    assert not not_done, f"{len(not_done)} caller(s) still waiting 1 s after aclose() returned"
    assert time.monotonic() - t0 < 3
    for i, t in enumerate(tasks):
        exc = t.exception()
        if exc is None:
            continue
        assert isinstance(exc, ServiceClosed), repr(exc)
        assert (exc.domain, exc.alias) == ("vm", f"ua-d{i}")
    assert _others() == set()
    assert seen == []
    started = Counter(
        r.unplug_id for r in records if isinstance(r, UnplugRecord) and r.kind == "started"
    )
    ended = Counter(
        r.unplug_id for r in records if isinstance(r, UnplugRecord) and r.kind == "ended"
    )
    assert started == ended
    assert all(v == 1 for v in started.values())
    calls_started = Counter(
        r.detach_id for r in records if isinstance(r, DetachRecord) and r.kind == "started"
    )
    calls_finished = Counter(
        r.detach_id for r in records if isinstance(r, DetachRecord) and r.kind == "finished"
    )
    assert calls_started == calls_finished


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 8), st.integers(0, 8), st.integers(1, 6))
def test_aclose_around_a_resumed_event_of_parked_unplugs(
    resume_at: int, close_after: int, n: int
) -> None:
    """Parked unplugs woken by RESUMED (a domain resumed, e.g. after a
    migration's pause) while aclose() comes a few loop steps later: every
    caller must get ServiceClosed promptly."""
    asyncio.run(_resume_then_close(resume_at, close_after, n))


async def _resume_then_close(resume_at: int, close_after: int, n: int) -> None:
    fake = GateFake()
    dom = fake.add_domain("vm")
    for i in range(n):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=30))
    await svc.open()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(n)
    ]
    await settle(0.05)
    for _ in range(resume_at):
        await asyncio.sleep(0)
    fake.resume_domain("vm")
    for _ in range(close_after):
        await asyncio.sleep(0)
    await svc.aclose()
    _done, not_done = await asyncio.wait(tasks, timeout=1.0)
    for t in not_done:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    fake.cancel_timers()
    assert not not_done, f"{len(not_done)} of {n} caller(s) still waiting 1 s after aclose()"
    assert all(isinstance(t.exception(), ServiceClosed) for t in tasks)


async def test_aclose_while_shared_reads_held_own_cancellation_wins(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}")
    svc = DetachService(backend=gf)
    await svc.open()
    gf.hold["live"] = gate = threading.Event()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(3)
    ]
    await holding(gf, "live")
    tasks[0].cancel()
    closing = asyncio.create_task(svc.aclose())
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.5)
    gate.set()
    await asyncio.wait_for(closing, 5)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    for i in (1, 2):
        assert isinstance(outcomes[i], ServiceClosed), outcomes
        assert (outcomes[i].domain, outcomes[i].alias) == ("vm", f"ua-d{i}")  # type: ignore[union-attr]
    assert gf.requests == []
    assert _others() == set()


async def test_aclose_while_shared_recheck_read_is_stuck(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    svc = DetachService(backend=gf, settings=DetachSettings(timeout=0.2, attempts=3))
    await svc.open()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(5)
    ]
    await settle(0.05)
    gf.hold["live"] = gate = threading.Event()
    await holding(gf, "live")  # the re-check's read is stuck in its thread
    t0 = time.monotonic()
    closing = asyncio.create_task(svc.aclose())
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
    assert all(isinstance(o, ServiceClosed) for o in outcomes), outcomes
    assert [(o.domain, o.alias) for o in outcomes] == [("vm", f"ua-d{i}") for i in range(5)]  # type: ignore[union-attr]
    await asyncio.wait_for(closing, 5)
    assert time.monotonic() - t0 < 3
    gate.set()
    assert len(gf.requests) == 5


async def test_aclose_started_when_a_request_is_answered_ends_the_caller_promptly(
    gf: GateFake,
) -> None:
    """The first park after a request: aclose() begun from a hook on
    ``request_sent`` (e.g. an agent that shuts down once a request is out)
    lands its close step in the iteration after the driver parked."""
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    closers: list[asyncio.Task[None]] = []
    svc: DetachService

    def hook(record: Any) -> None:
        if isinstance(record, UnplugRecord) and record.kind == "request_sent" and not closers:
            closers.append(asyncio.ensure_future(svc.aclose()))

    svc = DetachService(backend=gf, settings=DetachSettings(timeout=30), hooks=[hook])
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    for _ in range(100):
        if closers:
            break
        await asyncio.sleep(0.01)
    await asyncio.wait_for(closers[0], 5)
    try:
        with pytest.raises(ServiceClosed):
            await asyncio.wait_for(caller, 2)
    finally:
        caller.cancel()
    assert _others() == set()


async def test_open_then_aclose_with_a_recovered_parked_unplug_ends_it_at_close(
    gf: GateFake, tmp_path: Path
) -> None:
    """``async with DetachService(journal=...)`` that takes up a pending unplug
    and exits at once: the taken-up unplug parks in its driver's first step,
    in the same loop iteration as the close's first step."""
    from aiodetach.instrumentation import ConnectionRecord

    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    path = tmp_path / "j.db"
    settings_ = DetachSettings(timeout=0.5, attempts=3)
    async with DetachService(backend=gf, settings=settings_, journal=path) as first:
        caller = asyncio.create_task(first.detach("vm", alias="ua-d", persistent=False))
        await settle(0.05)
    with pytest.raises(ServiceClosed):
        await caller
    records: list[Any] = []
    svc = DetachService(backend=gf, settings=settings_, journal=path, hooks=[records.append])
    await svc.open()
    assert [r.outcome for r in svc.recovered()] == ["pending"]
    await svc.aclose()
    closed_at = next(
        i for i, r in enumerate(records) if isinstance(r, ConnectionRecord) and r.kind == "closed"
    )
    await settle(1.5)  # the window, then one timeout of lingering
    ends = [i for i, r in enumerate(records) if isinstance(r, UnplugRecord) and r.kind == "ended"]
    assert len(ends) == 1
    assert ends[0] < closed_at, "the taken-up unplug ended after the service had closed"
    assert _others() == set()
