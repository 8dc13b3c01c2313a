"""Fixtures of the robustness suite (see tests/robust/_daemon.py for the private daemon)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._daemon import PrivateLibvirtd

PRIVATE_ROOT = Path(os.environ.get("AIODETACH_PRIVATE_LIBVIRTD", "/tmp/robust/daemon"))


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
