"""The persistent half: the same device in both definitions, one config detach
per device, and partial outcomes reported, on the fake hypervisor.

The fake, like libvirt, shows a libvirt-assigned alias (``virtio-disk1``,
``net0``, ``hostdev0``) in the live definition only.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachFailed, DetachTimeout, DeviceNotFound, ServiceClosed
from aiodetach.testing import FakeHypervisor, Unplug


@pytest.mark.parametrize("persistent", [None, True])
async def test_libvirt_alias_detaches_the_persistent_definition_too(
    fake: FakeHypervisor, svc: DetachService, persistent: bool | None
) -> None:
    """0.1: removed live, ``persistent=False``, and back at the next cold boot."""
    vm = fake.add_domain("vm")
    disk = vm.add_disk("vdb", alias="virtio-disk1")
    assert "virtio-disk1" not in vm.xml(inactive=True)
    result = await svc.detach("vm", alias="virtio-disk1", persistent=persistent)
    assert (result.live, result.persistent) == (True, True)
    assert (disk.live, disk.config) == (False, False)
    assert len(fake.config_requests) == 1


async def test_nic_and_hostdev_by_libvirt_alias(fake: FakeHypervisor, svc: DetachService) -> None:
    vm = fake.add_domain("vm")
    nic = vm.add_interface("52:54:00:AA:BB:01", alias="net0")
    hostdev = vm.add_hostdev("0x05", alias="hostdev0")
    for alias in ("net0", "hostdev0"):
        result = await svc.detach("vm", alias=alias)
        assert (result.live, result.persistent) == (True, True), alias
    assert not any((nic.live, nic.config, hostdev.live, hostdev.config))


async def test_live_only_device_by_libvirt_alias_stays_live_only(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """Hot-plugged live only: not in the persistent definition by any name."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="virtio-disk1", config=False)
    result = await svc.detach("vm", alias="virtio-disk1", persistent=True)
    assert (result.live, result.persistent) == (True, False)
    assert fake.config_requests == []


async def test_two_hostdevs_each_get_their_own_config_detach(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """0.1 coalesced config detaches on a description string: two <hostdev>s
    described alike shared one detach, the other stayed defined."""
    vm = fake.add_domain("vm")
    first = vm.add_hostdev("0x05", alias="hostdev0")
    second = vm.add_hostdev("0x06", alias="hostdev1")
    results = await asyncio.gather(
        svc.detach("vm", alias="hostdev0"), svc.detach("vm", alias="hostdev1")
    )
    assert all(r.persistent for r in results)
    assert not first.config
    assert not second.config
    assert len(fake.config_requests) == 2


async def test_persistent_only_callers_share_one_config_detach(fake: FakeHypervisor) -> None:
    """A caller that read the definition before another caller's config detach
    of the device completed joins it (0.1: sent a second, got DeviceNotFound)."""
    vm = fake.add_domain("vm", running=False)
    disk = vm.add_disk("vdb", alias="ua-d")
    detached = threading.Event()
    inactive_reads = 0
    lock = threading.Lock()

    original_xml = fake.domain_xml
    original_config = fake.detach_config

    def domain_xml(uuid: str, *, inactive: bool) -> str:
        nonlocal inactive_reads
        text = original_xml(uuid, inactive=inactive)
        with lock:
            inactive_reads += 1
            late = inactive_reads == 2
        if late:  # the second caller's read returns only after the first's detach
            detached.wait(2)
        return text

    def detach_config(uuid: str, device_xml: str) -> None:
        original_config(uuid, device_xml)
        detached.set()

    fake.domain_xml = domain_xml  # type: ignore[method-assign]
    fake.detach_config = detach_config  # type: ignore[method-assign]
    async with DetachService(backend=fake, settings=DetachSettings()) as svc:
        first = asyncio.create_task(svc.detach("vm", target="vdb"))
        await asyncio.sleep(0)
        second = asyncio.create_task(svc.detach("vm", target="vdb"))
        results = await asyncio.gather(first, second)
    assert all(r.persistent for r in results), results
    assert len(fake.config_requests) == 1
    assert not disk.config


async def test_many_persistent_only_callers(fake: FakeHypervisor, svc: DetachService) -> None:
    vm = fake.add_domain("vm", running=False)
    vm.add_disk("vdb", alias="ua-d")
    results = await asyncio.gather(*(svc.detach("vm", alias="ua-d") for _ in range(10)))
    assert all(r.persistent and not r.live for r in results)
    assert len(fake.config_requests) == 1
    with pytest.raises(DeviceNotFound):
        await svc.detach("vm", alias="ua-d")  # after they all finished: really gone


# -- partial outcomes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("unplug", "error"),
    [(Unplug.reject(), DetachFailed), (Unplug.never(), DetachTimeout)],
)
async def test_live_failure_after_persistent_says_so(
    fake: FakeHypervisor, svc: DetachService, unplug: Unplug, error: type[Exception]
) -> None:
    disk = fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=unplug)
    with pytest.raises(error) as info:
        await svc.detach("vm", alias="ua-d")
    assert getattr(info.value, "persistent_done", None) is True
    assert not disk.config


async def test_partial_flag_is_per_caller(fake: FakeHypervisor, svc: DetachService) -> None:
    """A live-only caller joined to the same failed unplug did not change the
    persistent definition: its error must not say it did."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.reject(0.2))
    outcomes: tuple[Any, ...] = await asyncio.gather(
        svc.detach("vm", alias="ua-d"),
        svc.detach("vm", alias="ua-d", persistent=False),
        return_exceptions=True,
    )
    both, live_only = outcomes
    assert isinstance(both, DetachFailed)
    assert isinstance(live_only, DetachFailed)
    assert both.persistent_done is True
    assert live_only.persistent_done is False


@pytest.mark.parametrize("selector", [{"target": "vdb"}, {"alias": "virtio-disk1"}])
async def test_caller_that_reads_after_anothers_config_detach_landed_shares_it(
    fake: FakeHypervisor, selector: dict[str, Any]
) -> None:
    """The second caller began while the first's config detach was under way,
    but read the definition only after it landed: the device is not there
    any more, and the caller still asked for what did happen."""
    vm = fake.add_domain("vm")
    disk = vm.add_disk("vdb", alias="virtio-disk1", unplug=Unplug.later(0.2))
    landed, second_began = threading.Event(), threading.Event()
    config_started = threading.Event()
    original_config = fake.detach_config

    def detach_config(uuid: str, device_xml: str) -> None:
        config_started.set()
        second_began.wait(2)  # the first caller's config detach is under way...
        original_config(uuid, device_xml)
        landed.set()

    def second_caller_reads_late(name: str) -> None:
        if name == "lookup":  # ...and the second caller reads only once it landed
            landed.wait(2)

    fake.detach_config = detach_config  # type: ignore[method-assign]
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        first = asyncio.create_task(svc.detach("vm", **selector))
        while not config_started.is_set():
            await asyncio.sleep(0.001)
        fake.before_call = second_caller_reads_late
        second = asyncio.create_task(svc.detach("vm", **selector, persistent=True))
        await asyncio.sleep(0.01)
        second_began.set()
        results = await asyncio.gather(first, second)
    assert [(r.live, r.persistent) for r in results] == [(True, True), (True, True)]
    assert len(fake.config_requests) == 1
    assert len(fake.requests) == 1
    assert not disk.config


async def _first_request(fake: FakeHypervisor) -> None:
    while not fake.requests:
        await asyncio.sleep(0.005)


async def test_caller_joining_after_the_config_half_shares_its_outcome(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """B joins A's live unplug after A removed the device from the persistent
    definition: B did not find it there, yet the device's persistent half is
    done, and B's result says so (found by a fresh-context adversary)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await _first_request(fake)
    second = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await asyncio.sleep(0.05)
    fake.complete("vm", "ua-d")
    a, b = await asyncio.gather(first, second)
    assert b.joined
    assert (a.persistent, b.persistent) == (True, True)
    assert len(fake.config_requests) == 1


async def test_joined_callers_error_says_persistent_done(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await _first_request(fake)
    second = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await asyncio.sleep(0.05)
    fake.reject("vm", "ua-d")
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(a, DetachFailed)
    assert isinstance(b, DetachFailed)
    assert (a.persistent_done, b.persistent_done) == (True, True)


async def test_caller_asking_again_after_its_deadline_keeps_persistent(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(svc.detach("vm", alias="ua-d"), 0.05)
    again = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await asyncio.sleep(0.02)
    fake.complete("vm", "ua-d")
    result = await again
    assert (result.live, result.persistent, result.joined) == (True, True, True)


async def test_service_closed_after_the_config_half_says_persistent_done(
    fake: FakeHypervisor,
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=5))
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await _first_request(fake)
    await svc.aclose()
    with pytest.raises(ServiceClosed) as info:
        await task
    assert info.value.persistent_done is True
    assert (info.value.domain, info.value.alias) == ("vm", "ua-d")
