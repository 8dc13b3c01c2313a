"""detach_many / detach_iter and the fleet, against fake hypervisors."""

from __future__ import annotations

import asyncio

import pytest

from aiodetach import DetachFleet, DetachOutcome, DetachRequest, DetachService, DetachSettings
from aiodetach.errors import (
    ConnectionLost,
    DetachFailed,
    DetachTimeout,
    DeviceNotFound,
    InvalidRequest,
)
from aiodetach.testing import FakeHypervisor, Unplug


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
