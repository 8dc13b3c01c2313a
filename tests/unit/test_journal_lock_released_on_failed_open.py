"""The journal's lock is released when ``open()`` fails or is cancelled, so a
retry in the same process is not refused with ``JournalLocked``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import ConnectionLost
from aiodetach.testing import FakeHypervisor, Unplug


async def test_failed_connect_releases_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    down = FakeHypervisor()
    down.crash()
    with pytest.raises(ConnectionLost):
        await DetachService(backend=down, journal=journal).open()
    async with DetachService(backend=FakeHypervisor(), journal=journal):
        pass


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02])
async def test_cancelled_open_releases_the_journal(tmp_path: Path, delay: float) -> None:
    journal = tmp_path / "j.db"
    slow = FakeHypervisor()
    slow.before_call = lambda name: time.sleep(0.03) if name == "open" else None
    task = asyncio.create_task(DetachService(backend=slow, journal=journal).open())
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    async with DetachService(backend=FakeHypervisor(), journal=journal):
        pass


async def test_cancelled_open_during_take_up_keeps_rows(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    s = DetachSettings(timeout=5, attempts=2, journal_sync="normal")
    async with DetachService(backend=fake, settings=s, journal=journal) as svc:
        t = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        while not fake.requests:
            await asyncio.sleep(0.005)
    await asyncio.gather(t, return_exceptions=True)
    fake.before_call = lambda name: time.sleep(0.1) if name == "domain_xml" else None
    task = asyncio.create_task(DetachService(backend=fake, settings=s, journal=journal).open())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    fake.before_call = None
    async with DetachService(backend=fake, settings=s, journal=journal) as svc:
        assert len(svc.pending()) == 1
        t = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await asyncio.sleep(0.05)
        fake.complete("vm", "ua-d")
        r = await t
    assert r.resumed
    assert len(fake.requests) == 1
