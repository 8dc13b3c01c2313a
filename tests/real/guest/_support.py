"""Helpers of the booted-guest suite: a recorded service, booted domains, serial logs.

The guest is aiodetach's tiny Linux (kernel + busybox initramfs, see
:mod:`aiodetach_lab.guest`), booted under TCG by the real libvirtd.  Its kernel
and initrd are staged into the domain's work directory because QEMU runs as
``libvirt-qemu`` and cannot read root's build cache.
"""

from __future__ import annotations

import contextlib
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from aiodetach import DetachService, DetachSettings
from aiodetach_lab import domains as _lab
from aiodetach_lab import guest as _guest
from aiodetach_lab.requests import RequestLog, recording_requests

BOOT_TIMEOUT = 120.0
"""Seconds a guest may take to print its ready line (~4 s measured; CI machines are slower)."""

NATIVE_PCIE_UNPLUG = 6.3
"""Measured seconds for a native-PCIe (pciehp) unplug: the 5 s attention-button window + teardown."""

CONTROL_SOCKET = "control.sock"

IN_PROGRESS_MARKERS = ("already in the process of unplug", "guest is busy")

DIMM_ALIAS = "ua-dimm1"
DIMM_XML = (
    "<memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target>"
    f"<alias name='{DIMM_ALIAS}'/></memory>"
)


@contextlib.asynccontextmanager
async def recording_service(
    uri: str, settings: DetachSettings
) -> AsyncIterator[tuple[DetachService, RequestLog]]:
    """A DetachService on ``uri`` and the record of every live request it
    sent to libvirt, with libvirt's answer (:mod:`aiodetach_lab.requests`)."""
    with recording_requests() as log:
        async with DetachService(uri, settings=settings) as svc:
            yield svc, log


@dataclass
class Guest:
    """A booted (or defined, not yet started) tiny Linux guest."""

    lab: _lab.LabDomain
    uri: str
    machine: str
    devices: dict[str, str] = field(default_factory=dict)  # alias -> device XML

    @property
    def name(self) -> str:
        return self.lab.name

    @property
    def control_socket(self) -> Path:
        return self.lab.workdir / CONTROL_SOCKET

    @property
    def serial_log(self) -> Path:
        return self.lab.workdir / "serial.log"

    def xml(self, *, inactive: bool = False) -> str:
        with connection(self.uri) as conn:
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
            return str(conn.lookupByName(self.name).XMLDesc(flags))

    def has_alias(self, alias: str, *, inactive: bool = False) -> bool:
        root = ET.fromstring(self.xml(inactive=inactive))  # noqa: S314 - libvirtd's output
        return any(a.get("name") == alias for a in root.iterfind("devices/*/alias"))

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def connection(uri: str) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def virtio_disk(target: str, alias: str) -> _lab.DiskSpec:
    return _lab.DiskSpec(target, "virtio", alias=alias)


def nic(mac: str, alias: str) -> _lab.NicSpec:
    return _lab.NicSpec(mac, alias=alias)


def scsi_controller(alias: str) -> str:
    ctrl = ET.Element("controller", type="scsi", model="virtio-scsi", index="0")
    ET.SubElement(ctrl, "alias", name=alias)
    return ET.tostring(ctrl, encoding="unicode")


@contextlib.contextmanager
def guest(
    uri: str,
    *,
    machine: str = "pc",
    disks: Sequence[_lab.DiskSpec] = (),
    nics: Sequence[_lab.NicSpec] = (),
    snippets: Sequence[str] = (),
    native_pcie_hotplug: bool = False,
    memory_hotplug_slots: int = 0,
    pin_hotplugged_memory: bool = False,
    kernel_log: bool = False,
    control: bool = False,
    hotplug_ports: int = 0,
    start: bool = True,
    wait_ready: bool = True,
    reboot: bool = False,
) -> Iterator[Guest]:
    """A persistent tiny-Linux domain; destroyed and undefined afterwards.

    ``kernel_log`` raises the console log level so pciehp's KERN_INFO lines
    ("Attention button pressed", "Button cancel") reach the serial log.
    ``control`` gives the guest a command channel (``Guest.control_socket``,
    see ``_guest.guest_command``).
    With ``start=False`` the domain is only defined: the test starts it.
    ``reboot``: a reset reboots the guest instead of stopping the domain.
    """
    image = _guest.build_guest_image()
    devices: dict[str, str] = {}

    def build(name: str, workdir: Path) -> str:
        staged = _lab.stage_guest_image(image, workdir)
        parts: list[str] = []
        for spec in disks:
            path = _lab.disk_image(spec, workdir, name)
            parts.append(ET.tostring(_lab.disk_xml(spec, path), encoding="unicode"))
            devices[spec.alias or spec.target] = parts[-1]
        for spec_nic in nics:
            parts.append(ET.tostring(_lab.nic_xml(spec_nic), encoding="unicode"))
            devices[spec_nic.alias or spec_nic.mac] = parts[-1]
        parts.extend(snippets)
        return _guest.guest_domain_xml(
            name,
            staged,
            serial_log=workdir / "serial.log",
            machine=machine,
            native_pcie_hotplug=native_pcie_hotplug,
            devices=parts,
            hotplug_ports=hotplug_ports,
            memory_hotplug_slots=memory_hotplug_slots,
            pin_hotplugged_memory=pin_hotplugged_memory,
            control_socket=workdir / CONTROL_SOCKET if control else None,
            extra_cmdline=("loglevel=7",) if kernel_log else (),
            reboot=reboot,
        )

    with _lab.throwaway_domain(uri, build_xml=build, start=start) as lab:
        booted = Guest(lab, uri, machine, devices)
        if start and wait_ready:
            _guest.wait_for_ready(booted.serial_log, BOOT_TIMEOUT)
        yield booted


async def wait_for_line_prefix(
    log: Path, prefix: str, *, after: int = 0, within: float = 30.0
) -> str:
    """Wait for a serial-log line starting with ``prefix`` past byte ``after``; return it.

    (``_guest.wait_for_ready`` matches whole lines only, and the guest prints
    ``AIODETACH-MEMORY-PINNED <block>``, so it cannot wait for that line.)
    """
    import asyncio

    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(FileNotFoundError):
            data = log.read_bytes()[after:].decode(errors="replace")  # noqa: ASYNC240 - tiny file
            for line in data.splitlines():
                if line.strip().startswith(prefix):
                    return line.strip()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no line starting with {prefix!r} in {log} within {within:g} s")
        await asyncio.sleep(0.05)


_PCIEHP = re.compile(r"pciehp: Slot\(([^)]*)\): (.*)$")


def pciehp_lines(text: str) -> list[tuple[str, str]]:
    """(slot, message) of every pciehp slot line in a serial-log excerpt."""
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = _PCIEHP.search(line)
        if match:
            found.append((match.group(1), match.group(2).strip()))
    return found


def button_presses(text: str) -> int:
    return sum(1 for _slot, msg in pciehp_lines(text) if msg == "Attention button pressed")


def cancels(text: str) -> int:
    return sum(
        1
        for _slot, msg in pciehp_lines(text)
        if msg == "Button cancel" or msg.startswith("Action canceled")
    )
