"""detach_many / detach_iter and the fleet, against fake hypervisors.

Batches given as generators, odd mappings or bad items (nothing sent), bounds
(concurrency across domains, one at a time per domain), a progress callback
that raises, a batch cancelled or closed under its caller, and fleets reused
after a dead host or closed while they run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, OrderedDict, UserDict
from collections.abc import Iterator
from typing import Any

import pytest

from aiodetach import DetachFleet, DetachOutcome, DetachRequest, DetachService, DetachSettings
from aiodetach.errors import (
    BatchAborted,
    ConnectionLost,
    DetachFailed,
    DetachTimeout,
    DeviceNotFound,
    InvalidRequest,
    ServiceClosed,
)
from aiodetach.testing import FakeHypervisor, Unplug

from ._gate_fake import GateFake, holding, settle


def _populate(
    fake: FakeHypervisor, domains: int, disks: int, unplug: Unplug
) -> list[dict[str, str]]:
    requests = []
    for d in range(domains):
        vm = fake.add_domain(f"vm{d}")
        for i in range(disks):
            vm.add_disk(f"sd{chr(97 + i)}", alias=f"ua-{i}", unplug=unplug)
            requests.append({"domain": f"vm{d}", "alias": f"ua-{i}"})
    return requests


async def test_detach_many_isolates_failures(fake: FakeHypervisor, fast: DetachSettings) -> None:
    requests = _populate(fake, 3, 4, Unplug.later(0.01))
    fake.domain("vm1").live_device("ua-2").unplug = Unplug.reject()  # type: ignore[union-attr]
    fake.domain("vm2").live_device("ua-3").unplug = Unplug.never()  # type: ignore[union-attr]
    requests.append({"domain": "vm0", "alias": "ua-missing"})
    progress: list[tuple[int, int]] = []
    async with DetachService(backend=fake, settings=fast) as svc:
        outcomes = await svc.detach_many(
            requests, concurrency=5, on_progress=lambda o, n, t: progress.append((n, t))
        )
    assert [o.index for o in outcomes] == list(range(13))
    errors = {o.request.describe(): type(o.error) for o in outcomes if not o.ok}
    assert errors == {
        "vm1 alias=ua-2": DetachFailed,
        "vm2 alias=ua-3": DetachTimeout,
        "vm0 alias=ua-missing": DeviceNotFound,
    }
    assert sum(o.ok for o in outcomes) == 10
    assert progress[-1] == (13, 13)
    assert [n for n, _ in progress] == list(range(1, 14))


async def test_concurrency_and_per_domain_bounds(fake: FakeHypervisor) -> None:
    requests = _populate(fake, 4, 5, Unplug.manual())
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        it = svc.detach_iter(requests, concurrency=6, per_domain=2)

        async def next_outcome() -> DetachOutcome:
            return await anext(it)

        first = asyncio.create_task(next_outcome())
        for _ in range(50):
            await asyncio.sleep(0.01)
        pending = svc.pending()
        per_domain: dict[str, int] = {}
        for uuid, _alias in pending:
            per_domain[uuid] = per_domain.get(uuid, 0) + 1
        assert len(pending) == 6
        assert max(per_domain.values()) == 2
        assert len(per_domain) == 3 or len(per_domain) == 4
        for uuid, alias in pending:
            fake.complete(uuid, alias)
        outcome = await first
        assert outcome.ok
        await it.aclose()  # closing early cancels the rest
        assert svc.pending() == []


async def test_batch_is_validated_up_front(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    with pytest.raises(InvalidRequest, match="exactly one"):
        await svc.detach_many([{"domain": "vm", "alias": "ua-d"}, {"domain": "vm"}])
    with pytest.raises(InvalidRequest):
        await svc.detach_many([{"domain": "vm", "alias": "ua-d", "bogus": 1}])
    assert fake.requests == []


async def test_detach_many_accepts_models(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    outcomes = await svc.detach_many([DetachRequest(domain="vm", target="vdb", persistent=False)])
    assert isinstance(outcomes[0], DetachOutcome)
    assert outcomes[0].result is not None
    assert outcomes[0].result.persistent is False


async def test_fleet_routes_by_uri_and_isolates_hosts(fast: DetachSettings) -> None:
    hosts = {
        "fake://a": FakeHypervisor("fake://a"),
        "fake://b": FakeHypervisor("fake://b"),
        "fake://down": FakeHypervisor("fake://down"),
    }
    hosts["fake://down"].daemon_up = False
    for hv in hosts.values():
        hv.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.01))
    async with DetachFleet(settings=fast, backend_factory=hosts.__getitem__) as fleet:
        outcomes = await fleet.detach_many(
            [{"uri": uri, "domain": "vm", "alias": "ua-d"} for uri in hosts]
        )
        assert [o.ok for o in outcomes] == [True, True, False]
        assert isinstance(outcomes[2].error, ConnectionLost)
        assert sorted(fleet.uris) == ["fake://a", "fake://b"]
        single = await fleet.service("fake://a")
        assert single is await fleet.service("fake://a")
    assert len(hosts["fake://a"].requests) == 1
    assert len(hosts["fake://b"].requests) == 1
    assert not hosts["fake://a"].connected


async def test_fleet_concurrent_first_use_opens_once(fast: DetachSettings) -> None:
    hv = FakeHypervisor("fake://a")
    async with DetachFleet(settings=fast, backend_factory=lambda _u: hv) as fleet:
        services = await asyncio.gather(*(fleet.service("fake://a") for _ in range(5)))
    assert len({id(s) for s in services}) == 1
    assert hv.opens == 1


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_fleet_batch_shares_reads_and_each_outcome_named() -> None:
    fakes = {}
    for host in ("a", "b"):
        fk = GateFake()
        fk._uri = f"fake://{host}/system"
        dom = fk.add_domain("vm")
        for i in range(5):
            dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.01))
        fakes[fk.uri] = fk
    async with DetachFleet(backend_factory=lambda uri: fakes[uri]) as fleet:
        outcomes = await fleet.detach_many(
            [{"uri": uri, "domain": "vm", "alias": f"ua-d{i}"} for uri in fakes for i in range(5)]
        )
    assert all(o.error is None for o in outcomes)
    for fk in fakes.values():
        assert len(fk.requests) == 5


async def test_detach_iter_closed_early_while_reads_in_flight(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(12):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.02))
    async with DetachService(backend=gf) as svc:
        gf.hold["live"] = gate = threading.Event()
        it = svc.detach_iter(
            [{"domain": "vm", "alias": f"ua-d{i}"} for i in range(12)], per_domain=None
        )
        first = asyncio.create_task(it.__anext__())
        await holding(gf, "live")
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        closer = asyncio.create_task(it.aclose())  # cancels and awaits what runs
        await settle()
        gate.set()
        await closer
        await settle(0.2)
        assert svc.pending() == []
        again = await svc.detach("vm", alias="ua-d5")
        assert again.live
    assert _others() == set()
    assert Counter(r.alias for r in gf.requests)["ua-d5"] == 1


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


_GOES_ON = ("Unplug._drive", "PersistentStep._config_detach", "SharedReads._run")


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
    # The third disk's (held) unplug: the two quick ones are pending for a
    # moment too, and a loaded machine's poll can see them.
    await _until(lambda: any(alias == "ua-2" for _, alias in svc.pending()))
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
