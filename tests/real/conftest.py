"""The real tier: a real libvirtd + QEMU (the lab starts libvirtd when none answers).

Every test collected under ``tests/real`` is marked ``qemu`` here, so
``-m "not qemu"`` leaves this whole tree out and a test file cannot forget
the marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiodetach_lab import domains as _lab
from aiodetach_lab.requests import RequestLog, record_requests

QEMU_URI = os.environ.get("AIODETACH_TEST_URI", "qemu:///system")
HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: before ``-m`` deselects by marker.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.qemu)


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """A real libvirtd answering at QEMU_URI (started when none is running)."""
    try:
        _lab.ensure_libvirtd(QEMU_URI)
    except _lab.LabError as exc:
        pytest.fail(f"real-QEMU tests need libvirtd: {exc} (deselect them with -m 'not qemu')")
    _lab.cleanup_leftovers(QEMU_URI)
    return QEMU_URI


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> RequestLog:
    """Every live detach request of this test that reached libvirt."""
    return record_requests(monkeypatch)
