"""The domain destroyed, its QEMU killed, saved or undefined while
PCI unplugs are pending (system libvirtd, OS-less guests whose unplugs never
complete unless the test acknowledges them).  A guest that shuts itself down is
in tests/real/guest/test_guest_shutdown.py, a migration in
tests/real/private/test_migration_while_pending.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach.errors import DomainStopped
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import pci_slots

from .._real import guest_ejects, live_xml, quiet, until


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
            await asyncio.to_thread(_destroy, libvirtd, dom.uuid)
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert svc.pending() == []
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, DomainStopped)} == {"destroyed"}
    assert {o.alias for o in outcomes if isinstance(o, DomainStopped)} == {
        "ua-vb",
        "ua-vc",
        "ua-vd",
    }
    # Woken by the stop: the 10 s bound above is far inside the 60 s window (no
    # wall-clock threshold of its own, which a loaded machine could cross).


def _pending_disks() -> list[_lab.DiskSpec]:
    return [_lab.DiskSpec(f"vd{c}", "virtio", f"ua-v{c}") for c in "bc"]


async def _detach_then(
    uri: str, dom: _lab.LabDomain, action: Callable[[], None]
) -> tuple[list[BaseException | DetachResult], float]:
    """Start detaches of vdb and vdc (pending: the guest has no OS), run
    ``action`` in a thread, and gather every caller's outcome."""
    async with DetachService(uri, settings=DetachSettings(timeout=60.0)) as svc:
        tasks = [asyncio.create_task(svc.detach(dom.name, alias=f"ua-v{c}")) for c in "bc"]
        await until(lambda: len(svc.pending()) == 2, 10, "2 unplugs pending")
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await asyncio.to_thread(action)
        async with asyncio.timeout(15):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        woke_after = time.monotonic() - started
        assert svc.pending() == []
    return outcomes, woke_after


async def test_qemu_killed_wakes_every_waiter(libvirtd: str) -> None:
    """QEMU dies under libvirt (SIGKILL, as the OOM killer would): libvirt
    reports STOPPED with detail FAILED, and the waiters hear it at once."""
    with _lab.throwaway_domain(libvirtd, disks=_pending_disks()) as dom:
        pidfile = Path(f"/run/libvirt/qemu/{dom.name}.pid")

        def kill_qemu() -> None:
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)

        outcomes, _woke_after = await _detach_then(libvirtd, dom, kill_qemu)
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, DomainStopped)} == {"failed"}


async def test_saved_domain_wakes_every_waiter(libvirtd: str) -> None:
    """virDomainSave with unplugs pending: libvirt saves the guest (the pending
    unplugs do not block it) and reports STOPPED/SAVED."""
    with _lab.throwaway_domain(libvirtd, disks=_pending_disks()) as dom:
        image = dom.workdir / "saved.img"

        def save() -> None:
            quiet()
            conn = libvirt.open(libvirtd)
            try:
                conn.lookupByUUIDString(dom.uuid).save(str(image))
            finally:
                conn.close()

        try:
            outcomes, _woke_after = await _detach_then(libvirtd, dom, save)
        finally:
            image.unlink(missing_ok=True)
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, DomainStopped)} == {"saved"}


async def test_undefined_while_running_keeps_waiting(libvirtd: str) -> None:
    """Undefining a running domain only makes it transient: its unplugs go on,
    and the waiters get the guest's answer, not an error."""
    with _lab.throwaway_domain(libvirtd, disks=_pending_disks()) as dom:
        slots = pci_slots(await asyncio.to_thread(live_xml, libvirtd, dom.uuid))

        def undefine_then_eject() -> None:
            quiet()
            conn = libvirt.open(libvirtd)
            try:
                conn.lookupByUUIDString(dom.uuid).undefine()
            finally:
                conn.close()
            time.sleep(0.5)  # the waiters must still be waiting after the undefine
            guest_ejects(libvirtd, dom.uuid, [slots["ua-vb"], slots["ua-vc"]])

        outcomes, _woke_after = await _detach_then(libvirtd, dom, undefine_then_eject)
    assert all(isinstance(o, DetachResult) for o in outcomes), outcomes
    results = [o for o in outcomes if isinstance(o, DetachResult)]
    assert [(r.alias, r.live, r.persistent, r.confirmed_by, r.attempts) for r in results] == [
        ("ua-vb", True, True, "event", 1),
        ("ua-vc", True, True, "event", 1),
    ]
