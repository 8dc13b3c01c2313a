"""The journal's path is resolved once, at ``open()``: the file held is the
journal for the service's life, whatever the process's working directory
or the path's symlinks become afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_support import journal_rows, journal_settings


async def test_relative_path_survives_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    monkeypatch.chdir(home)
    async with DetachService(backend=fake, settings=journal_settings(), journal="j.db") as svc:
        monkeypatch.chdir(elsewhere)
        result = await svc.detach("vm", alias="ua-d")
    assert result.attempts == 1
    assert len(fake.requests) == 1
    assert [r["outcome"] for r in journal_rows(home / "j.db")] == ["removed"]
    assert list(elsewhere.iterdir()) == []


async def test_a_symlink_retargeted_under_the_service_does_not_move_the_journal(
    tmp_path: Path,
) -> None:
    real, other = tmp_path / "real.db", tmp_path / "other.db"
    link = tmp_path / "j.db"
    link.symlink_to(real)
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=fake, settings=journal_settings(), journal=link) as svc:
        link.unlink()
        link.symlink_to(other)
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        while not fake.requests and not task.done():
            await asyncio.sleep(0.005)
        if not task.done():
            fake.complete("vm", "ua-d")
        await task
    assert [r["outcome"] for r in journal_rows(real)] == ["removed"]
    assert not other.exists()
