"""Fixtures of the private-daemon tests (see :mod:`aiodetach_lab.daemon`)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiodetach_lab.daemon import PrivateLibvirtd

# One directory per checkout: a private daemon is stopped (with whatever its PID
# files name) before it starts, so two checkouts running their real tiers at
# once on one machine must never share it.
_CHECKOUT = hashlib.sha256(str(Path(__file__).resolve().parents[3]).encode()).hexdigest()[:8]
PRIVATE_ROOT = Path(os.environ.get("AIODETACH_PRIVATE_LIBVIRTD", f"/tmp/robust/daemon-{_CHECKOUT}"))
SECOND_ROOT = PRIVATE_ROOT.with_name(PRIVATE_ROOT.name + "-2")


@pytest.fixture(scope="session")
def private_libvirtd() -> Iterator[PrivateLibvirtd]:
    """A libvirtd of our own, which tests may SIGKILL and restart (never the system one)."""
    if os.geteuid() != 0:
        pytest.skip("the private libvirtd runs QEMU as uid nobody: needs root")
    daemon = PrivateLibvirtd(PRIVATE_ROOT)
    daemon.stop()  # leftovers of a crashed run
    try:
        daemon.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start a private libvirtd: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def second_private_libvirtd(private_libvirtd: PrivateLibvirtd) -> Iterator[PrivateLibvirtd]:
    """Another private libvirtd, with a host UUID of its own: a migration target
    on this machine.  Same uid as the first, so its QEMU can open their images."""
    daemon = PrivateLibvirtd(SECOND_ROOT, host_uuid=str(uuid.uuid4()))
    daemon.stop()
    try:
        daemon.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start a second private libvirtd: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()
