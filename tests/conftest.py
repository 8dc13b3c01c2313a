"""Shared fixtures.

Unit tests use :class:`aiodetach.testing.FakeHypervisor` (a fake, named so).
Tests marked ``qemu`` use a real libvirtd + QEMU, started here if none runs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor

QEMU_URI = os.environ.get("AIODETACH_TEST_URI", "qemu:///system")


@pytest.fixture
def fake() -> Iterator[FakeHypervisor]:
    hv = FakeHypervisor()
    yield hv
    hv.cancel_timers()


@pytest.fixture
def fast() -> DetachSettings:
    """Short timeouts so retry paths run in milliseconds."""
    return DetachSettings(attempts=3, timeout=0.2, reconnect_timeout=2.0)


@pytest.fixture
async def svc(fake: FakeHypervisor, fast: DetachSettings) -> AsyncIterator[DetachService]:
    async with DetachService(backend=fake, settings=fast) as service:
        yield service
    assert service.pending() == []


@pytest.fixture
def make_svc(fake: FakeHypervisor) -> Callable[..., DetachService]:
    def make(**settings: object) -> DetachService:
        return DetachService(backend=fake, settings=DetachSettings(**settings))  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """A real libvirtd answering at QEMU_URI (started when none is running)."""
    from aiodetach import _lab

    try:
        _lab.ensure_libvirtd(QEMU_URI)
    except _lab.LabError as exc:
        pytest.fail(f"real-QEMU tests need libvirtd: {exc} (deselect them with -m 'not qemu')")
    _lab.cleanup_leftovers(QEMU_URI)
    return QEMU_URI
