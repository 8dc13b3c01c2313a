"""What ``open()`` checks before libvirt is contacted: a newer format, a file
that is not a journal, a damaged one, an unusable directory (on the fake)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.errors import (
    JournalCorrupt,
    JournalError,
    JournalLocked,
    JournalUnavailable,
)
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_support import journal_settings

# --- one writer -------------------------------------------------------------------


async def test_symlink_to_the_journal_gives_two_writers(tmp_path: Path) -> None:
    """PATH.lock is derived from the *spelling* of the path: a symlink to the
    same journal file gets a different lock file, so two services write one
    journal at once."""
    journal = tmp_path / "j.db"
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    link = other_dir / "link.db"
    link.symlink_to(journal)
    a, b = FakeHypervisor(), FakeHypervisor()
    async with DetachService(backend=a, settings=journal_settings(), journal=journal):
        with pytest.raises(JournalLocked):
            async with DetachService(backend=b, settings=journal_settings(), journal=link):
                pass


# --- unusable paths: typed error, nothing contacted ---------------------------------


async def test_path_component_too_long_is_journal_unavailable(tmp_path: Path) -> None:
    fake = FakeHypervisor()
    with pytest.raises(JournalUnavailable):
        await DetachService(backend=fake, journal=tmp_path / ("x" * 300) / "j.db").open()
    assert fake.calls == []


async def test_file_name_too_long_is_journal_unavailable(tmp_path: Path) -> None:
    fake = FakeHypervisor()
    with pytest.raises(JournalUnavailable):
        await DetachService(backend=fake, journal=tmp_path / ("x" * 252)).open()
    assert fake.calls == []


async def test_nul_byte_in_path_is_typed(tmp_path: Path) -> None:
    fake = FakeHypervisor()
    with pytest.raises((JournalError, ValueError)) as caught:
        await DetachService(backend=fake, journal=str(tmp_path) + "/j\0.db").open()
    assert isinstance(caught.value, (JournalError,)) or type(caught.value).__name__ == (
        "InvalidRequest"
    ), repr(caught.value)
    assert fake.calls == []


async def test_parent_is_a_file(tmp_path: Path) -> None:
    fake = FakeHypervisor()
    (tmp_path / "f").write_text("x")
    with pytest.raises(JournalUnavailable):
        await DetachService(backend=fake, journal=tmp_path / "f" / "j.db").open()
    assert fake.calls == []


async def test_dangling_symlink_loop(tmp_path: Path) -> None:
    fake = FakeHypervisor()
    loop = tmp_path / "j.db"
    loop.symlink_to(loop)
    with pytest.raises(JournalError):
        await DetachService(backend=fake, journal=loop).open()
    assert fake.calls == []


# --- corrupted files --------------------------------------------------------------


async def _make_journal(path: Path, rows: int = 0) -> None:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    for i in range(rows):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug.now())
    async with DetachService(backend=fake, settings=journal_settings(), journal=path) as svc:
        for i in range(rows):
            await svc.detach("vm", alias=f"ua-{i}")


@pytest.mark.parametrize("keep", [0, 50, 100, 1024, 4096, 6000])
async def test_truncated_journal(tmp_path: Path, keep: int) -> None:
    journal = tmp_path / "j.db"
    await _make_journal(journal, rows=40)
    data = journal.read_bytes()
    assert len(data) > keep
    journal.write_bytes(data[:keep])
    before = journal.read_bytes()
    fake = FakeHypervisor()
    if keep == 0:
        # an empty file is simply a new journal
        async with DetachService(backend=fake, journal=journal):
            pass
        return
    with pytest.raises(JournalCorrupt):
        async with DetachService(backend=fake, journal=journal):
            pass
    assert fake.calls == []
    assert journal.read_bytes() == before


async def test_garbage_wal_file(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    await _make_journal(journal, rows=3)
    (tmp_path / "j.db-wal").write_bytes(os.urandom(10000))
    fake = FakeHypervisor()
    # SQLite ignores a WAL whose header checksum fails: a usable journal, not a crash
    try:
        async with DetachService(backend=fake, journal=journal):
            pass
    except JournalCorrupt:
        assert fake.calls == []


async def test_garbage_shm_file(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    await _make_journal(journal, rows=3)
    (tmp_path / "j.db-shm").write_bytes(os.urandom(32768))
    fake = FakeHypervisor()
    try:
        async with DetachService(backend=fake, journal=journal):
            pass
    except JournalCorrupt:
        assert fake.calls == []


async def test_journal_with_user_version_1_but_foreign_unplugs_table(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    db = sqlite3.connect(journal)
    db.execute("CREATE TABLE unplugs (x)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    fake = FakeHypervisor()
    with pytest.raises(JournalCorrupt):
        async with DetachService(backend=fake, journal=journal):
            pass
    assert fake.calls == []
