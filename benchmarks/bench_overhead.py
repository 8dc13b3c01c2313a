"""End-to-end overhead: ``aiodetach.detach`` vs the raw libvirt call + event wait.

Same process, same event loop, same libvirt event-loop integration
(:func:`aiodetach.install_event_loop`, set up by the service).  The raw side
is written here: its own connection with a DEVICE_REMOVED callback that
resolves a Future from a dict, then per detach ``detachDeviceAlias(alias,
AFFECT_LIVE)`` in a worker thread and ``await`` on the Future.  aiodetach is
called as ``svc.detach(uuid, alias=…, live=True, persistent=False)`` (the
raw side does no persistent detach either), so its extra work is what it
adds: a domain lookup and a live-XML read before sending, the per-device
driver task, result and logging.

The two sides alternate (order and disk swapped every repetition), each on a
freshly hot-plugged device (``attachDeviceFlags`` after every run).

* SCSI disks on an OS-less QEMU domain (QEMU releases them at once; the event
  comes ~50 ms after the request).
* virtio-blk (PCI) on a booted tiny Linux guest (:mod:`aiodetach_lab.guest`), if
  its image is built or can be: the guest takes part in the unplug.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as _uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt

from _common import (
    BENCH_PREFIX,
    URI,
    Row,
    configure_logging,
    eprint,
    finish,
    fmt_ratio,
    fmt_s,
    median,
    met,
    parse_args,
    skipped,
)
from aiodetach import DetachService, DetachSettings
from aiodetach_lab.domains import DiskSpec, LabDomain, throwaway_domain

TARGET = 1.10
Detacher = Callable[[str, str], Awaitable[None]]


class RawDetacher:
    """The minimal correct event-driven detach, written directly against libvirt."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._conn: libvirt.virConnect | None = None
        self._cid = -1

    def open(self) -> None:
        self._conn = libvirt.open(URI)
        self._cid = self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._removed, None
        )

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(self._cid)
            self._conn.close()

    def _removed(self, _c: Any, dom: libvirt.virDomain, alias: str, _o: Any) -> None:
        fut = self._waiters.get((dom.UUIDString(), alias))
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def detach(self, uuid: str, alias: str) -> None:
        assert self._conn is not None
        dom = self._conn.lookupByUUIDString(uuid)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[(uuid, alias)] = fut  # before sending: the event may beat the return
        try:
            await asyncio.to_thread(dom.detachDeviceAlias, alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            async with asyncio.timeout(20):
                await fut
        finally:
            del self._waiters[(uuid, alias)]


async def alternate(
    svc: DetachService,
    raw: RawDetacher,
    dom: libvirt.virDomain,
    uuid: str,
    devices: list[tuple[str, str]],
    reps: int,
    settle: float,
) -> dict[str, list[float]]:
    """devices: (alias, device XML for re-attaching); uses the first two."""

    async def ours(u: str, a: str) -> None:
        await svc.detach(u, alias=a, live=True, persistent=False)

    sides: list[tuple[str, Detacher]] = [("aiodetach", ours), ("raw", raw.detach)]
    out: dict[str, list[float]] = {"aiodetach": [], "raw": []}
    for r in range(reps):
        order = sides if r % 2 == 0 else sides[::-1]
        disks = devices[:2] if (r // 2) % 2 == 0 else devices[1::-1]
        for (name, fn), (alias, _xml) in zip(order, disks, strict=True):
            t0 = time.perf_counter()
            await fn(uuid, alias)
            out[name].append(time.perf_counter() - t0)
        for alias, xml in disks:
            await asyncio.to_thread(dom.attachDeviceFlags, xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            del alias
        await asyncio.sleep(settle)  # let the guest take the new device in
    return out


async def measure_scsi(reps: int) -> dict[str, list[float]]:
    from aiodetach_lab.bench import bench_domain, disk_device_xml, scsi_disks

    specs = scsi_disks(2)
    with bench_domain(specs, "overhead") as lab:
        async with DetachService(URI, settings=DetachSettings(attempts=1, timeout=20)) as svc:
            raw = RawDetacher()
            raw.open()
            try:
                assert raw._conn is not None
                dom = raw._conn.lookupByUUIDString(lab.uuid)
                await asyncio.sleep(0.3)
                devices = [(s.alias or "", disk_device_xml(lab, s)) for s in specs]
                # One untimed warm-up each (first-call costs: imports, thread start).
                await alternate(svc, raw, dom, lab.uuid, devices, 2, 0.02)
                return await alternate(svc, raw, dom, lab.uuid, devices, reps, 0.02)
            finally:
                raw.close()


@contextlib.contextmanager
def booted_guest(specs: list[DiskSpec]) -> Iterator[tuple[LabDomain, list[str], Path]]:
    """A transient tiny-Linux guest (``aiodetach_lab.guest``) with ``specs`` as disks."""
    from aiodetach_lab import domains as _lab
    from aiodetach_lab import guest as _guest

    image = _guest.build_guest_image()
    made: dict[str, Any] = {}

    def build(name: str, workdir: Path) -> str:
        staged = _lab.stage_guest_image(image, workdir)
        xmls = [
            ET.tostring(_lab.disk_xml(s, _lab.disk_image(s, workdir, name)), encoding="unicode")
            for s in specs
        ]
        made["xmls"], made["log"] = xmls, workdir / "serial.log"
        return _guest.guest_domain_xml(
            name, staged, serial_log=made["log"], machine="pc", devices=xmls
        )

    name = f"{BENCH_PREFIX}boot-{_uuid.uuid4().hex[:6]}"
    with throwaway_domain(URI, name=name, build_xml=build, persistent=False, disks=specs) as lab:
        yield lab, made["xmls"], made["log"]


async def measure_booted(reps: int) -> dict[str, list[float]]:
    from aiodetach_lab import guest as _guest
    from aiodetach_lab.bench import virtio_disks

    specs = virtio_disks(2)
    with booted_guest(specs) as (lab, xmls, log):
        await _guest.async_wait_for_ready(log, timeout=90)
        async with DetachService(URI, settings=DetachSettings(attempts=3, timeout=10)) as svc:
            raw = RawDetacher()
            raw.open()
            try:
                assert raw._conn is not None
                dom = raw._conn.lookupByUUIDString(lab.uuid)
                devices = [(s.alias or "", x) for s, x in zip(specs, xmls, strict=True)]
                await alternate(svc, raw, dom, lab.uuid, devices, 2, 0.5)
                return await alternate(svc, raw, dom, lab.uuid, devices, reps, 0.5)
            finally:
                raw.close()


def _row(label: str, out: dict[str, list[float]], note: str = "") -> Row:
    ours, raw = median(out["aiodetach"]), median(out["raw"])
    return Row(
        label,
        f"{fmt_s(ours)} (n={len(out['aiodetach'])})",
        f"raw call + event: {fmt_s(raw)}",
        fmt_ratio(ours / raw),
        "≤ 1.10x",
        met(ours / raw <= TARGET),
        note,
    )


def _spread(name: str, out: dict[str, list[float]]) -> str:
    parts = []
    for side, samples in out.items():
        xs = sorted(samples)
        parts.append(
            f"{side} min {fmt_s(xs[0])} / median {fmt_s(median(xs))} / max {fmt_s(xs[-1])}"
        )
    return f"- {name}: " + "; ".join(parts)


def main() -> None:
    args = parse_args(__doc__ or "")
    configure_logging(args.structlog_default)
    from aiodetach_lab.bench import unavailable

    reps = 6 if args.quick else 30
    why = unavailable()
    if why is not None:
        rows = [skipped("overhead, SCSI detach", why, "≤ 1.10x")]
        finish("End-to-end overhead", rows, args)
        return
    scsi = asyncio.run(measure_scsi(reps))
    eprint(
        f"  scsi: aiodetach {fmt_s(median(scsi['aiodetach']))}, raw {fmt_s(median(scsi['raw']))}"
    )
    rows = [_row("overhead, SCSI detach, OS-less QEMU", scsi)]
    lines = [
        f"Medians; sides alternated, {reps} detaches each (after 2 untimed warm-ups each).",
        _spread("SCSI", scsi),
    ]
    boot_label = "overhead, virtio-blk detach, booted Linux guest"
    try:
        booted = asyncio.run(measure_booted(max(4, reps // 2)))
    except Exception as exc:  # the guest image may not be buildable here
        rows.append(skipped(boot_label, f"{type(exc).__name__}: {exc}"[:120], "≤ 1.10x"))
    else:
        eprint(
            f"  booted: aiodetach {fmt_s(median(booted['aiodetach']))}, "
            f"raw {fmt_s(median(booted['raw']))}"
        )
        rows.append(_row(boot_label, booted))
        lines.append(_spread("virtio-blk, booted guest", booted))
    finish("End-to-end overhead", rows, args, "\n".join(lines))


if __name__ == "__main__":
    main()
