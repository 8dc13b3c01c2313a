"""Fixtures shared by the fake-hypervisor tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._gate_fake import GateFake
from ._hold_fake import HoldFake


@pytest.fixture
def gf() -> Iterator[GateFake]:
    """A fake that can hold a read after it took its answer (see GateFake);
    whatever a test left held is released at the end."""
    hv = GateFake()
    yield hv
    for gate in hv.hold.values():
        gate.set()
    hv.cancel_timers()


@pytest.fixture
def hv() -> Iterator[HoldFake]:
    """The fake whose calls can be held in their worker thread (aiodetach tests' `_hold_fake`)."""
    fake = HoldFake()
    yield fake
    fake.release_all()
    fake.cancel_timers()
