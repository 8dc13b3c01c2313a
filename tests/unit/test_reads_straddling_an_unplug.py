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
import gc
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach._unplug import Unplug as _LiveUnplug  # only to count live objects (gc)
from aiodetach.errors import DetachError, DetachFailed, DeviceNotFound, ServiceClosed
from aiodetach.instrumentation import DetachRecord, UnplugRecord, otel_hook
from aiodetach.testing import Unplug

from ._gate_fake import GateFake, held, holding, settle
from ._journal_support import journal_settings, killed_mid_unplug


def _selector(how: str) -> dict[str, Any]:
    return {"alias": {"alias": "ua-d"}, "target": {"target": "sdb"}}[how]


async def _first_caller_pending(gf: GateFake, svc: DetachService, **kw: Any) -> asyncio.Task[Any]:
    first = asyncio.create_task(svc.detach("vm", alias="ua-d", **kw))
    for _ in range(100):
        await settle(0.01)
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
        late, gate = await held(
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
        late, gate = await held(
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
            await settle(0.01)
            if gf.requests:
                break
        late, gate = await held(gf, "lookup", svc.detach("vm", target="sdb"))
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
        late, gate = await held(gf, "lookup", svc.detach("vm", alias="ua-d", persistent=False))
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
        late, gate = await held(gf, "live", svc.detach("vm", alias="ua-d", persistent=False))
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


HOSTDEV_XML = (
    "<hostdev mode='subsystem' type='pci'><source>"
    "<address domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>"
    "</source></hostdev>"
)


class Rec:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def __call__(self, record: Any) -> None:
        self.records.append(record)


async def _wait_requests(gf: GateFake, n: int = 1) -> None:
    for _ in range(300):
        if len(gf.requests) >= n:
            return
        await settle(0.01)
    raise AssertionError(f"{n} request(s) never reached the fake: {gf.requests}")


def _by(i: int) -> dict[str, Any]:
    return {"alias": "ua-d"} if i % 2 else {"target": "sdb"}


def _live_unplugs(uuid: str) -> list[_LiveUnplug]:
    """Unplug objects of this domain still alive (gc; ``Unplug`` has no weakref slot)."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, _LiveUnplug) and o.key[0] == uuid]


@pytest.mark.parametrize("persistent", [None, False])
async def test_caller_begun_while_unplug_in_flight_joins_it_though_device_already_left_live_xml(
    gf: GateFake, persistent: bool | None
) -> None:
    """libvirt removes the device from the live definition, then its
    DEVICE_REMOVED travels to us: between the two, the unplug is still in
    flight (``pending()`` lists it) but a read no longer shows the device.
    A caller that begins in that window began *before* the unplug ended, so
    it must share it (joined, live=True), not raise DeviceNotFound."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        gf.complete("vm", "ua-d", emit=False)  # gone from the XML, event still in transit
        assert svc.pending() != []
        late = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=persistent))
        await settle(0.1)  # the late caller has read: the device is not in it
        gf.emit_removed("vm", "ua-d")  # the event lands: the unplug ends now
        one = await asyncio.wait_for(first, 5)
        two = await asyncio.wait_for(late, 5)  # actual: DeviceNotFound
    assert one.live
    assert (two.live, two.joined) == (True, True)
    assert len(gf.requests) == 1


@pytest.mark.parametrize("transient", [False, True])
async def test_hostdev_named_by_xml_read_after_removal_shares_it(
    gf: GateFake, transient: bool
) -> None:
    """Named by XML, a hostdev is matched by its source address.  A late
    caller whose reads come after the first caller's unplug (and config
    detach) removed it began before that ended: it must share it, as a disk
    named by target does (test_read_after_the_removal_shares_it)."""
    dom = gf.add_domain("vm", persistent=not transient)
    dev = dom.add_hostdev("0x05", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", xml=HOSTDEV_XML))
        await _wait_requests(gf)
        late, gate = await held(
            gf, "lookup", svc.detach("vm", xml=HOSTDEV_XML)
        )  # it has begun; its reads come after the removal
        gf.complete("vm", dev.alias)
        one = await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)  # actual: DeviceNotFound
    assert (two.live, two.joined) == (True, True)
    assert two.persistent is one.persistent
    assert len(gf.requests) == 1


async def test_hostdev_named_by_xml_live_only_read_after_removal_shares_it(
    gf: GateFake,
) -> None:
    """The same with ``persistent=False`` on a persistent domain (no
    persistent copy read, nothing but the selector to match by)."""
    dom = gf.add_domain("vm")
    dev = dom.add_hostdev("0x05", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", xml=HOSTDEV_XML, persistent=False))
        await _wait_requests(gf)
        late, gate = await held(gf, "lookup", svc.detach("vm", xml=HOSTDEV_XML, persistent=False))
        gf.complete("vm", dev.alias)
        await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert (two.live, two.persistent, two.joined) == (True, False, True)


async def test_straddler_asking_persistent_true_by_libvirt_alias_gets_its_persistent_half(
    gf: GateFake,
) -> None:
    """First caller: live only.  Late caller: persistent=True, by the
    libvirt-assigned alias, reads after the unplug removed the device.  Its
    live half is shared; its persistent half must be done (the disk is still
    in the persistent definition, found by its target as a non-straddling
    caller finds it) or raise -- never a silent ``persistent=False``."""
    dom = gf.add_domain("vm")
    dev = dom.add_disk("sdb", unplug=Unplug.manual())  # alias "disk1", live XML only
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias=dev.alias, persistent=False))
        await _wait_requests(gf)
        late, gate = await held(gf, "lookup", svc.detach("vm", alias=dev.alias, persistent=True))
        gf.complete("vm", dev.alias)
        await asyncio.wait_for(first, 5)
        gate.set()
        try:
            two: DetachResult | DetachError = await asyncio.wait_for(late, 5)
        except DetachError as exc:
            two = exc
    assert dev.config is False or isinstance(two, DetachError), (
        f"persistent=True answered {two!r} while the disk is still in the persistent definition"
    )
    if isinstance(two, DetachResult):
        assert (two.live, two.persistent) == (True, True)


async def test_straddler_by_libvirt_alias_default_flags_gets_the_persistent_half_too(
    gf: GateFake,
) -> None:
    """Same, default flags (both halves of a persistent running domain): a
    caller that read *before* the removal detaches the disk from the
    persistent definition (found there by target); one that read after must
    not end with the disk still defined and ``persistent=False``."""
    dom = gf.add_domain("vm")
    dev = dom.add_disk("sdb", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias=dev.alias, persistent=False))
        await _wait_requests(gf)
        late, gate = await held(gf, "lookup", svc.detach("vm", alias=dev.alias))
        gf.complete("vm", dev.alias)
        await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert (two.live, two.joined) == (True, True)
    assert (two.persistent, dev.config) == (True, False)


async def test_late_caller_shares_its_unplug_though_the_alias_was_unplugged_again_since(
    gf: GateFake,
) -> None:
    """The late caller's live read shows disk sdb (ua-d).  Before it joins,
    sdb's unplug ends, a disk sdc is attached under ua-d and unplugged by a
    third caller.  The late caller's device was removed by the first unplug:
    it must share that one, not send a request for ua-d (gone) of its own
    (the registry keeps every unplug of the alias that ended meanwhile, and
    picks the one whose device has the identity the caller read)."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        late, gate = await held(
            gf, "inactive", svc.detach("vm", alias="ua-d")
        )  # its live read showed sdb
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        dom.add_disk("sdc", alias="ua-d", unplug=Unplug.now(), config=False)
        third = await asyncio.wait_for(svc.detach("vm", alias="ua-d", persistent=False), 5)
        assert third.device == "disk target='sdc' alias='ua-d'"
        calls_before = gf.calls.count("detach_live")
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert gf.calls.count("detach_live") == calls_before, "a request was sent for a gone alias"
    assert (two.live, two.joined) == (True, True)
    assert two.device == "disk target='sdb' alias='ua-d'"


async def test_late_caller_is_not_handed_the_unplug_of_a_device_attached_under_its_alias_since(
    gf: GateFake,
) -> None:
    """The late caller's live read shows disk sdb (ua-d).  Before it joins,
    sdb's unplug ends (removed), disk sdc is attached under ua-d and a third
    caller's unplug of sdc is in flight.  The late caller's device is gone:
    it must share sdb's outcome, not wait on (and inherit the failure of)
    sdc's unplug (identity is checked against what is in flight too)."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        late, gate = await held(
            gf, "inactive", svc.detach("vm", alias="ua-d")
        )  # its live read showed sdb
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        dom.add_disk("sdc", alias="ua-d", unplug=Unplug.manual(), config=False)
        third = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await _wait_requests(gf, 2)
        gate.set()
        await settle(0.1)
        gf.reject("vm", "ua-d")  # the guest refuses to give sdc up
        with pytest.raises(DetachError):
            await asyncio.wait_for(third, 5)
        two = await asyncio.wait_for(late, 5)  # actual: DetachFailed (sdc's outcome)
    assert (two.live, two.joined) == (True, True)
    assert two.device == "disk target='sdb' alias='ua-d'"


async def test_control_a_joiner_by_libvirt_alias_while_in_flight_does_the_persistent_half(
    gf: GateFake,
) -> None:
    """Control for section 3: a caller that reads while the unplug is still in
    flight finds the disk's persistent copy by target and detaches it."""
    dom = gf.add_domain("vm")
    dev = dom.add_disk("sdb", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias=dev.alias, persistent=False))
        await _wait_requests(gf)
        late = asyncio.create_task(svc.detach("vm", alias=dev.alias, persistent=True))
        await settle(0.1)
        gf.complete("vm", dev.alias)
        await asyncio.wait_for(first, 5)
        two = await asyncio.wait_for(late, 5)
    assert (two.live, two.persistent, two.joined, dev.config) == (True, True, True, False)


async def test_many_late_callers_by_name_and_uuid_share_one_request_and_records_pair(
    gf: GateFake,
) -> None:
    """Ten late callers (by name, by UUID, by target) all began before the
    unplug ended and read after: each shares it (joined, both halves), one
    request, one config detach; every ``started`` DetachRecord has its
    ``finished``, every UnplugRecord ``started`` its ``ended``, and each
    sharer's ``unplug_joined`` names the unplug that removed the device."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    rec = Rec()
    async with DetachService(backend=gf, hooks=[rec]) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        gf.hold["lookup"] = gate = threading.Event()
        names = ["vm", dom.uuid, dom.uuid.upper()]
        late = [asyncio.create_task(svc.detach(names[i % 3], **_by(i))) for i in range(10)]
        await holding(gf, "lookup")
        await settle(0.05)
        gf.complete("vm", "ua-d")
        one = await asyncio.wait_for(first, 5)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*late, return_exceptions=True), 5)
        assert svc.pending() == []
    oks = [r for r in results if isinstance(r, DetachResult)]
    assert len(oks) == len(results), results
    assert all((r.live, r.persistent, r.joined) == (True, True, True) for r in oks)
    assert {r.alias for r in oks} == {"ua-d"}
    assert len(gf.requests) == 1
    assert len(gf.config_requests) == 1
    assert one.live
    assert one.persistent
    detach = [r for r in rec.records if isinstance(r, DetachRecord)]
    started = {r.detach_id for r in detach if r.kind == "started"}
    finished = [r.detach_id for r in detach if r.kind == "finished"]
    assert sorted(finished) == sorted(started)
    assert len(started) == 11
    unplug = [r for r in rec.records if isinstance(r, UnplugRecord)]
    ids = {r.unplug_id for r in unplug if r.kind == "started"}
    assert ids == {r.unplug_id for r in unplug if r.kind == "ended"}
    assert len(ids) == 1
    joined = {r.unplug_id for r in detach if r.kind in ("unplug_started", "unplug_joined")}
    assert joined == ids


async def test_a_caller_that_began_after_the_end_gets_not_found_while_the_record_is_kept(
    gf: GateFake,
) -> None:
    """An older caller (another device, by UUID) is still reading, so the
    ended unplug is kept: a caller that begins after it ended must still get
    DeviceNotFound (by alias and by target), with no request sent."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    dom.add_disk("sdx", alias="ua-x", unplug=Unplug.now())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        older, gate = await held(gf, "lookup", svc.detach(dom.uuid, alias="ua-x"))
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        for kw in ({"alias": "ua-d"}, {"target": "sdb"}, {"alias": "ua-d", "live": True}):
            with pytest.raises(DeviceNotFound) as info:
                await asyncio.wait_for(svc.detach("vm", **kw), 5)
            assert info.value.domain == "vm"
        gate.set()
        await asyncio.wait_for(older, 5)
    assert len(gf.requests) == 2


async def test_nothing_is_retained_once_the_callers_are_done(gf: GateFake) -> None:
    """The ended unplug a straddler shared is kept only while a caller that
    began before its end is in flight: with an older caller (another domain)
    still reading it may stay; once that one is done no Unplug is alive."""
    dom = gf.add_domain("vm")
    other = gf.add_domain("vm2")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    other.add_disk("sdx", alias="ua-x", unplug=Unplug.now())
    assert _live_unplugs(dom.uuid) == []
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        late, gate = await held(gf, "lookup", svc.detach("vm", alias="ua-d"))
        older, gate2 = await held(gf, "live", svc.detach("vm2", alias="ua-x"))
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
        assert two.joined
        gate2.set()
        await asyncio.wait_for(older, 5)
        assert svc.pending() == []
        left = _live_unplugs(dom.uuid)
        assert left == [], "an ended unplug is still referenced with nobody in flight"


async def test_a_straddler_cancelled_while_it_reads_leaks_nothing(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    rec = Rec()
    async with DetachService(backend=gf, hooks=[rec]) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        late, gate = await held(gf, "live", svc.detach("vm", alias="ua-d"))
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        gate.set()
        await settle(0.05)
        assert svc.pending() == []
        assert _live_unplugs(dom.uuid) == []
        # A caller that begins now was never under way: not found.
        with pytest.raises(DeviceNotFound):
            await svc.detach("vm", alias="ua-d")
    fin = [r for r in rec.records if isinstance(r, DetachRecord) and r.kind == "finished"]
    assert sorted(r.outcome or "" for r in fin) == ["cancelled", "error", "removed"]
    assert len(gf.requests) == 1


async def test_aclose_while_a_straddler_holds_its_read_gives_it_service_closed(
    gf: GateFake,
) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        late, gate = await held(gf, "live", svc.detach("vm", alias="ua-d"))
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        closing = asyncio.create_task(svc.aclose())
        await settle(0.05)
        gate.set()
        await asyncio.wait_for(closing, 5)
        with pytest.raises(ServiceClosed) as info:
            await asyncio.wait_for(late, 5)
        assert (info.value.domain, info.value.alias) == ("vm", "ua-d")
        await svc.aclose()  # idempotent
    assert len(gf.requests) == 1
    assert _live_unplugs(dom.uuid) == []


async def test_detach_many_with_duplicates_and_a_straddler_sends_once(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=gf) as svc:
        batch = asyncio.create_task(
            svc.detach_many(
                [
                    {"domain": "vm", "alias": "ua-d"},
                    {"domain": dom.uuid, "target": "sdb"},
                    {"domain": "vm", "alias": "ua-d", "persistent": False},
                ],
                per_domain=None,
            )
        )
        await _wait_requests(gf)
        late, gate = await held(gf, "lookup", svc.detach("vm", alias="ua-d"))
        gf.complete("vm", "ua-d")
        outcomes = await asyncio.wait_for(batch, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
    assert all(o.ok for o in outcomes), outcomes
    assert two.joined
    assert two.live
    assert len(gf.requests) == 1


async def test_a_removal_timeout_is_not_shared(gf: GateFake) -> None:
    """Only an unplug that removed the device is shared: after DetachTimeout
    a straddler whose read showed the device sends its own request."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(timeout=0.05, attempts=1)
    async with DetachService(backend=gf, settings=settings) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await _wait_requests(gf)
        late, gate = await held(gf, "live", svc.detach("vm", alias="ua-d", persistent=False))
        with pytest.raises(DetachError):
            await asyncio.wait_for(first, 5)
        gate.set()
        with pytest.raises(DetachError):
            await asyncio.wait_for(late, 5)
    assert len(gf.requests) == 2


async def test_straddler_by_target_shares_an_unplug_taken_up_from_the_journal(
    gf: GateFake, tmp_path: Path
) -> None:
    """After a restart the journal's unfinished unplug is taken up (no device
    XML, so no tag or identity kept).  A caller by target that began before
    it ended and read after must share it like any other."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    journal = tmp_path / "j.db"
    st_ = journal_settings(timeout=5.0)
    await killed_mid_unplug(gf, journal, st_)
    async with DetachService(backend=gf, settings=st_, journal=journal) as svc:
        assert svc.pending() != []
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await settle(0.05)
        late, gate = await held(gf, "lookup", svc.detach("vm", target="sdb"))
        gf.complete("vm", "ua-d")
        one = await asyncio.wait_for(first, 5)
        assert one.resumed
        gate.set()
        two = await asyncio.wait_for(late, 5)  # actual: DeviceNotFound
    assert (two.live, two.joined) == (True, True)
    assert len(gf.requests) == 1


async def test_otel_hook_keeps_nothing_after_a_straddler_shared_an_ended_unplug(
    gf: GateFake,
) -> None:
    """The sharer's ``unplug_joined`` names an unplug whose ``ended`` record
    went out before it: once the caller finishes, the hook keeps nothing
    of it (no empty entry per shared unplug, which would grow forever).
    Inspects the hook's private maps: there is no public view of them."""
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    provider = TracerProvider()
    hook = otel_hook(provider)
    async with DetachService(backend=gf, hooks=[hook]) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _wait_requests(gf)
        late, gate = await held(gf, "lookup", svc.detach("vm", alias="ua-d"))
        gf.complete("vm", "ua-d")
        await asyncio.wait_for(first, 5)
        gate.set()
        two = await asyncio.wait_for(late, 5)
        assert two.joined
    provider.shutdown()
    assert (hook._spans, hook._waits_on) == ({}, {})  # type: ignore[attr-defined]
    assert hook._joined == {}  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 12),
    st.sampled_from(["alias", "target"]),
    st.sampled_from([None, False]),
    st.booleans(),
)
def test_late_caller_shares_iff_it_began_before_the_unplug_ended(
    steps: int, how: str, persistent: bool | None, from_thread: bool
) -> None:
    """Whatever the interleaving: a caller whose ``started`` record precedes
    the unplug's ``ended`` record shares it (live, joined, one request); one
    that began after gets DeviceNotFound.  The guest releases the device as
    libvirt does: gone from the XML, then DEVICE_REMOVED."""
    asyncio.run(_race(steps, how, persistent, from_thread))


async def _race(steps: int, how: str, persistent: bool | None, from_thread: bool) -> None:
    gf = GateFake()
    dom = gf.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=Unplug.manual())
    rec = Rec()
    sel: dict[str, Any] = {"alias": "ua-d"} if how == "alias" else {"target": "sdb"}
    try:
        async with DetachService(backend=gf, hooks=[rec], log=False) as svc:
            first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
            await _wait_requests(gf)
            if from_thread:
                done = asyncio.ensure_future(asyncio.to_thread(gf.complete, "vm", "ua-d"))
            else:
                gf.complete("vm", "ua-d")
            for _ in range(steps):
                await asyncio.sleep(0)
            late = asyncio.create_task(svc.detach("vm", persistent=persistent, **sel))
            await asyncio.wait_for(first, 5)
            outcome: Any
            try:
                outcome = await asyncio.wait_for(late, 5)
            except DeviceNotFound as exc:
                outcome = exc
            if from_thread:
                await done
    finally:
        gf.cancel_timers()
    order = [
        r.kind
        for r in rec.records
        if (isinstance(r, UnplugRecord) and r.kind == "ended")
        or (isinstance(r, DetachRecord) and r.kind == "started")
    ]
    # records: [started(first), ..., started(late), ended] or [..., ended, started(late)]
    began_before_end = order.index("ended") > 1
    if began_before_end:
        assert isinstance(outcome, DetachResult), f"{order}: {outcome!r}"
        assert (outcome.live, outcome.joined) == (True, True)
    else:
        assert isinstance(outcome, DeviceNotFound), f"{order}: {outcome!r}"
    assert len(gf.requests) == 1
