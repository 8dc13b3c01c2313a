"""The libvirt test-driver tier: aiodetach's real backend and event-loop bridge
against libvirt's own ``test:///default`` driver.

The test driver runs inside this process (no daemon, no QEMU, no root) and
still goes through libvirt's event machinery: its lifecycle events are queued
and flushed by a libvirt *timer*, i.e. through the hooks aiodetach installs
on top of :mod:`libvirtaio`.  So a libvirt-python release that changes
libvirtaio's private hooks fails here, in the fast tier, at once.  Each
``open`` of ``test:///default`` gets a fresh copy of its state (one running
domain, ``test``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import libvirt
import pytest

TEST_URI = "test:///default"


@pytest.fixture
def test_uri() -> str:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    return TEST_URI


@pytest.fixture
def test_id(test_uri: str) -> str:
    """The running domain ``test``'s ID: 1 in a fresh process, but the driver's
    state is shared by every connection of the process, and another test may
    have stopped and started it (each start is a new ID)."""
    conn = libvirt.open(test_uri)
    try:
        dom = conn.lookupByName("test")
        if not dom.isActive():
            dom.create()
        return str(dom.ID())
    finally:
        conn.close()


@pytest.fixture
def second_domain(test_uri: str) -> Iterator[str]:
    """A second running domain on ``test:///default`` (a copy of ``test`` under
    another name and UUID), for calls about two domains; its UUID.  Removed
    afterwards: the test driver's state outlives a connection."""
    conn = libvirt.open(test_uri)
    try:
        xml = conn.lookupByName("test").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml)
        xml = xml.replace("<name>test</name>", "<name>aiodetach-second</name>")
        dom = conn.defineXML(xml)
        dom.create()
        yield dom.UUIDString()
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    finally:
        conn.close()
