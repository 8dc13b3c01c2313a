"""A throwaway hypervisor lab: a running libvirtd and short-lived QEMU domains.

Used by the demo (``aiodetach-lab demo``), the real-libvirtd tests and the
benchmarks, so all exercise the same setup a user can reproduce by hand.
Nothing here is needed to *use* aiodetach.  Domain XML is built with
ElementTree; subprocesses get argument lists, never a shell.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid as _uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from .guest import GuestImage

__all__ = [
    "APT_PACKAGES",
    "DiskSpec",
    "LabError",
    "NicSpec",
    "ensure_libvirtd",
    "osless_domain_xml",
    "remove_domain",
    "throwaway_domain",
]

APT_PACKAGES = (
    "libvirt-daemon-system",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-dev",
    "pkg-config",
    "gcc",
    "busybox-static",
)
LAB_PREFIX = "aiodetach-lab-"


class LabError(RuntimeError):
    """The lab could not be set up (missing packages, daemon will not start…)."""


def _quiet() -> None:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)


def daemon_answers(uri: str) -> bool:
    """A libvirtd at ``uri`` accepts a connection and answers a real call."""
    _quiet()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getCapabilities()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def ensure_libvirtd(uri: str = "qemu:///system", timeout: float = 120.0) -> float:
    """Make sure a libvirtd answers at ``uri``, starting one if needed.

    Returns the seconds it took.  Starts ``virtlogd`` and ``libvirtd`` as
    daemons (there is no systemd on CI machines); the first start probes QEMU
    capabilities and takes several seconds, so this polls instead of sleeping.
    """
    started = time.monotonic()
    if daemon_answers(uri):
        return 0.0
    daemon = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    logd = shutil.which("virtlogd") or "/usr/sbin/virtlogd"
    if not Path(daemon).exists():
        raise LabError("libvirtd is not installed: apt-get install -y " + " ".join(APT_PACKAGES))
    if os.geteuid() != 0:
        raise LabError(f"no libvirtd answers at {uri} and starting one needs root")
    if Path(logd).exists() and not _running("virtlogd"):
        subprocess.run([logd, "-d"], check=False, capture_output=True, timeout=30)
    if not _running("libvirtd"):
        subprocess.run([daemon, "-d"], check=False, capture_output=True, timeout=30)
    deadline = started + timeout
    while time.monotonic() < deadline:
        if daemon_answers(uri):
            return time.monotonic() - started
        time.sleep(0.2)
    raise LabError(f"libvirtd did not answer at {uri} within {timeout:g} s")


def _running(name: str) -> bool:
    result = subprocess.run(["pgrep", "-x", name], capture_output=True, check=False)
    return result.returncode == 0


def libvirtd_pid() -> int | None:
    """PID of the running libvirtd, if any (for restart tests)."""
    result = subprocess.run(
        ["pgrep", "-x", "libvirtd"], capture_output=True, check=False, text=True
    )
    pids = [int(p) for p in result.stdout.split()]
    return pids[0] if pids else None


@dataclass(frozen=True)
class DiskSpec:
    """A small raw disk: ``bus`` is ``"scsi"`` (virtio-scsi) or ``"virtio"`` (virtio-blk, PCI)."""

    target: str
    bus: str
    alias: str | None = None
    size_mib: int = 8


@dataclass(frozen=True)
class NicSpec:
    """A virtio NIC with user-mode networking (needs no host bridge)."""

    mac: str
    alias: str | None = None


@dataclass
class LabDomain:
    name: str
    uuid: str
    workdir: Path
    disks: list[DiskSpec] = field(default_factory=list)
    nics: list[NicSpec] = field(default_factory=list)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    elem = ET.SubElement(parent, tag, attrs)
    if text is not None:
        elem.text = text
    return elem


def stage_guest_image(image: GuestImage, workdir: Path) -> GuestImage:
    """Copy a guest kernel/initrd where QEMU (user libvirt-qemu) can read them:
    the build cache usually lives under root's home, which it cannot."""
    kernel = workdir / "vmlinuz"
    initrd = workdir / "initrd.gz"
    shutil.copyfile(image.kernel, kernel)
    shutil.copyfile(image.initrd, initrd)
    for path in (kernel, initrd):
        path.chmod(0o644)
    return GuestImage(kernel=kernel, initrd=initrd)


def disk_image(spec: DiskSpec, workdir: Path, name: str) -> Path:
    """A sparse raw image for ``spec`` in ``workdir`` (created once)."""
    path = workdir / f"{name}-{spec.target}.img"
    if not path.exists():
        with path.open("wb") as fh:
            fh.truncate(spec.size_mib << 20)
    return path


def disk_xml(spec: DiskSpec, path: Path) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw")
    _sub(disk, "source", file=str(path))
    _sub(disk, "target", dev=spec.target, bus=spec.bus)
    if spec.alias:
        _sub(disk, "alias", name=spec.alias)
    return disk


def nic_xml(spec: NicSpec) -> ET.Element:
    nic = ET.Element("interface", type="user")
    _sub(nic, "mac", address=spec.mac)
    _sub(nic, "model", type="virtio")
    if spec.alias:
        _sub(nic, "alias", name=spec.alias)
    return nic


def osless_domain_xml(
    name: str,
    workdir: Path,
    disks: Sequence[DiskSpec] = (),
    nics: Sequence[NicSpec] = (),
    *,
    machine: str = "pc",
    memory_mib: int = 128,
    domain_uuid: str | None = None,
) -> str:
    """A domain with no OS (SeaBIOS only): SCSI unplugs complete at once,
    PCI unplugs are never acknowledged.  ACPI is on, or PCI hotplug is refused
    ("Bus 'pci.0' does not support hotplugging")."""
    root = ET.Element("domain", type="qemu")
    _sub(root, "name", name)
    _sub(root, "uuid", domain_uuid or str(_uuid.uuid4()))
    _sub(root, "memory", str(memory_mib), unit="MiB")
    _sub(root, "vcpu", "1")
    os_elem = _sub(root, "os")
    _sub(os_elem, "type", "hvm", arch="x86_64", machine=machine)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    if any(d.bus == "scsi" for d in disks):
        _sub(devices, "controller", type="scsi", model="virtio-scsi", index="0")
    for spec in disks:
        devices.append(disk_xml(spec, disk_image(spec, workdir, name)))
    for nic in nics:
        devices.append(nic_xml(nic))
    return ET.tostring(root, encoding="unicode")


@contextlib.contextmanager
def throwaway_domain(
    uri: str = "qemu:///system",
    *,
    disks: Sequence[DiskSpec] = (),
    nics: Sequence[NicSpec] = (),
    machine: str = "pc",
    start: bool = True,
    persistent: bool = True,
    name: str | None = None,
    build_xml: Callable[[str, Path], str] | None = None,
) -> Iterator[LabDomain]:
    """Define (and start) a short-lived domain; destroy and undefine it after.

    ``build_xml(name, workdir)`` replaces the OS-less default definition.
    """
    _quiet()
    name = name or f"{LAB_PREFIX}{os.getpid()}-{_uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="aiodetach-lab-"))
    os.chmod(workdir, 0o755)  # noqa: S103 - qemu may run as another user
    conn = libvirt.open(uri)
    if build_xml is not None:
        dom_xml = build_xml(name, workdir)
    else:
        dom_xml = osless_domain_xml(name, workdir, disks, nics, machine=machine)
    try:
        if persistent:
            dom = conn.defineXML(dom_xml)
            if start:
                dom.create()
        else:
            dom = conn.createXML(dom_xml, 0)
        yield LabDomain(name, dom.UUIDString(), workdir, list(disks), list(nics))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            remove_domain(conn.lookupByName(name))
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    """Lab domain names carry the creating PID: is that process still there?"""
    rest = name[len(LAB_PREFIX) :]
    pid_text = rest.split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    return Path(f"/proc/{pid_text}").exists()


def remove_domain(dom: libvirt.virDomain) -> None:
    """Destroy (if running) and undefine (if persistent) ``dom``, each step
    best-effort: a domain already stopped or transient is not an error here."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()


def cleanup_leftovers(uri: str = "qemu:///system") -> int:
    """Remove lab domains whose creating process is gone (a crashed run).

    Domains of live processes (a concurrent test run, a demo) are left alone.
    Returns how many were removed.
    """
    _quiet()
    conn = libvirt.open(uri)
    removed = 0
    try:
        for dom in conn.listAllDomains():
            name = dom.name()
            if name.startswith(LAB_PREFIX) and not _owner_alive(name):
                remove_domain(dom)
                removed += 1
    finally:
        conn.close()
    return removed
