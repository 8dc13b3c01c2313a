"""Helpers of the real-libvirtd tests (no test code, no fixtures).

Requests that reach libvirt are recorded with :mod:`aiodetach_lab.requests`
(re-exported here as ``record_requests``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from _probes import until
from aiodetach_lab.daemon import eject_command
from aiodetach_lab.domains import remove_domain
from aiodetach_lab.requests import RequestLog, record_requests

__all__ = [
    "RequestLog",
    "domains_removed",
    "guest_ejects",
    "live_xml",
    "quiet",
    "record_requests",
    "until",
]


def quiet() -> None:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)


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
