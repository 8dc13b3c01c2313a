"""A guest reset during a pending ACPI unplug (``pc``, pci-root), real QEMU.

An OS-less guest never acknowledges a PCI unplug, but QEMU's reset unplugs
the devices whose ACPI unplug is pending: libvirt emits REBOOT, then
DEVICE_REMOVED (measured ~0.13 s after the reset).  One request, success by
event: the REBOOT must not make aiodetach send again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.instrumentation import Record, UnplugRecord
from aiodetach_lab import domains as _lab
from aiodetach_lab.requests import RequestLog


@pytest.fixture
def domain(libvirtd: str) -> Iterator[_lab.LabDomain]:
    disks = (_lab.DiskSpec("vdb", "virtio", alias="ua-blk1"),)
    with _lab.throwaway_domain(libvirtd, disks=disks) as dom:
        yield dom


def _reset(uri: str, name: str) -> float:
    conn = libvirt.open(uri)
    try:
        conn.lookupByName(name).reset(0)
        return time.monotonic()
    finally:
        conn.close()


async def test_reset_completes_a_pending_acpi_unplug_with_one_request(
    libvirtd: str, domain: _lab.LabDomain, sent: RequestLog
) -> None:
    taken = asyncio.Event()
    kinds: list[str] = []

    def hook(record: Record) -> None:
        if isinstance(record, UnplugRecord):
            kinds.append(record.kind)
            if record.kind == "request_sent":
                taken.set()

    settings = DetachSettings(timeout=20, attempts=1)
    async with DetachService(libvirtd, settings=settings, hooks=[hook]) as svc:
        started = time.monotonic()
        task = asyncio.create_task(svc.detach(domain.name, alias="ua-blk1"))
        await taken.wait()  # accepted: the ACPI unplug is pending (no OS to answer it)
        reset_at = await asyncio.to_thread(_reset, libvirtd, domain.name)
        result = await task

    assert len(sent.requests) == 1, sent.requests
    assert result.attempts == 1
    assert result.confirmed_by == "event", result
    assert "request_voided" not in kinds, kinds
    assert kinds.count("guest_reset") <= 1, kinds  # REBOOT may come after DEVICE_REMOVED
    print(f"\nremoved {started + result.elapsed - reset_at:.3f} s after the reset returned")
