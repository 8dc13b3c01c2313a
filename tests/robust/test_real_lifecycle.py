"""Item 3 for real: the domain destroyed while a PCI unplug is pending (system libvirtd)."""

from __future__ import annotations

import asyncio
import time

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings, _lab
from aiodetach.errors import DomainStopped

from ._real import quiet, until

pytestmark = pytest.mark.qemu


def _destroy(uri: str, uuid: str) -> None:
    quiet()
    conn = libvirt.open(uri)
    try:
        conn.lookupByUUIDString(uuid).destroy()
    finally:
        conn.close()


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "transient"])
async def test_destroy_wakes_every_waiter(libvirtd: str, persistent: bool) -> None:
    disks = [_lab.DiskSpec(f"vd{c}", "virtio", f"ua-v{c}") for c in "bcd"]
    with _lab.throwaway_domain(libvirtd, disks=disks, persistent=persistent) as dom:
        async with DetachService(libvirtd, settings=DetachSettings(timeout=60.0)) as svc:
            tasks = [
                asyncio.create_task(svc.detach(dom.name, alias=f"ua-v{c}"))
                for c in "bcd"
                for _ in range(2)
            ]
            await until(lambda: len(svc.pending()) == 3, 10, "3 unplugs pending")
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await asyncio.to_thread(_destroy, libvirtd, dom.uuid)
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            woke_after = time.monotonic() - started
            assert svc.pending() == []
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, DomainStopped)} == {"destroyed"}
    assert {o.alias for o in outcomes if isinstance(o, DomainStopped)} == {
        "ua-vb",
        "ua-vc",
        "ua-vd",
    }
    assert woke_after < 3.0, woke_after
