"""Batches and fleets pushed the way evacuations push them, on fake hypervisors:
a bad item anywhere, a slow domain, one domain under two names, a progress
callback that raises, a host that cannot be reached, a fleet closed while
it connects."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import pytest

from aiodetach import DetachFleet, DetachOutcome, DetachService, DetachSettings
from aiodetach.errors import (
    BatchAborted,
    ConnectionLost,
    DeviceNotFound,
    InvalidRequest,
    ServiceClosed,
)
from aiodetach.testing import FakeHypervisor, Unplug

# -- the whole batch is checked before anything is sent -----------------------------------

BAD_ITEMS: list[tuple[object, str]] = [
    ({"domain": "vm", "mac": "52:54:00:zz:00:01"}, "MAC"),
    ({"domain": "vm", "alias": ""}, "empty"),
    ({"domain": "vm", "alias": "   "}, "empty"),
    ({"domain": "vm", "alias": "ua-d1", "live": False, "persistent": False}, "nothing to detach"),
    ({"domain": "   ", "alias": "ua-d1"}, "domain"),
    ({"domain": "", "alias": "ua-d1"}, "domain"),
    ({"domain": "vm", "xml": "<disk><target dev='vdc'"}, "malformed"),
    ({"domain": "vm", "xml": "<!DOCTYPE x><disk/>"}, "DTD"),
    ({"domain": "vm", "alias": "ua d1"}, "alias"),
    ({"domain": "vm"}, "exactly one"),
    ({"domain": "vm", "alias": "ua-d1", "extra": 1}, "extra"),
    ({"domain": "vm", "alias": 7}, "alias"),
    ({"domain": "vm", "alias": "ua-d1", "uri": " "}, "uri"),
    ("vm alias=ua-d1", "mapping"),
    (["vm", "ua-d1"], "mapping"),
    (None, "mapping"),
    (42, "mapping"),
]


@pytest.mark.parametrize(("bad", "why"), BAD_ITEMS, ids=[repr(b)[:40] for b, _ in BAD_ITEMS])
@pytest.mark.parametrize("api", ["detach_many", "detach_iter"])
async def test_a_bad_item_anywhere_fails_the_batch_before_anything_is_sent(
    fake: FakeHypervisor, fast: DetachSettings, bad: object, why: str, api: str
) -> None:
    vm = fake.add_domain("vm")
    for i in range(4):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=Unplug.later(0.01))
    good: list[Any] = [{"domain": "vm", "alias": f"ua-d{i}"} for i in range(4)]
    batch = [*good[:3], bad, good[3]]

    async def run(svc: DetachService) -> None:
        if api == "detach_many":
            await svc.detach_many(batch, concurrency=8)
        else:
            async for _ in svc.detach_iter(batch, concurrency=8):
                pass

    async with DetachService(backend=fake, settings=fast) as svc:
        with pytest.raises(InvalidRequest) as info:
            await run(svc)
        await asyncio.sleep(0.05)
    err = info.value
    assert err.index == 3
    assert "index 3" in str(err)
    assert why.lower() in str(err).lower()
    assert fake.requests == []
    assert fake.config_requests == []
    assert "lookup" not in fake.calls


async def test_a_bad_item_fails_a_fleet_batch_before_any_host_is_contacted(
    fast: DetachSettings,
) -> None:
    opened: list[str] = []

    def factory(uri: str) -> FakeHypervisor:
        opened.append(uri)
        hv = FakeHypervisor(uri)
        hv.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.01))
        return hv

    batch = [{"uri": "fake://a", "domain": "vm", "alias": "ua-d"}, {"uri": "fake://b"}]
    async with DetachFleet(settings=fast, backend_factory=factory) as fleet:
        with pytest.raises(InvalidRequest) as info:
            await fleet.detach_many(batch)
    assert info.value.index == 1
    assert opened == []


@pytest.mark.parametrize("bounds", [{"concurrency": 0}, {"per_domain": 0}, {"concurrency": 1.5}])
async def test_bad_bounds_are_refused_before_anything_is_sent(
    fake: FakeHypervisor, svc: DetachService, bounds: dict[str, Any]
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    with pytest.raises(InvalidRequest):
        await svc.detach_many([{"domain": "vm", "alias": "ua-d"}], **bounds)
    assert fake.requests == []


# -- a slow domain does not starve the others -------------------------------------------


async def test_a_request_waiting_for_its_domain_holds_no_global_slot(
    fake: FakeHypervisor,
) -> None:
    slow = fake.add_domain("slow")
    for i in range(8):
        slow.add_disk(f"sd{chr(97 + i)}", alias=f"ua-s{i}", unplug=Unplug.later(0.4))
    requests: list[dict[str, str]] = [{"domain": "slow", "alias": f"ua-s{i}"} for i in range(8)]
    for d in ("fast1", "fast2"):
        vm = fake.add_domain(d)
        for i in range(4):
            vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-f{i}", unplug=Unplug.now())
            requests.append({"domain": d, "alias": f"ua-f{i}"})
    order: list[str] = []
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        async for outcome in svc.detach_iter(requests, concurrency=3, per_domain=1):
            assert outcome.ok, outcome.error
            order.append(outcome.request.domain)
    # The slow domain may use one global slot (its bound), never all three:
    # every fast device is done before the slow domain's second one.
    assert "fast1" not in order[order.index("slow") + 1 :], order
    assert order.count("slow") == 8
    first_slow = order.index("slow")
    assert order[first_slow + 1 :] == ["slow"] * 7, order


async def test_per_domain_counts_a_domain_once_whatever_it_is_called(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    for i in range(6):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=Unplug.manual())
    names = ["vm", vm.uuid]
    requests = [{"domain": names[i % 2], "alias": f"ua-d{i}"} for i in range(6)]
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        it = svc.detach_iter(requests, concurrency=16, per_domain=2)
        got: list[DetachOutcome] = []

        async def consume() -> None:
            async for outcome in it:
                got.append(outcome)

        consumer = asyncio.create_task(consume())
        most = 0
        while len(got) < 6:
            await asyncio.sleep(0.02)
            pending = svc.pending()
            most = max(most, len(pending))
            for uuid, alias in pending:
                fake.complete(uuid, alias)
        await consumer
    assert most == 2, f"{most} unplugs of one domain at once with per_domain=2"
    assert all(o.ok for o in got)
    assert fake.calls.count("lookup") <= 2 + 6, "identities are looked up once per name"


# -- a progress callback that raises ------------------------------------------------------


async def test_a_raising_progress_callback_ends_the_batch_cleanly(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    for i in range(10):
        unplug = Unplug.now() if i < 3 else Unplug.later(0.2 + 0.05 * i)
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=unplug)
    requests = [{"domain": "vm", "alias": f"ua-d{i}"} for i in range(10)]
    seen: list[int] = []

    def on_progress(outcome: DetachOutcome, done: int, total: int) -> None:
        seen.append(outcome.index)
        if done == 2:
            raise ZeroDivisionError("dashboard went away")

    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        with pytest.raises(BatchAborted) as info:
            await svc.detach_many(
                requests, concurrency=10, per_domain=None, on_progress=on_progress
            )
        err = info.value
        assert isinstance(err.__cause__, ZeroDivisionError)
        # Nothing of the batch runs on unowned.
        assert not [t for t in asyncio.all_tasks() if "_Batch._one" in repr(t.get_coro())]
        indexes = [o.index for o in err.outcomes]  # type: ignore[attr-defined]
        assert indexes == sorted(indexes)
        assert set(seen) <= set(indexes)
        assert sorted(indexes + err.unfinished) == list(range(10))
        assert all(o.ok for o in err.outcomes)  # type: ignore[attr-defined]
        # The cancelled callers' unplugs go on and are joined, not re-sent.
        again = await svc.detach_many(
            [requests[i] for i in err.unfinished], concurrency=10, per_domain=None
        )
        for outcome in again:
            # A cancelled request may have been carried out just before the
            # cancellation: its device is gone, which is all DeviceNotFound says.
            if not outcome.ok:
                assert isinstance(outcome.error, DeviceNotFound), outcome.error
                assert vm.live_device(outcome.request.alias or "") is None
        per_device = Counter(r.alias for r in fake.requests)
        assert set(per_device.values()) == {1}, f"a device got a second request: {per_device}"


async def test_leaving_detach_iter_early_leaves_nothing_running(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    for i in range(6):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=Unplug.later(0.05 * i))
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        stream = svc.detach_iter([{"domain": "vm", "alias": f"ua-d{i}"} for i in range(6)])
        async for _ in stream:
            break
        await stream.aclose()
        assert not [t for t in asyncio.all_tasks() if "_Batch._one" in repr(t.get_coro())]


# -- fleets: a dead host, a close while connecting ---------------------------------------


def _slow_dead_host(uri: str, delay: float) -> FakeHypervisor:
    hv = FakeHypervisor(uri)
    hv.daemon_up = False
    hv.before_call = lambda name: time.sleep(delay) if name == "open" else None
    return hv


async def test_an_unreachable_host_fails_its_own_requests_once_and_holds_up_no_one() -> None:
    settings = DetachSettings(timeout=5, reconnect_timeout=1)
    healthy = FakeHypervisor("fake://ok")
    vm = healthy.add_domain("vm")
    for i in range(4):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=Unplug.now())
    dead = _slow_dead_host("fake://dead", 0.5)
    hosts = {"fake://ok": healthy, "fake://dead": dead}
    requests = [{"uri": "fake://dead", "domain": "vm", "alias": f"ua-x{i}"} for i in range(10)]
    requests += [{"uri": "fake://ok", "domain": "vm", "alias": f"ua-d{i}"} for i in range(4)]
    order: list[tuple[str, bool, float]] = []
    start = time.monotonic()
    async with DetachFleet(settings=settings, backend_factory=hosts.__getitem__) as fleet:
        async for outcome in fleet.detach_iter(requests, concurrency=2):
            order.append((outcome.request.uri or "", outcome.ok, time.monotonic() - start))
    assert dead.calls.count("open") == 1, "one connect attempt per host, shared by its requests"
    ok = [t for uri, good, t in order if uri == "fake://ok"]
    failed = [(good, t) for uri, good, t in order if uri == "fake://dead"]
    assert len(ok) == 4
    assert len(failed) == 10
    assert not any(good for good, _ in failed)
    # The healthy host's detaches do not wait for the dead host's connect.
    assert max(ok) < min(t for _, t in failed), order


async def test_requests_of_a_dead_host_fail_with_connection_lost_naming_them() -> None:
    dead = FakeHypervisor("fake://dead")
    dead.daemon_up = False
    async with DetachFleet(backend_factory=lambda _u: dead) as fleet:
        outcomes = await fleet.detach_many(
            [{"uri": "fake://dead", "domain": "vm-9", "alias": "ua-z"}]
        )
    err = outcomes[0].error
    assert isinstance(err, ConnectionLost)
    assert err.domain == "vm-9"
    assert err.alias == "ua-z"


async def test_closing_a_fleet_while_a_host_connects_ends_its_batch() -> None:
    hv = FakeHypervisor("fake://slow")
    hv.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    entered = threading.Event()

    def slow_open(name: str) -> None:
        if name == "open":
            entered.set()
            time.sleep(0.5)

    hv.before_call = slow_open
    fleet = DetachFleet(backend_factory=lambda _u: hv)
    batch = asyncio.create_task(
        fleet.detach_many([{"uri": "fake://slow", "domain": "vm", "alias": "ua-d"}] * 3)
    )
    single = asyncio.create_task(fleet.detach("fake://slow", "vm", alias="ua-d"))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    await fleet.aclose()
    async with asyncio.timeout(5):
        outcomes = await batch
        with pytest.raises(ServiceClosed):
            await single
    assert [type(o.error) for o in outcomes] == [ServiceClosed] * 3
    assert hv.requests == []
    assert not hv.connected


@pytest.mark.parametrize(
    "flags", [{"live": "yes"}, {"live": 1}, {"persistent": "off"}, {"persistent": 0.0}]
)
async def test_batch_flags_are_checked_not_coerced(
    fake: FakeHypervisor, svc: DetachService, flags: dict[str, Any]
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    with pytest.raises(InvalidRequest) as info:
        await svc.detach_many([{"domain": "vm", "alias": "ua-d", **flags}])
    assert info.value.index == 0
    assert fake.requests == []


async def test_a_domain_that_does_not_exist_is_looked_up_once_per_batch(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    outcomes = await svc.detach_many(
        [{"domain": "ghost", "alias": f"ua-{i}"} for i in range(5)], per_domain=2
    )
    assert fake.calls.count("lookup") == 1
    assert [type(o.error).__name__ for o in outcomes] == ["DomainNotFound"] * 5
    assert [o.error.alias for o in outcomes if o.error] == [f"ua-{i}" for i in range(5)]


async def test_a_backend_bug_is_its_requests_error_not_the_batchs(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = fake.add_domain("vm")
    for i in range(3):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-d{i}", unplug=Unplug.now())
    fake.add_domain("broken").add_disk("vdb", alias="ua-b")
    original = fake.lookup

    def lookup(ref: str) -> Any:
        if ref == "broken":
            raise OSError("a custom backend's own bug")
        return original(ref)

    fake.lookup = lookup  # type: ignore[method-assign]
    outcomes = await svc.detach_many(
        [{"domain": "broken", "alias": "ua-b"}]
        + [{"domain": "vm", "alias": f"ua-d{i}"} for i in range(3)]
    )
    assert [o.ok for o in outcomes] == [False, True, True, True]
    err = outcomes[0].error
    assert err is not None
    assert "OSError" in str(err)
    assert err.domain == "broken"


async def test_a_fleet_detach_on_a_dead_host_names_domain_and_alias() -> None:
    dead = FakeHypervisor("fake://dead")
    dead.daemon_up = False
    async with DetachFleet(backend_factory=lambda _u: dead) as fleet:
        with pytest.raises(ConnectionLost) as info:
            await fleet.detach("fake://dead", "vm-3", alias="ua-q")
    assert info.value.domain == "vm-3"
    assert info.value.alias == "ua-q"


async def test_closing_a_fleet_returns_after_its_callers_have_their_answer() -> None:
    hv = FakeHypervisor("fake://slow")
    hv.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    gate, entered = threading.Event(), threading.Event()

    def hang(name: str) -> None:
        if name == "open":
            entered.set()
            gate.wait(30)

    hv.before_call = hang
    fleet = DetachFleet(backend_factory=lambda _u: hv)
    single = asyncio.create_task(fleet.detach("fake://slow", "vm", alias="ua-d"))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    try:
        started = time.monotonic()
        await fleet.aclose()
        assert time.monotonic() - started < 1.5
        assert single.done()
        with pytest.raises(ServiceClosed):
            single.result()
    finally:
        gate.set()
    await asyncio.sleep(0.1)
    for _ in range(100):
        if not hv.connected:
            break
        await asyncio.sleep(0.02)
    assert not hv.connected
