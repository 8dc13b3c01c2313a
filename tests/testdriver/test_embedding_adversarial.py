"""Embedding promises attacked through the public API, on libvirt's test driver:
a caller's own connection (``connection=``) closed by the caller while the
service uses it, or left with the service closing, cancelled or failing
around it; what ``svc.uri`` and the errors say.

The test driver refuses the live detach itself (``DetachRefused``); that
answer shows a call went through the connection under test.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import ConnectionLost, DetachRefused, JournalError, ServiceClosed

WAIT = 60.0  # bounds waits for conditions against a hang only: never reached when green


async def test_a_callers_connection_closed_by_the_caller_is_a_lost_connection(
    test_uri: str,
) -> None:
    """Closing one's own connection while a service uses it is losing it:
    `ConnectionLost` naming the URI, not a `HypervisorError` per call."""
    conn = libvirt.open(test_uri)
    settings = DetachSettings(attempts=1, timeout=1, reconnect_timeout=30)
    async with DetachService(connection=conn, settings=settings, log=False) as svc:
        with pytest.raises(DetachRefused):
            await svc.detach("test", target="vda")
        conn.close()
        for _ in range(2):  # the first call finds it closed, the next at once
            with pytest.raises(ConnectionLost) as info:
                await svc.detach("test", target="vda")
            assert test_uri in str(info.value)
            assert "it is closed" in str(info.value)
            assert info.value.domain == "test"
