"""A tiny bootable Linux guest for exercising real device detaches.

This module builds a minimal Linux guest out of Debian packages and describes it
as a libvirt domain, so that tests and experiments can hot-unplug devices from a
guest whose operating system really takes part in the unplug (ACPI PCI hotplug,
native PCIe hotplug, ACPI memory hot-remove).

The guest is only a kernel and an initramfs; it needs no disk image:

* the kernel is the ``boot/vmlinuz-*`` file of Debian's ``linux-image-<abi>-amd64``
  package (the one the ``linux-image-amd64`` metapackage currently depends on).
  ACPI PCI hotplug, pciehp and ACPI memory hotplug are built into it, so no
  modules are needed;
* the initramfs holds the static busybox of the ``busybox-static`` package and a
  small ``/init`` script that mounts ``proc``, ``sysfs`` and ``devtmpfs``, prints
  :data:`READY_LINE` on the console and then idles forever.

Both packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb``,
so nothing is installed on the host. The initramfs is written as a ``newc`` cpio
archive in pure Python (no ``cpio`` binary is needed, and device nodes such as
``/dev/console`` can be created without privileges), then gzip-compressed.

Results are cached (see :func:`build_guest_image`); a cached build costs a few
milliseconds. Typical use::

    image = build_guest_image()
    xml = guest_domain_xml("aiodetach-test-1", image, serial_log=log, machine="q35")
    dom = conn.createXML(xml)
    wait_for_ready(log)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "MEMORY_PINNED_LINE",
    "POWEROFF_LINE",
    "READY_LINE",
    "GuestBuildError",
    "GuestImage",
    "async_wait_for_ready",
    "build_guest_image",
    "default_cache_dir",
    "guest_command",
    "guest_domain_xml",
    "wait_for_ready",
]

#: The line the guest's ``/init`` prints on the serial console once userspace runs.
READY_LINE = "AIODETACH-GUEST-READY"

#: Line printed by the guest (only with ``pin_hotplugged_memory=True``) each time it
#: has onlined hot-plugged memory and pinned kernel objects into it.
MEMORY_PINNED_LINE = "AIODETACH-MEMORY-PINNED"

#: Line printed by the guest (only with a ``control_socket``) just before it powers off.
POWEROFF_LINE = "AIODETACH-POWEROFF"

_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

_KERNEL_METAPACKAGE = "linux-image-amd64"
_BUSYBOX_PACKAGE = "busybox-static"
_KERNEL_NAME_RE = re.compile(r"^linux-image-(\d+(?:\.\d+)*-\d+)-amd64$")
# Debian package names and versions; anything else is refused before it reaches argv.
_PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9.+~:-]+$")
_APT_LISTS = Path("/var/lib/apt/lists")

# Bump when the initramfs layout or the cache format changes.
_FORMAT_VERSION = "1"

# The guest's PID 1. Kept small: every command costs time under TCG.
#
# ``aiodetach.control=ttyS1`` on the kernel command line makes it read commands,
# one per line, from the second serial port (see ``control_socket`` of
# guest_domain_xml): ``poweroff`` powers the guest off at once, as a guest OS
# that shuts down does (QEMU reports a guest-initiated shutdown).
#
# ``aiodetach.pin_hotplugged_memory`` on the kernel command line (a parameter with a
# dot is ignored by the kernel but stays in /proc/cmdline) makes the idle loop
# online every new memory block as kernel memory and create files into it, so
# that unmovable slab objects (inodes, dentries) land in the hot-plugged DIMM and
# it can no longer be offlined: a guest that refuses a memory hot-remove.
_INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
# The memory blocks present at boot, taken *before* the ready line: a DIMM
# hot-plugged right after it must never be counted among them (under TCG the
# listing below could otherwise run after the hot-plug and skip its blocks).
seen=" $(echo /sys/devices/system/memory/memory*) "
echo {READY_LINE}
if grep -q aiodetach.control=ttyS1 /proc/cmdline; then
  # clocal: open() of the port must not wait for a carrier; -echo: send nothing back.
  stty -F /dev/ttyS1 clocal -echo
  while read -r cmd; do
    case "$cmd" in
      poweroff) echo {POWEROFF_LINE}; poweroff -f;;
    esac
  done < /dev/ttyS1 &
fi
if grep -q aiodetach.pin_hotplugged_memory /proc/cmdline; then
  while :; do
    for b in /sys/devices/system/memory/memory*; do
      case "$seen" in *" $b "*) continue;; esac
      [ "$(cat $b/state)" = offline ] && echo online_kernel > $b/state
      [ "$(cat $b/state)" = online ] || continue
      seen="$seen$b "
      mkdir -p /pin/${{b##*memory}}
      i=0
      while [ $i -lt 4000 ]; do : > /pin/${{b##*memory}}/f$i; i=$((i+1)); done
      echo {MEMORY_PINNED_LINE} ${{b##*memory}}
    done
    sleep 1
  done
fi
while :; do sleep 3600; done
"""


class GuestBuildError(RuntimeError):
    """Building the guest image failed (apt, dpkg-deb or the package contents)."""


@dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs that boot the tiny guest (direct kernel boot)."""

    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class _Resolved:
    """The package versions a build uses, as apt currently sees them."""

    kernel_package: str
    kernel_version: str
    busybox_version: str


def default_cache_dir() -> Path:
    """Return ``$AIODETACH_CACHE`` if set, else ``~/.cache/aiodetach/guest``."""
    env = os.environ.get("AIODETACH_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "aiodetach" / "guest"


# --------------------------------------------------------------------------- apt


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run ``argv`` (never through a shell) and return stdout; raise on failure."""
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise GuestBuildError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise GuestBuildError(
            f"{' '.join(argv)} failed with exit status {proc.returncode}: {detail}"
        )
    return proc.stdout


class _Apt:
    """apt-cache / apt-get helpers that run ``apt-get update`` at most once."""

    def __init__(self) -> None:
        self._updated = False

    def _update_once(self) -> bool:
        if self._updated:
            return False
        self._updated = True
        _run(["apt-get", "-q", "update"])
        return True

    def _with_update_retry(self, argv: Sequence[str], *, cwd: Path | None = None) -> str:
        try:
            return _run(argv, cwd=cwd)
        except GuestBuildError:
            # Usually missing or stale package lists: refresh them once and retry.
            if not self._update_once():
                raise
            return _run(argv, cwd=cwd)

    def show(self, packages: Sequence[str]) -> dict[str, dict[str, str]]:
        """Return the candidate record of each package, by package name."""
        for pkg in packages:
            _check_package_name(pkg)
        out = self._with_update_retry(["apt-cache", "show", "--no-all-versions", *packages])
        records: dict[str, dict[str, str]] = {}
        for fields in _parse_control_records(out):
            name = fields.get("Package")
            if name and name not in records:
                records[name] = fields
        missing = [p for p in packages if p not in records]
        if missing:
            raise GuestBuildError(f"apt-cache knows no package {', '.join(missing)}")
        return records

    def newest_kernel_package(self) -> str:
        """Fallback: the highest ``linux-image-<abi>-amd64`` apt knows of."""
        out = self._with_update_retry(
            [
                "apt-cache",
                "search",
                "--names-only",
                r"^linux-image-[0-9.]+-[0-9]+-amd64$",
            ]
        )
        best: tuple[tuple[int, ...], str] | None = None
        for line in out.splitlines():
            name = line.split(" ", 1)[0]
            match = _KERNEL_NAME_RE.match(name)
            if not match:
                continue
            key = tuple(int(p) for p in re.split(r"[.-]", match.group(1)))
            if best is None or key > best[0]:
                best = (key, name)
        if best is None:
            raise GuestBuildError("apt-cache finds no linux-image-<abi>-amd64 package")
        return best[1]

    def download(self, package: str, version: str, dest: Path) -> Path:
        """``apt-get download package=version`` into ``dest``; return the .deb."""
        _check_package_name(package)
        if not _VERSION_RE.match(version):
            raise GuestBuildError(f"unexpected package version {version!r}")
        self._with_update_retry(
            [
                "apt-get",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                "download",
                f"{package}={version}",
            ],
            cwd=dest,
        )
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download left {len(debs)} files for {package}")
        return debs[0]


def _check_package_name(name: str) -> None:
    if not _PACKAGE_NAME_RE.match(name):
        raise GuestBuildError(f"unexpected package name {name!r}")


def _parse_control_records(text: str) -> Iterator[dict[str, str]]:
    """Parse deb822 paragraphs (continuation lines are dropped; not needed here)."""
    fields: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                yield fields
            fields = {}
        elif not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()


def _kernel_from_depends(depends: str) -> str | None:
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if _KERNEL_NAME_RE.match(name):
            return name
    return None


def _apt_lists_fingerprint() -> str:
    """A digest of apt's package lists: resolution only changes when they do."""
    digest = hashlib.sha256()
    try:
        entries = sorted(os.scandir(_APT_LISTS), key=lambda e: e.name)
    except OSError:
        return "no-lists"
    for entry in entries:
        if not entry.is_file(follow_symlinks=False) or entry.name == "lock":
            continue
        st = entry.stat(follow_symlinks=False)
        digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _resolve(apt: _Apt, cache_dir: Path) -> _Resolved:
    """Find the kernel package and versions to use, memoised per apt-lists state.

    ``apt-cache`` takes ~0.4 s per call; the answer only depends on apt's lists,
    so it is remembered against a fingerprint of them (cached builds stay fast).
    """
    memo_path = cache_dir / "resolved.json"
    fingerprint = _apt_lists_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        memo = json.loads(memo_path.read_text())
        if memo["fingerprint"] == fingerprint and memo["format"] == _FORMAT_VERSION:
            return _Resolved(
                str(memo["kernel_package"]),
                str(memo["kernel_version"]),
                str(memo["busybox_version"]),
            )
    records = apt.show([_KERNEL_METAPACKAGE, _BUSYBOX_PACKAGE])
    kernel = _kernel_from_depends(records[_KERNEL_METAPACKAGE].get("Depends", ""))
    if kernel is None:
        kernel = apt.newest_kernel_package()
    kernel_version = apt.show([kernel])[kernel].get("Version", "")
    busybox_version = records[_BUSYBOX_PACKAGE].get("Version", "")
    if not kernel_version or not busybox_version:
        raise GuestBuildError("apt-cache shows no version for the kernel or busybox")
    resolved = _Resolved(kernel, kernel_version, busybox_version)
    memo_data = {
        "format": _FORMAT_VERSION,
        # apt-get update may have run meanwhile: fingerprint the lists as they are now.
        "fingerprint": _apt_lists_fingerprint(),
        "kernel_package": kernel,
        "kernel_version": kernel_version,
        "busybox_version": busybox_version,
    }
    _atomic_write(memo_path, json.dumps(memo_data, indent=1).encode())
    return resolved


# ------------------------------------------------------------------ cpio / files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _NewcArchive:
    """A minimal writer for the SVR4 ``newc`` cpio format the kernel unpacks.

    Each entry is a 110-byte ASCII header (magic ``070701`` and 13 eight-digit
    hex fields), the NUL-terminated name padded to 4 bytes, then the data padded
    to 4 bytes. The archive ends with an entry named ``TRAILER!!!``.
    Timestamps and owners are fixed (0), so the output is reproducible.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0

    @staticmethod
    def _pad(length: int) -> bytes:
        return b"\0" * (-length % 4)

    def _entry(
        self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        raw_name = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        # namesize check
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks += [header, raw_name, self._pad(len(header) + len(raw_name))]
        self._chunks += [data, self._pad(len(data))]

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def getvalue(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _initramfs(busybox: bytes) -> bytes:
    """The gzip-compressed newc initramfs: busybox, /init and a /dev/console node."""
    archive = _NewcArchive()
    for directory in ("bin", "dev", "proc", "sys", "tmp"):
        archive.directory(directory)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox, 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", _INIT_SCRIPT.encode(), 0o755)
    return gzip.compress(archive.getvalue(), compresslevel=6, mtime=0)


def _extract_deb(deb: Path, dest: Path) -> Path:
    dest.mkdir()
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def _safe_component(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


@contextlib.contextmanager
def _locked(cache_dir: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Serialise builds of one cache directory between processes.

    Yields whether the lock is held (always True when ``blocking``).
    """
    with open(cache_dir / ".lock", "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_guest_image(cache_dir: Path | None = None) -> GuestImage:
    """Build, or return the cached, kernel and initramfs of the tiny guest.

    Args:
        cache_dir: where images are kept; defaults to :func:`default_cache_dir`
            (``$AIODETACH_CACHE`` or ``~/.cache/aiodetach/guest``).

    The kernel file is named after the kernel package and its version, the
    initramfs after a digest of the busybox version and the ``/init`` script, so
    a rebuild happens only when one of those changes (e.g. after ``apt-get
    update`` brings a new kernel ABI). The versions are looked up with
    ``apt-cache`` (``apt-get update`` is run once if the lists are missing) and
    the answer is memoised against a fingerprint of apt's lists, so a cached
    call does not run apt at all. Files are written to a temporary name and
    renamed into place, so an interrupted build never leaves a partial cache;
    concurrent builders are serialised with a lock file.

    Raises:
        GuestBuildError: apt or dpkg-deb failed, or a package lacked the
            expected files. Needs a reachable Debian archive when not cached.
    """
    cache_dir = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    apt = _Apt()
    resolved = _resolve(apt, cache_dir)
    kernel_path = cache_dir / (
        f"vmlinuz_{_safe_component(resolved.kernel_package)}"
        f"_{_safe_component(resolved.kernel_version)}"
    )
    initrd_key = hashlib.sha256(
        f"{_FORMAT_VERSION}\0{resolved.busybox_version}\0{_INIT_SCRIPT}".encode()
    ).hexdigest()[:16]
    initrd_path = cache_dir / f"initrd_{initrd_key}.cpio.gz"
    image = GuestImage(kernel=kernel_path, initrd=initrd_path)
    if kernel_path.is_file() and initrd_path.is_file():
        if any(cache_dir.glob(".build-*")):
            # A builder was killed; tidy up unless another one is at work now.
            with _locked(cache_dir, blocking=False) as locked:
                if locked:
                    _remove_stale_build_files(cache_dir)
        return image

    with _locked(cache_dir):
        _remove_stale_build_files(cache_dir)
        return _build_locked(apt, resolved, image)


def _remove_stale_build_files(cache_dir: Path) -> None:
    """Remove what a builder killed mid-way left (only called under the lock)."""
    for pattern in (".build-*", ".vmlinuz_*.tmp", ".initrd_*.tmp"):
        for stale in cache_dir.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _build_locked(apt: _Apt, resolved: _Resolved, image: GuestImage) -> GuestImage:
    kernel_path, initrd_path = image.kernel, image.initrd
    with tempfile.TemporaryDirectory(dir=kernel_path.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        if not kernel_path.is_file():
            deb = apt.download(resolved.kernel_package, resolved.kernel_version, work)
            root = _extract_deb(deb, work / "kernel")
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            if len(kernels) != 1:
                raise GuestBuildError(f"{deb.name} holds {len(kernels)} boot/vmlinuz-* files")
            _atomic_write(kernel_path, kernels[0].read_bytes())
        if not initrd_path.is_file():
            deb = apt.download(_BUSYBOX_PACKAGE, resolved.busybox_version, work)
            root = _extract_deb(deb, work / "busybox")
            busybox = root / "bin" / "busybox"
            if not busybox.is_file():
                raise GuestBuildError(f"{deb.name} holds no bin/busybox")
            _atomic_write(initrd_path, _initramfs(busybox.read_bytes()))
    return image


# ------------------------------------------------------------------- domain XML

_SUB = ET.SubElement


def guest_domain_xml(
    name: str,
    image: GuestImage,
    *,
    serial_log: Path,
    machine: str = "pc",
    memory_mib: int = 256,
    native_pcie_hotplug: bool = False,
    devices: Sequence[str] = (),
    domain_type: str = "qemu",
    hotplug_ports: int = 6,
    memory_hotplug_slots: int = 0,
    max_memory_mib: int | None = None,
    pin_hotplugged_memory: bool = False,
    control_socket: Path | None = None,
    extra_cmdline: Sequence[str] = (),
    reboot: bool = False,
) -> str:
    """Return libvirt domain XML that boots ``image`` with a serial log file.

    Args:
        name: the domain name.
        image: from :func:`build_guest_image`.
        serial_log: file that receives the guest's serial console (truncated at
            each start). Pass it to :func:`wait_for_ready`.
        machine: QEMU machine type, e.g. ``"pc"`` (i440fx) or ``"q35"``.
        memory_mib: guest RAM.
        native_pcie_hotplug: q35 only. Turn QEMU's ACPI PCI hotplug off so the
            guest drives the root ports with native PCIe hotplug (pciehp): an
            unplug is then an attention-button press that Linux acts on only
            after a 5 s cancel window. Uses libvirt's QEMU namespace.
        devices: extra device XML snippets appended under ``<devices>``.
        domain_type: ``"qemu"`` (TCG, always available) or ``"kvm"``.
        hotplug_ports: q35 only: free ``pcie-root-port`` controllers to leave
            for hot-plugged devices (one is added per snippet in ``devices`` on
            top of these, as each PCI device needs its own port).
        memory_hotplug_slots: if > 0, add ``<maxMemory slots=...>`` and a NUMA
            cell, which QEMU needs for ``<memory model='dimm'>`` hotplug.
        max_memory_mib: the ``maxMemory`` size (default ``memory_mib + 1024``).
        pin_hotplugged_memory: make the guest online hot-plugged memory as
            kernel (non-movable) memory and fill it with unmovable objects, so it
            refuses a later hot-remove (ACPI _OST failure).
        control_socket: if given, a second serial port that libvirt listens on
            at this UNIX socket path; the guest reads commands from it (see
            :func:`guest_command`).
        extra_cmdline: extra kernel command-line words.
        reboot: a reset reboots the guest (``on_reboot=restart``); by default
            it stops the domain (``on_reboot=destroy``: QEMU runs with
            ``-no-reboot``, so even ``virDomainReset`` shuts it down).

    All values go through ElementTree, never string formatting.
    """
    q35 = "q35" in machine  # "q35", "pc-q35-7.2", ...
    if native_pcie_hotplug and not q35:
        raise ValueError("native_pcie_hotplug needs a q35 machine")
    ET.register_namespace("qemu", _QEMU_NS)

    dom = ET.Element("domain", type=domain_type)
    _SUB(dom, "name").text = name
    _SUB(dom, "memory", unit="MiB").text = str(memory_mib)
    _SUB(dom, "currentMemory", unit="MiB").text = str(memory_mib)
    if memory_hotplug_slots > 0:
        maximum = max_memory_mib if max_memory_mib is not None else memory_mib + 1024
        _SUB(dom, "maxMemory", slots=str(memory_hotplug_slots), unit="MiB").text = str(maximum)
    _SUB(dom, "vcpu").text = "1"

    os_el = _SUB(dom, "os")
    _SUB(os_el, "type", arch="x86_64", machine=machine).text = "hvm"
    _SUB(os_el, "kernel").text = str(image.kernel)
    _SUB(os_el, "initrd").text = str(image.initrd)
    # Measured: extra "speed-up" options (mitigations=off, i8042.*, 8250.nr_uarts,
    # tsc=reliable, ...) made no difference (~4 s to userspace either way under TCG;
    # the kernel reaches /init after ~1.4 s of guest time, the rest is firmware,
    # loading and decompression). So the command line stays minimal.
    cmdline = [
        "console=ttyS0",
        "quiet",
        "panic=-1",  # reboot at once on a panic; on_reboot=destroy stops the domain
    ]
    if pin_hotplugged_memory:
        cmdline += [
            "memhp_default_state=online_kernel",
            "aiodetach.pin_hotplugged_memory=1",
        ]
    if control_socket is not None:
        cmdline.append("aiodetach.control=ttyS1")
    cmdline += list(extra_cmdline)
    _SUB(os_el, "cmdline").text = " ".join(cmdline)

    features = _SUB(dom, "features")
    _SUB(features, "acpi")
    _SUB(features, "apic")
    if memory_hotplug_slots > 0:
        cpu = _SUB(dom, "cpu")
        numa = _SUB(cpu, "numa")
        _SUB(numa, "cell", id="0", cpus="0", memory=str(memory_mib), unit="MiB")
    _SUB(dom, "on_poweroff").text = "destroy"
    _SUB(dom, "on_reboot").text = "restart" if reboot else "destroy"
    _SUB(dom, "on_crash").text = "destroy"

    devs = _SUB(dom, "devices")
    _SUB(devs, "controller", type="usb", model="none")
    if q35:
        # Index 0 must be the root complex; libvirt numbers the ports after it.
        _SUB(devs, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(hotplug_ports + len(devices)):
            _SUB(devs, "controller", type="pci", model="pcie-root-port")
    serial = _SUB(devs, "serial", type="file")
    _SUB(serial, "source", path=str(serial_log), append="off")
    _SUB(serial, "target", port="0")
    if control_socket is not None:
        control = _SUB(devs, "serial", type="unix")
        _SUB(control, "source", mode="bind", path=str(control_socket))
        _SUB(control, "target", port="1")
    _SUB(devs, "memballoon", model="none")
    for snippet in devices:
        if re.search(r"<!(DOCTYPE|ENTITY)", snippet, re.IGNORECASE):  # entity expansion
            raise ValueError("device XML must not contain <!DOCTYPE> or <!ENTITY>")
        devs.append(ET.fromstring(snippet))  # noqa: S314, RUF100 - caller's own test XML

    if native_pcie_hotplug:
        commandline = _SUB(dom, f"{{{_QEMU_NS}}}commandline")
        for arg in ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"):
            _SUB(commandline, f"{{{_QEMU_NS}}}arg", value=arg)
    return ET.tostring(dom, encoding="unicode")


def guest_command(control_socket: Path, command: Literal["poweroff"], timeout: float = 30) -> None:
    """Send one command to a guest started with ``control_socket``; return once done.

    ``poweroff`` is done when QEMU has exited, which closes the socket.  The
    connection must stay open until then: QEMU drops what a client sent if
    the client hangs up before the serial port took it in (measured: a
    send-and-close never reached the guest).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(control_socket))
        sock.sendall(command.encode() + b"\n")
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise TimeoutError(
                f"the guest did not act on {command!r} within {timeout:g} s"
            ) from None


# ------------------------------------------------------------------- readiness


# A kernel log line on the console: "[    2.346054] tsc: ..." to the end of the line.
_PRINTK = re.compile(rb"\[ *\d+\.\d+\] .*")


class _LogScanner:
    """Incrementally reads a growing (possibly not yet created) log file."""

    def __init__(self, path: Path, marker: str) -> None:
        self._path = path
        self._marker = marker.encode()
        self._offset = 0
        self._buffer = b""
        self.tail = b""

    def found(self) -> bool:
        try:
            with open(self._path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self._offset:  # truncated by a restart
                    self._offset, self._buffer = 0, b""
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return False
        self._offset += len(chunk)
        self.tail = (self.tail + chunk)[-4000:]
        data = self._buffer + chunk
        *lines, self._buffer = data.split(b"\n")
        if any(self._hit(line) for line in lines):
            return True
        # Keep a partial last line, but only as much as could still be the marker.
        self._buffer = self._buffer[-(len(self._marker) + 64) :]
        return self._hit(self._buffer)

    def _hit(self, line: bytes) -> bool:
        """The marker alone on its line, or followed by words (``MARKER 32``).

        With the kernel's log on the same console, a kernel line can land
        between the marker and its newline (``MARKER[    2.346054] tsc: …``,
        seen on a loaded machine): that is the marker alone too."""
        text = _PRINTK.sub(b"", line).strip()
        return text == self._marker or text.startswith(self._marker + b" ")

    def timeout_error(self, timeout: float) -> TimeoutError:
        tail = self.tail.decode(errors="replace")[-2000:]
        return TimeoutError(
            f"guest did not print {self._marker.decode()} to {self._path} within "
            f"{timeout:g} s; log tail:\n{tail}"
        )


def wait_for_ready(
    serial_log: Path,
    timeout: float = 120.0,
    *,
    poll_interval: float = 0.05,
    marker: str = READY_LINE,
) -> float:
    """Block until ``marker`` appears as a line of ``serial_log``.

    Returns the seconds waited. Raises :class:`TimeoutError` (with the tail of
    the log) after ``timeout`` seconds. The file may not exist yet.
    """
    scanner = _LogScanner(serial_log, marker)
    start = time.monotonic()
    while True:
        if scanner.found():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise scanner.timeout_error(timeout)
        time.sleep(poll_interval)


async def async_wait_for_ready(
    serial_log: Path,
    timeout: float = 120.0,  # noqa: ASYNC109, RUF100 - same as wait_for_ready
    *,
    poll_interval: float = 0.05,
    marker: str = READY_LINE,
) -> float:
    """Asyncio version of :func:`wait_for_ready` (polls with ``asyncio.sleep``)."""
    scanner = _LogScanner(serial_log, marker)
    start = time.monotonic()
    while True:
        if scanner.found():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise scanner.timeout_error(timeout)
        await asyncio.sleep(poll_interval)
