"""Real-QEMU helpers for the benchmarks, on top of :mod:`aiodetach_lab.domains`.

Domains are named ``aiodetach-lab-<pid>-bench-…`` and removed by the context
manager that created them; nothing else on the daemon is touched.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as _uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence

import libvirt

from . import domains as _lab
from .domains import LAB_PREFIX, DiskSpec, LabDomain

URI = os.environ.get("AIODETACH_BENCH_URI", "qemu:///system")
BENCH_PREFIX = f"{LAB_PREFIX}{os.getpid()}-bench-"


def unavailable() -> str | None:
    """Why the real-QEMU benchmarks cannot run here, or None."""
    try:
        _lab.ensure_libvirtd(URI, timeout=60)
    except (_lab.LabError, OSError) as exc:
        return f"no libvirtd: {exc}"
    return None


@contextlib.contextmanager
def bench_domain(disks: Sequence[DiskSpec], tag: str) -> Iterator[LabDomain]:
    """A started OS-less domain (i440fx) with ``disks``; destroyed and undefined after."""
    # QEMU start sometimes fails on this busy machine ("process exited while
    # connecting to monitor", nothing in the log): try a few times.
    for attempt in range(3):
        name = f"{BENCH_PREFIX}{tag}-{_uuid.uuid4().hex[:6]}"
        with contextlib.ExitStack() as stack:
            try:
                lab = stack.enter_context(_lab.throwaway_domain(URI, disks=disks, name=name))
            except libvirt.libvirtError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
                continue
            yield lab
            return


def disk_device_xml(lab: LabDomain, spec: DiskSpec) -> str:
    """The disk's device XML as the lab defined it (same image, same user alias)."""
    path = lab.workdir / f"{lab.name}-{spec.target}.img"
    return ET.tostring(_lab.disk_xml(spec, path), encoding="unicode")


def reattach(dom: libvirt.virDomain, lab: LabDomain, spec: DiskSpec) -> None:
    """Hot-plug the disk back (synchronous for SCSI)."""
    dom.attachDeviceFlags(disk_device_xml(lab, spec), libvirt.VIR_DOMAIN_AFFECT_LIVE)


def live_aliases(dom: libvirt.virDomain) -> set[str]:
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirtd's own output
    return {a.get("name", "") for a in root.iter("alias")}


def scsi_disks(n: int, prefix: str = "ua-sd") -> list[DiskSpec]:
    return [
        DiskSpec(target=f"sd{chr(ord('b') + i)}", bus="scsi", alias=f"{prefix}{i}")
        for i in range(n)
    ]


def virtio_disks(n: int, prefix: str = "ua-vd") -> list[DiskSpec]:
    names = [
        f"vd{chr(ord('b') + i)}" if i < 25 else f"vda{chr(ord('a') + i - 25)}" for i in range(n)
    ]
    return [DiskSpec(target=t, bus="virtio", alias=f"{prefix}{i}") for i, t in enumerate(names)]
