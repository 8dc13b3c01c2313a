"""A caller's reads and its join of the device's unplug are two steps; another
caller's unplug of the same device can end between them.

The late caller then either read the live definition *before* the removal
(it shows the device, but nothing is in flight by the time it joins) or
*after* it (the device is gone from the read).  Either way it asked for what
did happen: it shares that unplug's outcome, both halves, with no second
request and no "not found".  Each case is pinned here by holding one of the
late caller's reads in the fake (``GateFake``: the read takes its answer,
then waits) while the first caller's unplug completes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aiodetach import DetachService
from aiodetach.errors import DetachFailed, DeviceNotFound
from aiodetach.testing import Unplug

from .test_shared_reads_and_parking_edges import GateFake, _held, _settle


def _selector(how: str) -> dict[str, Any]:
    return {"alias": {"alias": "ua-d"}, "target": {"target": "sdb"}}[how]


async def _first_caller_pending(gf: GateFake, svc: DetachService, **kw: Any) -> asyncio.Task[Any]:
    first = asyncio.create_task(svc.detach("vm", alias="ua-d", **kw))
    for _ in range(100):
        await _settle(0.01)
        if gf.requests:
            break
    assert len(gf.requests) == 1
    return first


@pytest.mark.parametrize("how", ["alias", "target"])
async def test_read_before_the_removal_joins_it_after_it_ended(gf: GateFake, how: str) -> None:
    """The late caller's live read shows the device; the unplug ends before it
    joins: it shares the ended unplug instead of sending for a gone alias."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = await _first_caller_pending(gf, svc)
        late, gate = await _held(
            gf, "live", svc.detach("vm", **_selector(how))
        )  # its read took an answer that shows the device
        gf.complete("vm", "ua-d")
        one = await asyncio.wait_for(first, 5)
        assert svc.pending() == []
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert (one.live, one.persistent) == (True, True)
    assert (two.live, two.persistent, two.joined) == (True, True, True)
    assert two.alias == "ua-d"
    assert len(gf.requests) == 1
    assert len(gf.config_requests) == 1


@pytest.mark.parametrize("how", ["alias", "target"])
@pytest.mark.parametrize("persistent", [None, False])
async def test_read_after_the_removal_shares_it(
    gf: GateFake, how: str, persistent: bool | None
) -> None:
    """The late caller began before the unplug ended but read after: the
    device is in neither definition, and that is the detach it asked for."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = await _first_caller_pending(gf, svc)
        late, gate = await _held(
            gf, "lookup", svc.detach("vm", persistent=persistent, **_selector(how))
        )  # it has begun; its reads come after the removal
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert two.live
    assert two.joined
    assert two.persistent is (persistent is None)
    assert two.device == "disk target='sdb' alias='ua-d'"
    assert len(gf.requests) == 1
    assert len(gf.config_requests) == 1


async def test_libvirt_alias_read_after_removal_is_matched_by_its_persistent_copy(
    gf: GateFake,
) -> None:
    """A libvirt-assigned alias is in the live definition only; named by
    target, the device's persistent copy is gone too (the first caller's
    config detach): matched by identity through the config detach's record."""
    dom = gf.add_domain("vm")
    dev = dom.add_disk("sdb", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", target="sdb"))
        for _ in range(100):
            await _settle(0.01)
            if gf.requests:
                break
        late, gate = await _held(gf, "lookup", svc.detach("vm", target="sdb"))
        gf.complete("vm", dev.alias)
        await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert (two.live, two.persistent, two.joined) == (True, True, True)
    assert two.alias == dev.alias
    assert len(gf.requests) == 1


async def test_a_caller_that_began_after_the_removal_gets_not_found(gf: GateFake) -> None:
    """Sharing is for callers already under way: one that begins after the
    unplug ended asks for a device that is not there."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = await _first_caller_pending(gf, svc)
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        with pytest.raises(DeviceNotFound) as info:
            await svc.detach("vm", alias="ua-d")
    assert (info.value.domain, info.value.alias) == ("vm", "ua-d")
    assert len(gf.requests) == 1


async def test_a_device_attached_again_under_the_alias_gets_its_own_unplug(gf: GateFake) -> None:
    """The alias re-used by another disk, attached after the first one left
    and before the late caller read: a different identity, so a new unplug."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = await _first_caller_pending(gf, svc, persistent=False)
        late, gate = await _held(gf, "lookup", svc.detach("vm", alias="ua-d", persistent=False))
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        dom.add_disk("sdc", alias="ua-d", unplug=Unplug.now())
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert two.live
    assert not two.joined
    assert two.device == "disk target='sdc' alias='ua-d'"
    assert len(gf.requests) == 2


async def test_a_failed_unplug_is_not_shared(gf: GateFake) -> None:
    """Only an unplug that removed the device is shared: after a removal
    failure, a caller whose read showed the device starts its own."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = await _first_caller_pending(gf, svc, persistent=False)
        late, gate = await _held(gf, "live", svc.detach("vm", alias="ua-d", persistent=False))
        gf.reject("vm", "ua-d")
        with pytest.raises(DetachFailed):
            await asyncio.wait_for(first, 5)
        gate.set()
        await asyncio.sleep(0.1)
        assert len(gf.requests) == 2  # the late caller's own request
        gf.complete("vm", "ua-d")
        two = await asyncio.wait_for(late, 5)
    assert two.live
    assert not two.joined
