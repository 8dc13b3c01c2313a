"""``aiodetach-lab demo``: the protocol on real QEMU guests, narrated.

Part 1 boots a tiny Linux guest (kernel + busybox initramfs built from
Debian packages, see :mod:`aiodetach_lab.guest`) and detaches a virtio-blk disk,
a virtio NIC and a SCSI disk from it: the guest releases each asynchronously
and libvirt's DEVICE_REMOVED completes the detach.  Part 2 uses a guest with
no OS, which never acknowledges a PCI unplug: the timeout, the XML re-check
and the re-sends happen for real, ending in ``DetachTimeout``.  Every libvirt
device event is printed as it arrives.  Both guests are destroyed and
undefined afterwards, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from aiodetach import DetachService, DetachSettings, DeviceEvent
from aiodetach._progress import describe
from aiodetach.errors import DetachError, DetachTimeout
from aiodetach.instrumentation import Record

from . import domains as _lab
from . import guest as _guest

__all__ = ["run_demo"]

_T0 = time.monotonic()


def _say(text: str) -> None:
    print(f"{time.monotonic() - _T0:7.2f}s  {text}", flush=True)


def _narrate(record: Record) -> None:
    """A hook: each step of the protocol as it happens."""
    line = describe(record)
    if line is not None:
        _say("  " + line)


async def _print_events(svc: DetachService, domain: str) -> None:
    async for event in svc.events(domain):
        _say_event(event)


def _say_event(event: DeviceEvent) -> None:
    label = {
        "device-removed": "EVENT DEVICE_REMOVED",
        "device-removal-failed": "EVENT DEVICE_REMOVAL_FAILED",
        "domain-stopped": "EVENT domain stopped",
    }[event.kind]
    _say(f"  <- {label}: {event.domain_name} {event.alias or ''} {event.detail or ''}".rstrip())


def _booted_xml(name: str, workdir: Path) -> str:
    image = _lab.stage_guest_image(_guest.build_guest_image(), workdir)
    disks = [
        _lab.DiskSpec("vdb", "virtio", alias="ua-blk1"),
        _lab.DiskSpec("sda", "scsi", alias="ua-scsi1"),
    ]
    snippets = [
        ET.tostring(
            ET.Element("controller", type="scsi", model="virtio-scsi", index="0"),
            encoding="unicode",
        )
    ]
    snippets += [
        ET.tostring(_lab.disk_xml(d, _lab.disk_image(d, workdir, name)), encoding="unicode")
        for d in disks
    ]
    snippets.append(
        ET.tostring(_lab.nic_xml(_lab.NicSpec("52:54:00:aa:00:01", "ua-net1")), encoding="unicode")
    )
    return _guest.guest_domain_xml(
        name, image, serial_log=workdir / "serial.log", machine="pc", devices=snippets
    )


async def _part_booted(uri: str) -> None:
    _say("Part 1: a booted Linux guest releases devices asynchronously")
    _say("building the guest image from Debian packages (cached after the first run)…")
    image = await asyncio.to_thread(_guest.build_guest_image)
    _say(f"guest image: {image.kernel.name} + {image.initrd.name}")
    with _lab.throwaway_domain(uri, build_xml=_booted_xml) as dom:
        _say(f"started {dom.name}; waiting for the guest's ready line on its serial console")
        waited = await _guest.async_wait_for_ready(dom.workdir / "serial.log", timeout=180)
        _say(f"guest userspace is up ({waited:.1f} s after start)")
        settings = DetachSettings(attempts=4, timeout=15)
        async with DetachService(uri, settings=settings, hooks=[_narrate], log=False) as svc:
            watcher = asyncio.create_task(_print_events(svc, dom.name))
            await asyncio.sleep(0)
            for kwargs, what in (
                ({"target": "vdb"}, "virtio-blk disk vdb (PCI hot-unplug through ACPI)"),
                ({"mac": "52:54:00:aa:00:01"}, "virtio NIC 52:54:00:aa:00:01"),
                ({"alias": "ua-scsi1"}, "SCSI disk ua-scsi1"),
            ):
                _say(f"detaching the {what}, live + persistent")
                result = await svc.detach(dom.name, **kwargs)  # type: ignore[arg-type]
                _say(
                    f"  => detached: {result.device}; {result.attempts} request(s), "
                    f"{result.elapsed * 1000:.0f} ms, confirmed by {result.confirmed_by}"
                )
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    _say("booted guest destroyed and undefined")


async def _part_osless(uri: str) -> None:
    _say("Part 2: a guest with no OS never acknowledges a PCI unplug")
    disks = (
        _lab.DiskSpec("sda", "scsi", alias="ua-scsi1"),
        _lab.DiskSpec("vdb", "virtio", alias="ua-blk1"),
    )
    with _lab.throwaway_domain(uri, disks=disks) as dom:
        _say(f"started {dom.name} (SeaBIOS only)")
        settings = DetachSettings(attempts=3, timeout=3)
        async with DetachService(uri, settings=settings, hooks=[_narrate], log=False) as svc:
            watcher = asyncio.create_task(_print_events(svc, dom.name))
            await asyncio.sleep(0)
            _say("detaching SCSI disk ua-scsi1: QEMU completes this one without the guest")
            result = await svc.detach(dom.name, alias="ua-scsi1")
            _say(f"  => detached in {result.elapsed * 1000:.0f} ms, by {result.confirmed_by}")
            _say("detaching virtio-blk ua-blk1 live only: 3 attempts of 3 s each")
            try:
                await svc.detach(dom.name, alias="ua-blk1", persistent=False)
            except DetachTimeout as exc:
                _say(f"  => DetachTimeout as expected: {exc}")
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    _say("OS-less guest destroyed and undefined")


async def run_demo(uri: str = "qemu:///system", *, booted: bool = True) -> int:
    """Run the demo; returns the process exit status."""
    _say(f"aiodetach demo on {uri}")
    took = await asyncio.to_thread(_lab.ensure_libvirtd, uri)
    _say(f"libvirtd answers ({'already running' if took == 0 else f'started in {took:.1f} s'})")
    await asyncio.to_thread(_lab.cleanup_leftovers, uri)
    try:
        if booted:
            await _part_booted(uri)
        await _part_osless(uri)
    except DetachError as exc:
        _say(f"demo failed: {type(exc).__name__}: {exc}")
        return 1
    _say("demo finished")
    return 0
