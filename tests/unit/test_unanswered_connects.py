"""A host behind a network partition: its connects hang instead of failing.

A TCP connect into a partition sits in the kernel for about two minutes
(SYN retries) and no libvirt call interrupts it.  On the fake, an ``open``
that blocks until the test lets it go stands in for that.  What a caller
must get: ``ConnectionLost`` at the bound it configured (``connect_timeout``,
``reconnect_timeout``), a close that does not wait for the stuck thread, and
no connection left behind once that thread returns.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from aiodetach import DetachFleet, DetachService, DetachSettings
from aiodetach.errors import ConnectionLost, ServiceClosed
from aiodetach.testing import FakeHypervisor, Unplug


class Partition:
    """Makes the fake's ``open`` hang (as a connect into a partition does)."""

    def __init__(self, fake: FakeHypervisor) -> None:
        self.fake = fake
        self.cut = threading.Event()
        self.healed = threading.Event()
        self.hanging = 0
        fake.before_call = self._before

    def _before(self, name: str) -> None:
        if name == "open" and self.cut.is_set():
            self.hanging += 1
            self.healed.wait(30)

    def down(self) -> None:
        self.healed.clear()
        self.cut.set()

    def up(self) -> None:
        self.cut.clear()
        self.healed.set()


@pytest.fixture
def partition(fake: FakeHypervisor) -> Iterator[Partition]:
    p = Partition(fake)
    yield p
    p.up()


async def _until(predicate: object, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_open_gives_up_at_connect_timeout_and_closes_the_late_connection(
    fake: FakeHypervisor, partition: Partition
) -> None:
    partition.down()
    svc = DetachService(backend=fake, settings=DetachSettings(connect_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="connect_timeout"):
        await svc.open()
    took = time.monotonic() - started
    # connect_timeout, plus the close's grace for the stuck thread at most.
    assert took < 0.3 + 2.0 + 1.0, took
    # The connect completes later: the connection it made is closed, not leaked.
    partition.up()
    await _until(lambda: fake.opens == 1 and not fake.connected)


async def test_pending_detach_gets_connection_lost_at_reconnect_timeout(
    fake: FakeHypervisor, partition: Partition
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    vm.add_disk("vdc", alias="ua-e", unplug=Unplug.now())
    settings = DetachSettings(timeout=30, reconnect_timeout=0.5)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _until(lambda: len(fake.requests) == 1)
        partition.down()
        fake.crash()
        fake.restart()  # the daemon is fine; the network to it is not
        lost_at = time.monotonic()
        with pytest.raises(ConnectionLost) as info:
            await task
        waited = time.monotonic() - lost_at
        assert waited < 0.5 + 1.0, f"ConnectionLost came {waited:.2f} s after the loss"
        assert info.value.domain == "vm"
        assert info.value.alias == "ua-d"
        assert partition.hanging == 1
        # A new request while the host is still unreachable fails at once,
        # without a second stuck connect.
        quick = time.monotonic()
        with pytest.raises(ConnectionLost):
            await svc.detach("vm", alias="ua-d")
        assert time.monotonic() - quick < 0.5
        assert partition.hanging == 1
        # The network heals: the connect that was hanging completes and is
        # taken up, so the next request needs no connect of its own.
        partition.up()
        await _until(lambda: svc.reconnects == 1)
        opens = fake.opens
        result = await svc.detach("vm", alias="ua-e")
        assert result.live
        assert fake.opens == opens == 2


async def test_close_does_not_wait_for_a_stuck_connect(
    fake: FakeHypervisor, partition: Partition
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(timeout=30, reconnect_timeout=60)
    svc = DetachService(backend=fake, settings=settings)
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await _until(lambda: len(fake.requests) == 1)
    partition.down()
    fake.crash()
    fake.restart()
    await _until(lambda: partition.hanging == 1)
    started = time.monotonic()
    await svc.aclose()
    assert time.monotonic() - started < 2.0 + 2.0 + 1.0
    with pytest.raises(Exception):  # noqa: B017, PT011 - ServiceClosed, checked elsewhere
        await task
    partition.up()
    await _until(lambda: fake.opens == 2 and not fake.connected)


async def test_a_fleet_host_that_never_answers_fails_only_its_requests() -> None:
    good = FakeHypervisor("fake://good")
    vm = good.add_domain("vm")
    for i in range(3):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=Unplug.now())
    mute = FakeHypervisor("fake://mute")
    cut = Partition(mute)
    cut.down()
    hosts = {"fake://good": good, "fake://mute": mute}
    settings = DetachSettings(connect_timeout=0.5, timeout=5)
    try:
        async with DetachFleet(settings=settings, backend_factory=hosts.__getitem__) as fleet:
            requests = [
                {"uri": "fake://mute", "domain": "vm", "alias": f"ua-{i}"} for i in range(6)
            ]
            requests += [
                {"uri": "fake://good", "domain": "vm", "alias": f"ua-d{i}"} for i in range(3)
            ]
            async with asyncio.timeout(10):
                outcomes = await fleet.detach_many(requests, concurrency=2)
    finally:
        cut.up()
    assert [o.ok for o in outcomes] == [False] * 6 + [True] * 3
    assert all(isinstance(o.error, ConnectionLost) for o in outcomes[:6])
    assert cut.hanging == 1, "one connect per host, shared by its requests"


async def test_open_fails_at_connect_timeout_not_after_a_close_grace(
    fake: FakeHypervisor, partition: Partition
) -> None:
    partition.down()
    svc = DetachService(backend=fake, settings=DetachSettings(connect_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        await svc.open()
    assert time.monotonic() - started < 0.3 + 1.0


async def test_close_releases_a_caller_whose_read_is_stuck(
    fake: FakeHypervisor,
) -> None:
    """A read on a connection into a partition blocks in its thread; closing
    must give its caller ServiceClosed now, not when the thread returns."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    released = threading.Event()
    async with DetachService(backend=fake) as svc:
        stuck: list[str] = []

        def hang(name: str) -> None:
            if name == "lookup":
                stuck.append(name)
                released.wait(30)

        fake.before_call = hang
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        batch = asyncio.create_task(
            svc.detach_many([{"domain": "vm", "alias": "ua-d"}, {"domain": "vm", "target": "vdb"}])
        )
        await _until(lambda: len(stuck) >= 1)
        await asyncio.sleep(0.05)
    try:
        assert task.done(), "aclose() returned while a caller still waits for its read"
        assert batch.done(), "aclose() returned while detach_many still runs"
        with pytest.raises(ServiceClosed) as info:
            task.result()
        assert info.value.domain == "vm"
        assert info.value.alias == "ua-d"
        assert all(isinstance(o.error, ServiceClosed) for o in batch.result())
        assert [(o.error.domain, o.error.alias) for o in batch.result() if o.error] == [
            ("vm", "ua-d"),
            ("vm", None),
        ]
    finally:
        released.set()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Released at the end of the test whatever happened."""
    g = threading.Event()
    yield g
    g.set()


def _hang(fake: FakeHypervisor, gate: threading.Event, names: tuple[str, ...]) -> list[str]:
    """Makes the fake's calls in ``names`` block until ``gate`` is set; the calls hit."""
    hits: list[str] = []

    def before(name: str) -> None:
        if name in names:
            hits.append(name)
            gate.wait(30)

    fake.before_call = before
    return hits


async def test_close_is_bounded_when_every_libvirt_call_hangs(
    fake: FakeHypervisor, gate: threading.Event
) -> None:
    vm = fake.add_domain("vm-1")
    vm.add_disk("vdb", alias="ua-0", unplug=Unplug.manual())
    vm.add_disk("vdc", alias="ua-1", unplug=Unplug.manual())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=30, reconnect_timeout=30))
    await svc.open()
    waiting = asyncio.create_task(svc.detach("vm-1", alias="ua-0"))
    await _until(lambda: len(fake.requests) == 1)
    names = ("open", "close", "lookup", "domain_xml", "detach_live", "detach_config")
    hits = _hang(fake, gate, names)
    reading = asyncio.create_task(svc.detach("vm-1", alias="ua-1"))  # stuck in lookup
    await _until(lambda: "lookup" in hits)
    started = time.monotonic()
    await svc.aclose()
    took = time.monotonic() - started
    for task in (waiting, reading):
        with pytest.raises(ServiceClosed):
            await task
    gate.set()
    await _until(lambda: not fake.connected)
    assert took < 2.0 + 2.0, f"aclose() held up {took:.2f} s (its grace is 2 s)"


async def test_a_cancelled_open_closes_the_connection_made_late(
    fake: FakeHypervisor, gate: threading.Event
) -> None:
    hits = _hang(fake, gate, ("open",))
    svc = DetachService(backend=fake, settings=DetachSettings(connect_timeout=60))
    task = asyncio.create_task(svc.open())
    await _until(lambda: hits == ["open"])
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 3.0 + 2.0
    gate.set()
    await _until(lambda: fake.opens == 1 and not fake.connected)
