"""The protocol against a real libvirtd + QEMU (TCG), OS-less guests.

On a guest with no OS (SeaBIOS only), a SCSI disk's unplug completes inside
QEMU at once (DEVICE_REMOVED ~50 ms later), while a PCI (virtio-blk) unplug
is never acknowledged: the timeout-and-resend path runs for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from _probes import loop_lag
from aiodetach import DetachService, DetachSettings
from aiodetach.errors import (
    DetachTimeout,
    DeviceNotFound,
    DomainNotFound,
    DomainNotRunning,
    DomainStopped,
    InvalidRequest,
)
from aiodetach_lab import domains as _lab
from aiodetach_lab.requests import RequestLog

DISKS = (
    _lab.DiskSpec("sda", "scsi", alias="ua-scsi1"),
    _lab.DiskSpec("sdb", "scsi", alias="ua-scsi2"),
    _lab.DiskSpec("vdb", "virtio", alias="ua-blk1"),
    _lab.DiskSpec("vdc", "virtio"),
)
NICS = (_lab.NicSpec("52:54:00:12:34:56", alias="ua-net1"),)


@pytest.fixture
def domain(libvirtd: str) -> Iterator[_lab.LabDomain]:
    with _lab.throwaway_domain(libvirtd, disks=DISKS, nics=NICS) as dom:
        yield dom


def _xml(uri: str, name: str, flags: int = 0) -> str:
    conn = libvirt.open(uri)
    try:
        return str(conn.lookupByName(name).XMLDesc(flags))
    finally:
        conn.close()


async def test_scsi_disk_detaches_by_event_live_and_persistent(
    libvirtd: str, domain: _lab.LabDomain
) -> None:
    async with DetachService(libvirtd) as svc:
        result = await svc.detach(domain.name, alias="ua-scsi1")
    assert (result.live, result.persistent) == (True, True)
    assert result.confirmed_by == "event"
    assert result.attempts == 1
    assert result.elapsed < 5
    assert "ua-scsi1" not in _xml(libvirtd, domain.name)
    assert "ua-scsi1" not in _xml(libvirtd, domain.name, libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "ua-scsi2" in _xml(libvirtd, domain.name)


async def test_scsi_by_target_and_uuid_on_a_second_loop(
    libvirtd: str, domain: _lab.LabDomain
) -> None:
    # Every test has its own event loop: events must still arrive here.
    async with DetachService(libvirtd) as svc:
        result = await svc.detach(domain.uuid, target="sdb", persistent=False)
    assert result.confirmed_by == "event"
    assert "ua-scsi2" in _xml(libvirtd, domain.name, libvirt.VIR_DOMAIN_XML_INACTIVE)


async def test_pci_disk_on_osless_guest_times_out_after_exactly_attempts(
    libvirtd: str, domain: _lab.LabDomain, sent: RequestLog
) -> None:
    settings = DetachSettings(attempts=3, timeout=1.0)
    async with DetachService(libvirtd, settings=settings) as svc:
        started = time.monotonic()
        with pytest.raises(DetachTimeout) as info:
            await svc.detach(domain.name, alias="ua-blk1", persistent=False)
        elapsed = time.monotonic() - started
    assert [r.alias for r in sent.accepted()] == ["ua-blk1"] * 3
    assert info.value.attempts == 3
    assert (info.value.domain, info.value.alias) == (domain.name, "ua-blk1")
    assert 3.0 <= elapsed < 10
    assert "ua-blk1" in _xml(libvirtd, domain.name)


async def test_two_concurrent_callers_send_one_request(
    libvirtd: str, domain: _lab.LabDomain, sent: RequestLog
) -> None:
    settings = DetachSettings(attempts=1, timeout=1.0)
    async with DetachService(libvirtd, settings=settings) as svc:
        results = await asyncio.gather(
            svc.detach(domain.name, alias="ua-blk1", persistent=False),
            svc.detach(domain.name, target="vdb", persistent=False),
            return_exceptions=True,
        )
    assert all(isinstance(r, DetachTimeout) for r in results), results
    assert [r.alias for r in sent.accepted()] == ["ua-blk1"]


async def test_nic_by_mac_is_sent_and_times_out_without_os(
    libvirtd: str, domain: _lab.LabDomain, sent: RequestLog
) -> None:
    async with DetachService(libvirtd, settings=DetachSettings(attempts=1, timeout=0.5)) as svc:
        with pytest.raises(DetachTimeout):
            await svc.detach(domain.name, mac="52:54:00:12:34:56", persistent=False)
    assert [r.alias for r in sent.accepted()] == ["ua-net1"]


async def test_persistent_only_detach_of_a_shut_off_domain(libvirtd: str) -> None:
    with _lab.throwaway_domain(libvirtd, disks=DISKS, start=False) as dom:
        async with DetachService(libvirtd) as svc:
            result = await svc.detach(dom.name, target="vdb")
            with pytest.raises(DomainNotRunning):
                await svc.detach(dom.name, target="vdc", live=True)
        assert (result.live, result.persistent, result.attempts) == (False, True, 0)
        inactive = _xml(libvirtd, dom.name, libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert "dev='vdb'" not in inactive
        assert "dev='vdc'" in inactive


async def test_live_only_device_on_persistent_domain(libvirtd: str, domain: _lab.LabDomain) -> None:
    # Hot-plug a SCSI disk live only: the persistent detach says "not found",
    # which is ignored because a live detach follows.
    extra = domain.workdir / "hot.img"
    with extra.open("wb") as fh:
        fh.truncate(1 << 20)
    conn = libvirt.open(libvirtd)
    try:
        dom = conn.lookupByName(domain.name)
        dom.attachDeviceFlags(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{extra}'/><target dev='sdc' bus='scsi'/>"
            "<alias name='ua-hot'/></disk>",
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )
    finally:
        conn.close()
    async with DetachService(libvirtd) as svc:
        result = await svc.detach(domain.name, alias="ua-hot", live=True, persistent=True)
    assert (result.live, result.persistent) == (True, False)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"alias": "ua-nope"}, DeviceNotFound),
        ({"target": "vdz"}, DeviceNotFound),
        ({"mac": "52:54:00:99:99:99"}, DeviceNotFound),
        ({"xml": "<disk><target dev='vdb'"}, InvalidRequest),
    ],
)
async def test_bad_device_requests_leave_the_domain_alone(
    libvirtd: str, domain: _lab.LabDomain, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    before = (
        _xml(libvirtd, domain.name),
        _xml(libvirtd, domain.name, libvirt.VIR_DOMAIN_XML_INACTIVE),
    )
    async with DetachService(libvirtd) as svc:
        with pytest.raises(error) as info:
            await svc.detach(domain.name, **kwargs)
    if error is DeviceNotFound:
        assert info.value.domain == domain.name  # type: ignore[attr-defined]
    after = (
        _xml(libvirtd, domain.name),
        _xml(libvirtd, domain.name, libvirt.VIR_DOMAIN_XML_INACTIVE),
    )
    assert before == after


async def test_unknown_domain(libvirtd: str) -> None:
    async with DetachService(libvirtd) as svc:
        with pytest.raises(DomainNotFound) as info:
            await svc.detach("aiodetach-lab-does-not-exist", alias="ua-x")
    assert info.value.libvirt_code == libvirt.VIR_ERR_NO_DOMAIN


async def test_destroy_while_waiting_wakes_the_caller(
    libvirtd: str, domain: _lab.LabDomain
) -> None:
    settings = DetachSettings(attempts=8, timeout=20)
    async with DetachService(libvirtd, settings=settings) as svc:
        task = asyncio.create_task(svc.detach(domain.name, alias="ua-blk1", persistent=False))
        while not svc.pending():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        conn = libvirt.open(libvirtd)
        try:
            started = time.monotonic()
            await asyncio.to_thread(conn.lookupByName(domain.name).destroy)
        finally:
            conn.close()
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 10)
        assert time.monotonic() - started < 5
    assert info.value.reason == "destroyed"


async def test_loop_stays_responsive_with_many_detaches(libvirtd: str) -> None:
    disks = [_lab.DiskSpec(f"vd{chr(98 + i)}", "virtio", alias=f"ua-v{i}") for i in range(10)]
    with _lab.throwaway_domain(libvirtd, disks=disks) as dom:
        settings = DetachSettings(attempts=2, timeout=0.5)
        async with DetachService(libvirtd, settings=settings) as svc, loop_lag() as lag:
            results = await asyncio.gather(
                *(svc.detach(dom.name, alias=f"ua-v{i}", persistent=False) for i in range(10)),
                return_exceptions=True,
            )
    assert all(isinstance(r, DetachTimeout) for r in results)
    assert lag.worst < 0.2, f"event loop stalled {lag.worst * 1000:.0f} ms"


def test_several_event_loops_one_after_another_in_debug_mode(libvirtd: str) -> None:
    """asyncio.run() three times, debug on: events arrive on every loop."""
    disks = [_lab.DiskSpec(f"sd{c}", "scsi", alias=f"ua-s{c}") for c in "abc"]
    with _lab.throwaway_domain(libvirtd, disks=disks) as dom:

        async def once(letter: str) -> str | None:
            async with DetachService(libvirtd) as svc:
                result = await svc.detach(dom.name, alias=f"ua-s{letter}", persistent=False)
            return result.confirmed_by

        confirmations = [asyncio.run(once(c), debug=True) for c in "abc"]
    assert confirmations == ["event", "event", "event"]
