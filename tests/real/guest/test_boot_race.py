"""A detach sent while the guest is still in firmware is lost; the re-send saves it.

Measured here (pc and q35 with ACPI hotplug, TCG): ``detachDeviceAlias`` sent
~0.3 s after ``create()`` is accepted by libvirt, but the guest (still in
SeaBIOS / early kernel) never acts on it: no DEVICE_REMOVED, and the disk is
still attached 20 s after the ready line (which comes ~4-5 s after start).
Re-sent once the guest is up, it is removed in ~0.1 s.

So with ``timeout=10`` the first attempt is certainly lost and ends after the
guest is up; aiodetach re-reads the live XML, finds the disk, sends again,
and the second request completes by event.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from aiodetach import DetachSettings
from aiodetach_lab.guest import async_wait_for_ready

from ._support import BOOT_TIMEOUT, connection, guest, recording_service, virtio_disk

pytestmark = pytest.mark.slow

FIRST_ATTEMPT = 10.0  # > boot-to-ready (~4-5 s, up to ~8 s on a loaded 2-core machine)


@pytest.mark.parametrize("machine", ["pc", "q35"])
async def test_detach_sent_during_firmware_is_lost_and_resent(libvirtd: str, machine: str) -> None:
    with guest(libvirtd, machine=machine, disks=[virtio_disk("vdb", "ua-blk1")], start=False) as g:
        settings = DetachSettings(timeout=FIRST_ATTEMPT, attempts=4)
        async with recording_service(libvirtd, settings) as (svc, backend):
            with connection(libvirtd) as conn:
                await asyncio.to_thread(conn.lookupByName(g.name).create)
            created = time.monotonic()
            ready = asyncio.create_task(async_wait_for_ready(g.serial_log, BOOT_TIMEOUT))
            result = await svc.detach(g.name, alias="ua-blk1")
            ready_at = created + await ready

        sends = [r.at - created for r in backend.requests]
        assert all(r.error is None for r in backend.requests), backend.requests
        # The first request went out long before the guest's userspace (in firmware)...
        assert sends[0] < 2.0 < ready_at - created, (sends, ready_at - created)
        # ... and was lost: nothing completed it before the re-send.
        assert result.attempts >= 2, (result, sends)
        assert len(sends) == result.attempts
        assert result.confirmed_by == "event", result
        assert (result.live, result.persistent) == (True, True)
        # The request that worked was sent after the guest was up, and was quick.
        assert sends[-1] > ready_at - created, (sends, ready_at - created)
        assert result.elapsed - sends[-1] < 5, (result.elapsed, sends)
        assert not g.has_alias("ua-blk1")
        assert not g.has_alias("ua-blk1", inactive=True)
