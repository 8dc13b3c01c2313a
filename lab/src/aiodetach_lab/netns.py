"""A fleet of "hosts" on a real network that a test can partition.

Each :class:`NetnsHost` is a :class:`~aiodetach_lab.daemon.PrivateLibvirtd`
started inside a network namespace of its own, joined to this machine's root
namespace by a veth pair: ``10.213.B.4i+1/30`` on the root side,
``10.213.B.4i+2/30`` inside (``B`` is the first block no address of this
machine uses yet).  The daemon listens on the inside address only and is
reached over ``qemu+tcp://10.213.B.4i+2:16509/session``: a remote host as far
as the client can tell.  Its UNIX socket and files stay on the shared
filesystem, so the test can still set up domains, look at their live XML and
act as their guests through it while the network is cut.

:meth:`NetnsHost.cut` takes the namespace's end of the link down (``ip link set
eth0 down``).  Nothing is closed: packets simply stop.  The root side keeps a
*permanent* neighbour entry for the host's address, as a router that still
answers ARP would, so a new TCP connect to a cut host is not refused by a
failed ARP lookup (EHOSTUNREACH after ~3 s) but hangs in SYN retries, as it
does across a real network (``blackhole=False`` gives the ARP-failure kind).

Everything is named ``aiodt-<pid>-<i>`` (namespaces) and ``adt<pid>-<i>``
(root-side veths), so :func:`cleanup_leftovers` can remove what a crashed run
left behind without touching a concurrent run.  Subprocesses get argument
lists, never a shell.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid as _uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .daemon import PrivateLibvirtd

__all__ = ["NetnsHost", "cleanup_leftovers", "netns_fleet"]

NS_PREFIX = "aiodt-"
VETH_PREFIX = "adt"
NETNS_DIR = Path("/run/netns")
PORT = 16509
INSIDE_IF = "eth0"
# What the daemon logs to its monitor log: every QMP message it sends to QEMU
# (QEMU_MONITOR_SEND_MSG), so the test counts device_del where it reaches QEMU.
MONITOR_LOG = "monitor.log"
_DEVICE_DEL = re.compile(r'"execute":\s*"device_del",\s*"arguments":\s*\{\s*"id":\s*"([^"]+)"')


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _kill_namespace_processes(name: str) -> None:
    """SIGKILL every process inside namespace ``name`` (only ever one of ours)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _delete_namespace(name: str, veth: str | None) -> None:
    _kill_namespace_processes(name)
    _ip("netns", "delete", name, check=False)
    if veth is not None:
        _ip("link", "delete", veth, check=False)


def cleanup_leftovers(scratch: Path) -> int:
    """Remove namespaces, veths and scratch directories of runs whose process
    is gone (a crashed run); returns how many namespaces were removed."""
    removed = 0
    names = NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else iter(())
    for entry in sorted(names):
        match = re.fullmatch(rf"{NS_PREFIX}(\d+)-(\d+)", entry.name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(entry.name, f"{VETH_PREFIX}{match.group(1)}-{match.group(2)}")
            removed += 1
    links = json.loads(_ip("-j", "link", "show", check=False) or "[]")
    for link in links:
        match = re.fullmatch(rf"{VETH_PREFIX}(\d+)-\d+", str(link.get("ifname", "")))
        if match and not _pid_alive(int(match.group(1))):
            _ip("link", "delete", link["ifname"], check=False)
    if scratch.is_dir():
        for run in scratch.iterdir():
            if run.name.isdigit() and not _pid_alive(int(run.name)):
                shutil.rmtree(run, ignore_errors=True)
    return removed


def _free_block() -> int:
    """The first 10.213.B.0/24 that no address of the root namespace is in."""
    used: set[int] = set()
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            parts = str(info.get("local", "")).split(".")
            if parts[:2] == ["10", "213"]:
                used.add(int(parts[2]))
    for block in range(256):
        if block not in used:
            return block
    raise RuntimeError("every 10.213.B.0/24 block is in use")


@dataclass
class NetnsHost:
    """One "host": a network namespace, its link, and a private libvirtd in it."""

    index: int
    netns: str
    veth: str
    root_addr: str
    addr: str
    daemon: PrivateLibvirtd
    blackhole: bool = True

    @property
    def tcp_uri(self) -> str:
        """How the fleet under test reaches this host: over the veth link only."""
        return self.daemon.tcp_uri

    @property
    def local_uri(self) -> str:
        """The daemon's UNIX socket (shared filesystem): for set-up and checks, never
        for the fleet under test."""
        return self.daemon.uri

    @property
    def monitor_log(self) -> Path:
        return self.daemon.home / MONITOR_LOG

    # -- network -------------------------------------------------------------
    def create_link(self) -> None:
        ns, veth = self.netns, self.veth
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", INSIDE_IF, "netns", ns)
        _ip("addr", "add", f"{self.root_addr}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{self.addr}/30", "dev", INSIDE_IF)
        _ip("-n", ns, "link", "set", INSIDE_IF, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if self.blackhole:
            inside = json.loads(_ip("-n", ns, "-j", "link", "show", INSIDE_IF))
            mac = str(inside[0]["address"])
            _ip("neigh", "replace", self.addr, "lladdr", mac, "nud", "permanent", "dev", veth)

    def cut(self) -> None:
        """Partition: the host's end of the link goes down; nothing is closed."""
        _ip("-n", self.netns, "link", "set", INSIDE_IF, "down")

    def restore(self) -> None:
        _ip("-n", self.netns, "link", "set", INSIDE_IF, "up")

    def delete_link(self) -> None:
        _delete_namespace(self.netns, self.veth)

    # -- what reached QEMU ---------------------------------------------------
    def device_dels(self) -> collections.Counter[str]:
        """How many ``device_del`` commands this daemon sent to QEMU, by device id
        (the alias): requests counted where they land, not where they leave."""
        try:
            text = self.monitor_log.read_text(errors="replace")
        except FileNotFoundError:
            return collections.Counter()
        sent: collections.Counter[str] = collections.Counter()
        for line in text.splitlines():
            if "QEMU_MONITOR_SEND_MSG" in line:
                match = _DEVICE_DEL.search(line.replace('\\"', '"'))
                if match:
                    sent[match.group(1)] += 1
        return sent


def _make_host(run_root: Path, block: int, index: int, *, blackhole: bool) -> NetnsHost:
    pid = os.getpid()
    root = run_root / f"h{index}"
    home = root / "home"
    extra = f'log_filters = "2:qemu.qemu_monitor"\nlog_outputs = "1:file:{home / MONITOR_LOG}"\n'
    addr = f"10.213.{block}.{4 * index + 2}"
    netns = f"{NS_PREFIX}{pid}-{index}"
    daemon = PrivateLibvirtd(
        root,
        tcp_port=PORT,
        host_uuid=str(_uuid.uuid4()),
        listen_addr=addr,
        netns=netns,
        extra_conf=extra,
    )
    return NetnsHost(
        index=index,
        netns=netns,
        veth=f"{VETH_PREFIX}{pid}-{index}",
        root_addr=f"10.213.{block}.{4 * index + 1}",
        addr=addr,
        daemon=daemon,
        blackhole=blackhole,
    )


@contextlib.contextmanager
def netns_fleet(scratch: Path, count: int, *, blackhole: bool = True) -> Iterator[list[NetnsHost]]:
    """``count`` hosts, each a private libvirtd in its own namespace; all of it
    (domains, daemons, QEMU processes, namespaces, links, files) removed afterwards."""
    if not 1 <= count <= 63:
        raise ValueError("between 1 and 63 hosts fit in one /24 block")
    cleanup_leftovers(scratch)
    run_root = scratch / str(os.getpid())
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    os.chmod(run_root, 0o755)  # noqa: S103 - the daemons run as nobody
    block = _free_block()
    hosts = [_make_host(run_root, block, i, blackhole=blackhole) for i in range(count)]
    try:
        for host in hosts:
            host.create_link()
            host.daemon.root.mkdir(parents=True, exist_ok=True)
            os.chmod(host.daemon.root, 0o755)  # noqa: S103 - the daemon runs as nobody
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda h: h.daemon.start(timeout=120.0), hosts))
        yield hosts
    finally:
        for host in hosts:
            with contextlib.suppress(Exception):
                host.restore()  # stop() talks over the UNIX socket; QEMU needs nothing else
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(_stop_quietly, hosts))
        for host in hosts:
            host.delete_link()
        shutil.rmtree(run_root, ignore_errors=True)


def _stop_quietly(host: NetnsHost) -> None:
    with contextlib.suppress(Exception):
        host.daemon.stop()
