"""Helpers of the real-libvirtd tests (no test code, no fixtures).

Requests that reach libvirt are recorded with :mod:`aiodetach_lab.requests`
(re-exported here as ``record_requests``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]
import pytest

from _probes import until
from aiodetach import DetachService
from aiodetach._libvirt import LibvirtBackend
from aiodetach_lab.daemon import eject_command
from aiodetach_lab.domains import remove_domain
from aiodetach_lab.requests import RequestLog, record_requests

__all__ = [
    "RequestLog",
    "domains_removed",
    "guest_ejects",
    "live_xml",
    "quiet",
    "rechecked",
    "record_domain_xml_reads",
    "record_requests",
    "until",
]


def quiet() -> None:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)


def record_domain_xml_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str]]:
    """Record when, and of which domain, LibvirtBackend.domain_xml is called."""
    reads: list[tuple[float, str]] = []
    original = LibvirtBackend.domain_xml

    def counting(self: LibvirtBackend, uuid: str, *, inactive: bool) -> str:
        reads.append((time.monotonic(), uuid))
        return original(self, uuid, inactive=inactive)

    monkeypatch.setattr(LibvirtBackend, "domain_xml", counting)
    return reads


def rechecked(
    services: Sequence[DetachService],
    reads: list[tuple[float, str]],
    since: float,
    uuids: Iterable[str],
) -> Callable[[], bool]:
    """True once every pending unplug has re-read its domain's live XML since
    ``since``: the unplugs of one domain share that read (aiodetach._reads),
    so one read per domain, and no shared read left running or queued."""
    wanted = set(uuids)

    def done() -> bool:
        seen = {uuid for t, uuid in reads if t > since}
        idle = all(s._conn is None or s._conn.reads.in_flight() == 0 for s in services)
        return wanted <= seen and idle

    return done


def live_xml(uri: str, uuid: str, *, inactive: bool = False) -> str:
    quiet()
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))
    finally:
        conn.close()


def guest_ejects(uri: str, uuid: str, slots: list[int]) -> None:
    """Acknowledge PCI unplugs as a guest OS would (through libvirt's monitor passthrough)."""
    quiet()
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        for slot in slots:
            libvirt_qemu.qemuMonitorCommand(
                dom, eject_command(slot), libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
    finally:
        conn.close()


@contextlib.contextmanager
def domains_removed(uri: str, uuids: list[str]) -> Iterator[None]:
    """Destroy and undefine the given domains afterwards, whatever happened."""
    try:
        yield
    finally:
        quiet()
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(uri)
            try:
                for uuid in uuids:
                    with contextlib.suppress(libvirt.libvirtError):
                        remove_domain(conn.lookupByUUIDString(uuid))
            finally:
                conn.close()
