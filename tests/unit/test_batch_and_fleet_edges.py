"""Batches, fleets, the connection and the event-loop bridge at their edges:
batches given as generators or odd mappings, a progress callback raising on
the last outcome, a batch cancelled or closed under its caller, the global
bound, fleets reused after a dead host, a partition that hangs every call,
and libvirt's event hooks across several loops (on fake hypervisors)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections import OrderedDict, UserDict
from collections.abc import Iterator
from typing import Any

import pytest

from aiodetach import DetachFleet, DetachOutcome, DetachRequest, DetachService, DetachSettings
from aiodetach.errors import BatchAborted, ConnectionLost, InvalidRequest, ServiceClosed
from aiodetach.testing import FakeHypervisor, Unplug

SLOW = DetachSettings(attempts=3, timeout=30, reconnect_timeout=2.0)


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


async def _until(predicate: Any, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _six_disks(fake: FakeHypervisor, quick: int = 2) -> list[dict[str, Any]]:
    """vm-1 with six disks, the first ``quick`` released at once, the rest by hand."""
    vm = fake.add_domain("vm-1")
    for i in range(6):
        vm.add_disk(
            f"vd{i}", alias=f"ua-{i}", unplug=Unplug.now() if i < quick else Unplug.manual()
        )
    return [{"domain": "vm-1", "alias": f"ua-{i}"} for i in range(6)]


def _others() -> set[asyncio.Task[Any]]:
    me = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not me}


_GOES_ON = ("Unplug._drive", "PersistentStep._config_detach", "SharedReads._run")
"""What rightly outlives its callers: an unplug goes on for its device, a
config detach already handed to libvirt is seen through, and a shared read
already in a worker thread finishes (later callers may join it; cancelling
the task would not stop the thread).  All end by ``aclose()``, which
:func:`_nothing_after_close` checks."""


def _left_running(base: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks started since ``base`` still running, apart from :data:`_GOES_ON`."""
    return [
        repr(t)
        for t in _others() - base
        if not any(name in repr(t.get_coro()) for name in _GOES_ON)
    ]


def _nothing_after_close(base: set[asyncio.Task[Any]]) -> list[str]:
    """Once the service is closed, not even those are left."""
    return [repr(t) for t in _others() - base if not t.done()]


# -- what a batch may be given --------------------------------------------------------


async def test_a_generator_batch_with_a_late_bad_item_sends_nothing(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = fake.add_domain("vm-1")
    for i in range(3):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}")

    def items() -> Iterator[dict[str, str]]:
        for i in range(3):
            yield {"domain": "vm-1", "alias": f"ua-d{i}"}
        yield {"domain": "vm-1"}  # no selector

    before = list(fake.calls)
    with pytest.raises(InvalidRequest) as info:
        await svc.detach_many(items())
    assert info.value.index == 3
    assert "index 3" in str(info.value)
    assert fake.calls == before
    assert fake.requests == []


async def test_requests_and_any_mapping_type_mix_in_one_batch(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = fake.add_domain("vm-1")
    for i in range(3):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}")

    class Mapping(UserDict[str, Any]):
        pass

    items: list[Any] = [
        DetachRequest(domain="vm-1", alias="ua-d0"),
        OrderedDict(domain="vm-1", alias="ua-d1"),
        Mapping(domain="vm-1", alias="ua-d2"),
    ]
    outcomes = await svc.detach_many(items)
    assert [o.ok for o in outcomes] == [True, True, True], [o.error for o in outcomes]


@pytest.mark.parametrize(
    "batch", [{"domain": "vm-1", "alias": "ua-d0"}, "vm-1", b"vm-1", 5, None], ids=repr
)
async def test_a_batch_that_is_not_a_collection_of_items_is_refused(
    fake: FakeHypervisor, svc: DetachService, batch: Any
) -> None:
    fake.add_domain("vm-1").add_disk("vdb", alias="ua-d0")
    before = list(fake.calls)
    with pytest.raises(InvalidRequest):
        await svc.detach_many(batch)
    assert fake.calls == before


BOUNDS: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"concurrency": True}, ("detach_many", "detach_iter")),
    ({"concurrency": 2.0}, ("detach_many", "detach_iter")),
    ({"concurrency": "3"}, ("detach_many", "detach_iter")),
    ({"per_domain": False}, ("detach_many", "detach_iter")),
    ({"per_domain": 1.5}, ("detach_many", "detach_iter")),
    ({"concurrency": 0}, ("detach_iter",)),
    ({"per_domain": 0}, ("detach_iter",)),
    ({"concurrency": 1.5}, ("detach_iter",)),
]


@pytest.mark.parametrize(
    ("bounds", "api"),
    [(b, api) for b, apis in BOUNDS for api in apis],
    ids=[f"{api}-{b}" for b, apis in BOUNDS for api in apis],
)
async def test_bounds_that_are_not_positive_integers_are_refused(
    fake: FakeHypervisor, svc: DetachService, bounds: dict[str, Any], api: str
) -> None:
    fake.add_domain("vm-1").add_disk("vdb", alias="ua-d0")
    batch = [{"domain": "vm-1", "alias": "ua-d0"}]
    before = list(fake.calls)

    async def run() -> None:
        if api == "detach_many":
            await svc.detach_many(batch, **bounds)
        else:
            async for _ in svc.detach_iter(batch, **bounds):
                pass

    with pytest.raises(InvalidRequest):
        await run()
    assert fake.calls == before


@pytest.mark.parametrize(
    "item",
    [
        ("vm-1", "ua-x"),
        {"domain": "vm-1", "alias": "ua-x", "target": "vdb"},
        {"domain": "vm\n1", "alias": "ua-x"},
    ],
    ids=["tuple", "two selectors", "newline in domain"],
)
async def test_a_bad_item_is_named_by_its_index(
    fake: FakeHypervisor, svc: DetachService, item: Any
) -> None:
    fake.add_domain("vm-1").add_disk("vdb", alias="ua-d0")
    before = list(fake.calls)
    with pytest.raises(InvalidRequest) as info:
        await svc.detach_many([{"domain": "vm-1", "alias": "ua-d0"}, item])
    assert info.value.index == 1
    assert fake.calls == before


async def test_a_large_batch_with_a_bad_last_item_sends_nothing(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm-1").add_disk("vdb", alias="ua-d0")
    items: list[dict[str, str]] = [{"domain": "vm-1", "alias": f"ua-x{i}"} for i in range(20000)]
    items.append({"domain": "vm-1"})
    before = list(fake.calls)
    with pytest.raises(InvalidRequest) as info:
        await svc.detach_many(items)
    assert info.value.index == 20000
    assert fake.calls == before


async def test_one_device_named_four_times_in_a_batch_gets_one_request(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm-1").add_disk("vdb", alias="ua-d0", unplug=Unplug.later(0.1))
    await svc.detach_many(
        [{"domain": "vm-1", "alias": "ua-d0"}] * 3 + [{"domain": "vm-1", "target": "vdb"}],
        per_domain=None,
    )
    assert len(fake.requests) == 1
    assert fake.max_in_flight <= 1


async def test_a_fleet_batch_given_as_one_mapping_is_refused_before_any_connect(
    fake: FakeHypervisor, fast: DetachSettings
) -> None:
    opened: list[str] = []

    def factory(uri: str) -> FakeHypervisor:
        opened.append(uri)
        return fake

    one: Any = {"uri": "a", "domain": "vm-1", "alias": "ua-d0"}
    async with DetachFleet(settings=fast, backend_factory=factory) as fleet:
        with pytest.raises(InvalidRequest):
            await fleet.detach_many(one)
    assert opened == []


# -- progress callbacks, cancellation and close under a batch -------------------------


async def test_a_progress_callback_raising_on_the_last_outcome_keeps_every_outcome(
    fake: FakeHypervisor,
) -> None:
    batch = _six_disks(fake, quick=6)[:3]

    def on_progress(outcome: DetachOutcome, done: int, total: int) -> None:
        if done == total:
            raise RuntimeError("last")

    async with DetachService(backend=fake, settings=SLOW) as svc:
        with pytest.raises(BatchAborted) as info:
            await svc.detach_many(batch, on_progress=on_progress)
    assert len(info.value.outcomes) == 3
    assert info.value.unfinished == []


async def test_system_exit_from_a_progress_callback_propagates_and_stops_the_batch(
    fake: FakeHypervisor,
) -> None:
    batch = _six_disks(fake)

    def on_progress(outcome: DetachOutcome, done: int, total: int) -> None:
        raise SystemExit(3)

    async with DetachService(backend=fake, settings=SLOW) as svc:
        base = _others()
        with pytest.raises(SystemExit):
            await svc.detach_many(batch, per_domain=None, on_progress=on_progress)
        assert _left_running(base) == []
    assert _nothing_after_close(base) == []


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancelling_detach_many_leaves_nothing_of_the_batch_running(
    fake: FakeHypervisor, cancels: int
) -> None:
    """Once, or twice in a row (a TaskGroup sibling failing inside an outer timeout)."""
    batch = _six_disks(fake)
    async with DetachService(backend=fake, settings=SLOW) as svc:
        base = _others()
        task = asyncio.create_task(svc.detach_many(batch))
        await _until(lambda: len(svc.pending()) > 0)
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _left_running(base) == []
    assert _nothing_after_close(base) == []


async def test_closing_the_service_under_detach_many_gives_the_rest_service_closed(
    fake: FakeHypervisor,
) -> None:
    batch = _six_disks(fake)
    svc = DetachService(backend=fake, settings=SLOW)
    await svc.open()
    task = asyncio.create_task(svc.detach_many(batch, per_domain=1, concurrency=2))
    await _until(lambda: len(svc.pending()) > 0)
    await svc.aclose()
    async with asyncio.timeout(10):
        outcomes = await task
    assert [o.ok for o in outcomes[:2]] == [True, True]
    for o in outcomes[2:]:
        assert isinstance(o.error, ServiceClosed), o.error
        assert o.error.domain is not None, (o.index, o.error)


async def test_closing_the_service_under_detach_iter_yields_every_outcome(
    fake: FakeHypervisor,
) -> None:
    batch = _six_disks(fake)
    svc = DetachService(backend=fake, settings=SLOW)
    await svc.open()
    got: list[DetachOutcome] = []

    async def consume() -> None:
        async for outcome in svc.detach_iter(batch):
            got.append(outcome)

    task = asyncio.create_task(consume())
    await _until(lambda: len(svc.pending()) > 0)
    await svc.aclose()
    async with asyncio.timeout(10):
        await task
    assert sorted(o.index for o in got) == list(range(6))


# -- the global bound -----------------------------------------------------------------


async def test_concurrency_bounds_the_unplugs_in_flight_across_domains(
    fake: FakeHypervisor,
) -> None:
    doms = [fake.add_domain(f"vm-{i}") for i in range(6)]
    for d in doms:
        for j in range(3):
            d.add_disk(f"vd{j}", alias=f"ua-{j}", unplug=Unplug.manual())
    batch = [{"domain": d.name, "alias": f"ua-{j}"} for d in doms for j in range(3)]
    async with DetachService(backend=fake, settings=SLOW) as svc:
        task = asyncio.create_task(svc.detach_many(batch, concurrency=4, per_domain=1))
        await _until(lambda: len(svc.pending()) == 4)
        await asyncio.sleep(0.2)  # no fifth one follows
        assert len(svc.pending()) == 4
        assert len({uuid for uuid, _ in svc.pending()}) == 4
        most = 4
        while not task.done():
            for uuid, alias in svc.pending():
                fake.complete(uuid, alias)
            most = max(most, len(svc.pending()))
            await asyncio.sleep(0.02)
        outcomes = await task
    assert all(o.ok for o in outcomes)
    assert most <= 4


async def test_without_a_per_domain_bound_one_at_a_time_keeps_the_order(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = fake.add_domain("vm-a")
    for i in range(3):
        vm.add_disk(f"vd{i}", alias=f"ua-a{i}")
    outcomes = await svc.detach_many(
        [{"domain": "vm-a", "alias": f"ua-a{i}"} for i in range(3)],
        per_domain=None,
        concurrency=1,
    )
    assert all(o.ok for o in outcomes)
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert [r.alias for r in fake.requests] == ["ua-a0", "ua-a1", "ua-a2"]


# -- fleets ---------------------------------------------------------------------------


def _host(uri: str, n: int = 3) -> FakeHypervisor:
    hv = FakeHypervisor(uri)
    vm = hv.add_domain("vm-1")
    for i in range(n):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug.later(0.02))
    return hv


def _fleet_batch(uri: str, n: int = 3) -> list[dict[str, str]]:
    return [{"uri": uri, "domain": "vm-1", "alias": f"ua-{i}"} for i in range(n)]


async def test_a_dead_host_is_tried_again_by_the_next_batch() -> None:
    good, dead = _host("good"), _host("dead")
    dead.daemon_up = False
    hosts = {"good": good, "dead": dead}
    settings = DetachSettings(attempts=3, timeout=5, reconnect_timeout=2.0, connect_timeout=1.0)
    try:
        async with DetachFleet(settings=settings, backend_factory=hosts.__getitem__) as fleet:
            first = await fleet.detach_many(
                _fleet_batch("dead") + _fleet_batch("good"), concurrency=2
            )
            assert dead.calls.count("open") == 1
            assert all(isinstance(o.error, ConnectionLost) for o in first[:3])
            assert all(o.ok for o in first[3:])
            dead.daemon_up = True
            again = await fleet.detach_many(_fleet_batch("dead"))
            assert all(o.ok for o in again), [o.error for o in again]
    finally:
        good.cancel_timers()
        dead.cancel_timers()


async def test_nothing_of_a_fleet_runs_after_its_close_returned(gate: threading.Event) -> None:
    hung = _host("hung")
    _hang(hung, gate, ("open",))
    settings = DetachSettings(attempts=3, timeout=5, reconnect_timeout=2.0, connect_timeout=60.0)
    base = set(asyncio.all_tasks())
    fleet = DetachFleet(settings=settings, backend_factory=lambda _u: hung)
    task = asyncio.create_task(fleet.detach("hung", "vm-1", alias="ua-0"))
    await asyncio.sleep(0.3)
    await fleet.aclose()
    left = [repr(t) for t in asyncio.all_tasks() - base if t is not task]
    gate.set()
    with pytest.raises(ServiceClosed):
        await asyncio.wait_for(task, 10)
    await _until(lambda: not hung.connected)
    assert left == []


async def test_two_concurrent_fleet_batches_share_one_connection() -> None:
    hv = _host("h", n=6)
    settings = DetachSettings(attempts=3, timeout=5, reconnect_timeout=2.0)
    try:
        async with DetachFleet(settings=settings, backend_factory=lambda _u: hv) as fleet:
            batch = _fleet_batch("h", 6)
            a, b = await asyncio.gather(fleet.detach_many(batch[:3]), fleet.detach_many(batch[3:]))
            assert all(o.ok for o in a + b)
            assert hv.calls.count("open") == 1
            out = await fleet.detach_many(batch[:1])
            assert not out[0].ok  # the device is gone by now
    finally:
        hv.cancel_timers()


async def test_fleet_items_without_a_uri_go_to_the_default_uri() -> None:
    hv = _host("default:///", n=2)
    settings = DetachSettings(attempts=3, timeout=5, reconnect_timeout=2.0)
    try:
        async with DetachFleet(
            settings=settings, backend_factory=lambda _u: hv, default_uri="default:///"
        ) as fleet:
            outcomes = await fleet.detach_many(
                [
                    {"domain": "vm-1", "alias": "ua-0"},
                    {"uri": "default:///", "domain": "vm-1", "alias": "ua-1"},
                ]
            )
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        assert hv.calls.count("open") == 1
    finally:
        hv.cancel_timers()


# -- a partition that hangs every call ------------------------------------------------


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


# -- libvirt's event hooks across loops -----------------------------------------------

PRELUDE = """
import asyncio, os, threading, time, libvirt, aiodetach
R = libvirt.VIR_EVENT_HANDLE_READABLE
libvirt.virEventInvokeFreeCallback = lambda opaque: None
def in_thread(fn, *a):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*a))); t.start(); t.join()
    return out[0]
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_watches_and_timers_changed_between_loops_follow_every_new_loop() -> None:
    """A timer disabled and another added from threads while no loop runs;
    three loops in a row; everything removed with no loop; then a fourth."""
    out = _run(
        """
        hits = []
        r, w = os.pipe()
        state = {}
        async def first():
            aiodetach.install_event_loop()
            state["watch"] = in_thread(
                libvirt.virEventAddHandle, r, R,
                lambda wt, fd, ev, o: hits.append(os.read(fd, 1)), None)
            state["timer"] = in_thread(
                libvirt.virEventAddTimeout, 20, lambda t, o: hits.append("tick"), None)
            await asyncio.sleep(0.1)
        asyncio.run(first())
        assert "tick" in hits
        in_thread(libvirt.virEventUpdateTimeout, state["timer"], -1)
        t2 = in_thread(libvirt.virEventAddTimeout, 10, lambda t, o: hits.append("tick2"), None)
        for n in range(3):
            hits.clear()
            async def again():
                aiodetach.install_event_loop()
                os.write(w, b"z")
                await asyncio.sleep(0.15)
            asyncio.run(again())
            assert b"z" in hits, (n, hits)
            assert "tick" not in hits, (n, hits)
            assert "tick2" in hits, (n, hits)
        in_thread(libvirt.virEventRemoveHandle, state["watch"])
        in_thread(libvirt.virEventRemoveTimeout, state["timer"])
        in_thread(libvirt.virEventRemoveTimeout, t2)
        os.close(r); os.close(w)
        async def last():
            impl = aiodetach.install_event_loop()
            await impl.settle()
            hits.clear()
            await asyncio.sleep(0.1)
            assert hits == [], hits
            assert impl.is_idle(), impl
        asyncio.run(last())
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert "event_hook_failed" not in out.stdout + out.stderr, out.stdout[-2000:]


def test_a_second_loop_running_at_once_is_a_conflict_and_works_after_the_first_ends() -> None:
    out = _run(
        """
        started = threading.Event(); stop = threading.Event()
        def other():
            async def m():
                aiodetach.install_event_loop()
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
            asyncio.run(m())
        th = threading.Thread(target=other); th.start(); started.wait(5)
        async def mine():
            try:
                aiodetach.install_event_loop()
            except aiodetach.errors.EventLoopConflict:
                return "conflict"
            return "no conflict"
        print(asyncio.run(mine()))
        stop.set(); th.join()
        r, w = os.pipe()
        async def after():
            aiodetach.install_event_loop()
            got = asyncio.Event(); loop = asyncio.get_running_loop()
            in_thread(libvirt.virEventAddHandle, r, R, lambda *a: loop.call_soon(got.set), None)
            os.write(w, b"x")
            await asyncio.wait_for(got.wait(), 2)
            return "after ok"
        print(asyncio.run(after()))
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["conflict", "after ok"], out.stdout[-800:]


def test_a_watch_on_an_fd_closed_between_loops_strands_no_other_watch() -> None:
    """An fd closed between loops whose watch libvirt has not removed yet: the
    next loop still serves the other watches, and the late removal works."""
    out = _run(
        """
        state = {}
        async def first():
            aiodetach.install_event_loop()
            r, w = os.pipe()
            state["fds"] = (r, w)
            state["watch"] = in_thread(libvirt.virEventAddHandle, r, R, lambda *a: None, None)
            await asyncio.sleep(0.05)
        asyncio.run(first())
        for fd in state["fds"]:
            os.close(fd)
        async def second():
            aiodetach.install_event_loop()
            r, w = os.pipe()
            got = asyncio.Event(); loop = asyncio.get_running_loop()
            in_thread(libvirt.virEventAddHandle, r, R, lambda *a: loop.call_soon(got.set), None)
            os.write(w, b"x")
            await asyncio.wait_for(got.wait(), 2)
            assert in_thread(libvirt.virEventRemoveHandle, state["watch"]) == 0
            await asyncio.sleep(0.05)
            print("ok")
        asyncio.run(second())
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
