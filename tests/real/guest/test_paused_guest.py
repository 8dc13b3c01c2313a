"""A detach sent to a paused guest: the guest answers once it runs again.

libvirt accepts ``detachDeviceAlias`` while the vCPUs are stopped (QEMU only
queues the ACPI notification); the booted guest unplugs the disk as soon as
it is resumed.  A paused guest cannot answer, so aiodetach stops the attempt
clock: no re-send and no attempt used up however long the pause, and a full
``timeout`` for the guest after the resume.  Without that, this test's nine
seconds of pause would use up both 3 s attempts and end in DetachTimeout.
"""

from __future__ import annotations

import asyncio
import time

import libvirt

from aiodetach import DetachSettings

from ._support import connection, guest, recording_service, virtio_disk


def _set_paused(uri: str, name: str, paused: bool) -> None:
    with connection(uri) as conn:
        dom = conn.lookupByName(name)
        if paused:
            dom.suspend()
        else:
            dom.resume()
        state = int(dom.state()[0])  # libvirt-python annotates state() as str
    assert state == (libvirt.VIR_DOMAIN_PAUSED if paused else libvirt.VIR_DOMAIN_RUNNING)


async def test_detach_sent_while_paused_completes_after_resume(libvirtd: str) -> None:
    with guest(libvirtd, disks=[virtio_disk("vdb", "ua-blk1")]) as g:
        await asyncio.to_thread(_set_paused, g.uri, g.name, True)
        settings = DetachSettings(timeout=3, attempts=2)
        async with recording_service(g.uri, settings) as (svc, backend):
            task = asyncio.create_task(svc.detach(g.name, alias="ua-blk1"))
            await asyncio.sleep(9)  # three timeouts' worth of pause
            assert not task.done()
            assert [(r.alias, r.error) for r in backend.requests] == [("ua-blk1", None)]
            assert g.has_alias("ua-blk1")  # the paused guest did nothing yet
            resumed_at = time.monotonic()
            await asyncio.to_thread(_set_paused, g.uri, g.name, False)
            async with asyncio.timeout(30):
                result = await task
            after_resume = time.monotonic() - resumed_at
        assert (result.attempts, result.confirmed_by) == (1, "event"), result
        assert len(backend.requests) == 1
        assert not g.has_alias("ua-blk1")
    print(f"paused guest: released the disk {after_resume:.3f} s after the resume")
