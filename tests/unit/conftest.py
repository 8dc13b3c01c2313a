"""Fixtures shared by the fake-hypervisor tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._gate_fake import GateFake


@pytest.fixture
def gf() -> Iterator[GateFake]:
    """A fake that can hold a read after it took its answer (see GateFake);
    whatever a test left held is released at the end."""
    hv = GateFake()
    yield hv
    for gate in hv.hold.values():
        gate.set()
    hv.cancel_timers()
