"""A private libvirtd for tests that kill and restart the daemon.

Killing the system libvirtd would disturb everyone else using it, so the
restart tests run their own daemon: ``libvirtd --timeout 0`` in *session*
mode, as an unprivileged user (uid ``nobody`` by default; as root libvirtd is
always "privileged" and would share ``/run/libvirt`` and the system's
domains).  Its HOME/XDG directories live under one scratch directory, so its
socket, domain state, QEMU monitors and logs are its own.  Connect with
:attr:`PrivateLibvirtd.uri` (``qemu:///session?socket=…``), or through the
remote driver's TCP transport with :attr:`PrivateLibvirtd.tcp_uri`
(``qemu+tcp://127.0.0.1:PORT/session``: it listens on loopback only, without
authentication, which is acceptable for a throwaway test daemon and nothing else).
With ``tls=DIR`` (a directory with ``servercert.pem``, ``serverkey.pem`` and
``cacert.pem``, see :mod:`aiodetach_lab.pki`) it also listens on TLS on
loopback, requiring a client certificate signed by that CA:
:meth:`PrivateLibvirtd.tls_uri` names a client's ``pkipath``.
The partition tests (:mod:`aiodetach_lab.netns`) start it inside a network namespace
of their own (``netns``), listening on that namespace's address (``listen_addr``).

QEMU guests run as the same user under TCG (``type='qemu'``), so disk images
must be readable and writable by it: :meth:`PrivateLibvirtd.define` writes
them into a world-writable work directory.

Subprocesses get argument lists, never a shell, and no user input.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import libvirt

from . import domains as _lab

__all__ = ["PrivateLibvirtd", "eject_command", "pci_slots", "qmp"]

LIBVIRTD = "/usr/sbin/libvirtd"
_OURS = ("libvirtd", "virtlogd", "qemu-system")


def _quiet() -> None:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)


class PrivateLibvirtd:
    """One session-mode libvirtd under ``root`` that a test may SIGKILL and restart."""

    def __init__(
        self,
        root: Path,
        *,
        uid: int = 65534,
        gid: int = 65534,
        tcp_port: int | None = None,
        host_uuid: str | None = None,
        listen_addr: str = "127.0.0.1",
        netns: str | None = None,
        extra_conf: str = "",
        tls: Path | None = None,
    ) -> None:
        self.root = root
        self.tls = tls
        self.tls_port = _free_loopback_port() if tls is not None else None
        self.listen_addr = listen_addr
        # Started with ``nsenter --net=/run/netns/NETNS``: its TCP socket and its
        # QEMU processes live in that namespace; its UNIX socket and files do not.
        self.netns = netns
        self.extra_conf = extra_conf
        # libvirt refuses a migration between daemons that report the same host
        # UUID (by default the machine's): a second daemon needs its own.
        self.host_uuid = host_uuid
        self.tcp_port = tcp_port if tcp_port is not None else _free_loopback_port()
        self.uid = uid
        self.gid = gid
        self.home = root / "home"
        self.runtime = root / "run"
        self.config = root / "config"
        self.cache = root / "cache"
        self.workdir = root / "images"
        self.log = root / "libvirtd.log"
        self.conf = root / "libvirtd.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths -----------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.runtime / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///session?socket={self.socket_path}"

    @property
    def tcp_uri(self) -> str:
        return f"qemu+tcp://{self.listen_addr}:{self.tcp_port}/session"

    def tls_uri(self, pkipath: Path) -> str:
        """``qemu+tls://`` to this daemon, with the client's certificates in ``pkipath``.

        The server certificate names 127.0.0.1 and localhost, so the client
        verifies it as it would a production host's (no ``no_verify``)."""
        if self.tls_port is None:
            raise RuntimeError("this private libvirtd was made without tls=")
        return f"qemu+tls://{self.listen_addr}:{self.tls_port}/session?pkipath={pkipath}"

    @property
    def pid(self) -> int | None:
        """PID of the daemon this object started, if it still runs."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def monitor_socket(self, name: str) -> Path:
        """The QMP monitor socket of the running domain ``name``."""
        lib = self.config / "libvirt" / "qemu" / "lib"
        found = sorted(lib.glob(f"domain-*-{name[:20]}/monitor.sock"))
        if not found:
            raise FileNotFoundError(f"no monitor socket for {name} under {lib}")
        return found[-1]

    # -- life ------------------------------------------------------------------
    def _prepare(self) -> None:
        for path in (self.home, self.runtime, self.config, self.cache, self.workdir):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, self.uid, self.gid)
        os.chmod(self.runtime, 0o700)
        os.chmod(self.workdir, 0o777)  # noqa: S103 - QEMU runs as self.uid
        tls = (
            (
                "listen_tls = 1\n"
                f'tls_port = "{self.tls_port}"\n'
                'auth_tls = "none"\n'
                f'key_file = "{self.tls / "serverkey.pem"}"\n'
                f'cert_file = "{self.tls / "servercert.pem"}"\n'
                f'ca_file = "{self.tls / "cacert.pem"}"\n'
            )
            if self.tls is not None
            else "listen_tls = 0\n"
        )
        self.conf.write_text(
            tls + "listen_tcp = 1\n"
            f'listen_addr = "{self.listen_addr}"\n'
            f'tcp_port = "{self.tcp_port}"\n'
            'auth_tcp = "none"\n'
            + (f'host_uuid = "{self.host_uuid}"\n' if self.host_uuid else "")
            + self.extra_conf
        )
        os.chmod(self.conf, 0o644)

    def start(self, timeout: float = 60.0) -> float:
        """Start the daemon; return the seconds until it answered a capabilities call."""
        if self.pid is not None:
            raise RuntimeError("the private libvirtd is already running")
        self._prepare()
        started = time.monotonic()
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(self.config),
            "XDG_CACHE_HOME": str(self.cache),
        }
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    *enter,
                    "setpriv",
                    f"--reuid={self.uid}",
                    f"--regid={self.gid}",
                    "--clear-groups",
                    LIBVIRTD,
                    "--timeout",
                    "0",
                    "--listen",
                    "--config",
                    str(self.conf),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = started + timeout
        _quiet()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"private libvirtd exited with {self._proc.returncode}")
            if (
                self.socket_path.exists()
                and _lab.daemon_answers(self.uri)
                and _lab.daemon_answers(self.tcp_uri)
            ):
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"private libvirtd did not answer within {timeout:g} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the daemon (by its PID) and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Destroy every domain, stop the daemon and anything it spawned."""
        if self.pid is not None:
            _quiet()
            with contextlib.suppress(libvirt.libvirtError):
                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains():
                        _lab.remove_domain(dom)
                finally:
                    conn.close()
            self.kill(signal.SIGTERM)
        self.kill(signal.SIGKILL)
        # QEMU processes of a daemon that died, the virtlogd it spawned, and a
        # daemon left behind by a crashed run: by PID file, checked by owner and name.
        for pidfile in (self.runtime / "libvirt").glob("**/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().strip())
                proc = Path(f"/proc/{pid}")
                comm = (proc / "comm").read_text().strip()
                if proc.stat().st_uid == self.uid and comm.startswith(_OURS):
                    os.kill(pid, signal.SIGKILL)

    # -- domains ---------------------------------------------------------------
    def define(
        self,
        name: str,
        disks: Sequence[_lab.DiskSpec],
        *,
        start: bool = True,
        paused: bool = False,
    ) -> str:
        """Define (and start) an OS-less domain on this daemon; return its UUID."""
        _quiet()
        xml = _lab.osless_domain_xml(name, self.workdir, disks)
        for image in self.workdir.glob(f"{name}-*.img"):
            os.chmod(image, 0o666)  # noqa: S103 - QEMU runs as self.uid
        conn = libvirt.open(self.uri)
        try:
            dom = conn.defineXML(xml)
            if start:
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
            return str(dom.UUIDString())
        finally:
            conn.close()


def _free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def qmp(
    path: Path, *commands: str | tuple[str, dict[str, object]], timeout: float = 5.0
) -> list[dict[str, object]]:
    """Run QMP commands (name, or (name, arguments)) on a monitor socket nobody holds.

    Only possible while libvirtd is down: QEMU's monitor accepts one client.
    """
    replies: list[dict[str, object]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # greeting
        for command in ("qmp_capabilities", *commands):
            name, arguments = (command, {}) if isinstance(command, str) else command
            message = {"execute": name, "arguments": arguments}
            sock.sendall(json.dumps(message).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "return" in reply or "error" in reply:
                    replies.append(reply)
                    break
    return replies


def pci_slots(domain_xml: str) -> dict[str, int]:
    """alias → PCI slot on bus 0 of every PCI device of a live domain XML."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - from libvirt
    slots: dict[str, int] = {}
    for dev in root.iterfind("devices/*"):
        alias = dev.find("alias")
        address = dev.find("address")
        if alias is None or address is None or address.get("type") != "pci":
            continue
        if int(address.get("bus", "0"), 0) == 0:
            slots[alias.get("name", "")] = int(address.get("slot", "0"), 0)
    return slots


def eject_command(slot: int) -> str:
    """HMP command that acts as the guest's ACPI ``_EJ0`` for ``slot`` (PIIX4 hotplug).

    Writing the slot's bit to the eject register (port 0xae08, 0xae0a for
    slots 16-31) is what a guest OS does to acknowledge an unplug request:
    QEMU then removes the device and libvirt emits DEVICE_REMOVED.  It lets an
    OS-less guest acknowledge a PCI unplug when the test says.
    """
    if not 0 < slot < 32:
        raise ValueError(f"PCI slot {slot} out of range")
    port, bit = (0xAE08, slot) if slot < 16 else (0xAE0A, slot - 16)
    return f"o /w {port:#x} {1 << bit:#x}"
