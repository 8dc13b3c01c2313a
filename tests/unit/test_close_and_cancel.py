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
from typing import Any

import pytest

from aiodetach import DetachFleet, DetachService, DetachSettings
from aiodetach.errors import ServiceClosed
from aiodetach.testing import FakeHypervisor, Unplug

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
