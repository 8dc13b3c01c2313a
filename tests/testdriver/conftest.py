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

import libvirt
import pytest

TEST_URI = "test:///default"


@pytest.fixture
def test_uri() -> str:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    return TEST_URI
