"""A guest that powers itself off while one of its devices is being unplugged.

The domain shut down mid-detach, by a real guest:
the q35 guest with native PCIe hotplug holds a virtio-blk unplug for ~6 s (the
attention button's 5 s window), and is told through its control channel to
power off one second into it.  QEMU reports a guest-initiated shutdown,
libvirt emits STOPPED/SHUTDOWN, and every caller must wake at once with
``DomainStopped(reason="shutdown")`` after one request, not wait out the
attempt or re-send to a domain that is gone.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from aiodetach import DetachSettings
from aiodetach.errors import DomainStopped
from aiodetach_lab import guest as _guest

from ._support import guest, recording_service, virtio_disk, wait_for_line_prefix

pytestmark = pytest.mark.slow


async def test_guest_powers_off_during_the_unplug(libvirtd: str) -> None:
    disks = [virtio_disk("vdb", "ua-disk1")]
    with guest(libvirtd, machine="q35", native_pcie_hotplug=True, disks=disks, control=True) as g:
        settings = DetachSettings(timeout=60, attempts=8)
        async with recording_service(g.uri, settings) as (svc, backend):
            callers = [asyncio.create_task(svc.detach(g.name, alias="ua-disk1")) for _ in "ab"]
            while not backend.requests:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # well inside the 5 s window: the unplug is pending
            assert svc.pending() == [(g.lab.uuid, "ua-disk1")]
            started = time.monotonic()
            await asyncio.to_thread(_guest.guest_command, g.control_socket, "poweroff")
            async with asyncio.timeout(30):
                outcomes = await asyncio.gather(*callers, return_exceptions=True)
            woke_after = time.monotonic() - started
            assert svc.pending() == []
        await wait_for_line_prefix(g.serial_log, _guest.POWEROFF_LINE, within=1)

    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {(o.reason, o.alias) for o in outcomes if isinstance(o, DomainStopped)} == {
        ("shutdown", "ua-disk1")
    }
    assert [r.alias for r in backend.requests] == ["ua-disk1"]
    assert woke_after < 10, woke_after  # the poweroff itself, not the 60 s attempt
    print(f"guest poweroff: callers woke {woke_after:.3f} s after the command")
