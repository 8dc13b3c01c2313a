"""A journal refused at ``open()`` is left byte for byte as it was: the main
file, its ``-wal``, ``-shm`` and ``-journal``.  The files are inspected
without writing (SQLite would otherwise recover a killed writer's WAL into
the file, checkpoint it and delete it, or switch the file to WAL mode), and
libvirt is not contacted."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.errors import (
    JournalCorrupt,
    JournalError,
    JournalUnavailable,
    JournalVersionError,
)
from aiodetach.testing import FakeHypervisor

from ._journal_files import execute, journal_with_pending_row, killed_writer, snapshot
from ._journal_support import journal_rows, journal_settings


async def _refused(path: Path, error: type[JournalError]) -> JournalError:
    fake = FakeHypervisor()
    before = snapshot(path)
    with pytest.raises(error) as caught:
        await DetachService(backend=fake, settings=journal_settings(), journal=path).open()
    assert snapshot(path) == before
    assert fake.calls == [], "libvirt contacted for a refused journal"
    return caught.value


async def test_newer_journal_left_by_a_killed_writer(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    # A newer aiodetach opened it, changed its format and was killed: the
    # change is in the -wal only.
    killed_writer(journal, "ALTER TABLE unplugs ADD COLUMN lane TEXT; PRAGMA user_version=2;")
    assert snapshot(journal)["-wal"] is not None
    err = await _refused(journal, JournalVersionError)
    assert str(journal) in err.message


async def test_another_programs_wal_database_left_by_a_killed_writer(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    killed_writer(journal, "CREATE TABLE notes (x); INSERT INTO notes VALUES ('mine');")
    assert snapshot(journal)["-wal"] is not None
    await _refused(journal, JournalCorrupt)
    # The other program still finds its row (in its -wal, still there).
    db = sqlite3.connect(journal)
    assert db.execute("SELECT x FROM notes").fetchall() == [("mine",)]
    db.close()


async def test_another_programs_rollback_database_with_a_hot_journal(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    killed_writer(
        journal,
        # A cache of two pages: the open transaction spills into the file.
        "PRAGMA cache_size=2; CREATE TABLE notes (x); INSERT INTO notes VALUES ('kept');"
        "BEGIN; INSERT INTO notes SELECT hex(randomblob(900)) FROM "
        "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300) "
        "SELECT i FROM n);",
        wal=False,
    )
    assert snapshot(journal)["-journal"] is not None, "no hot journal left"
    await _refused(journal, JournalCorrupt)


@pytest.mark.parametrize("version", [-1, -7, 2**31 - 1])
async def test_foreign_format_numbers(tmp_path: Path, version: int) -> None:
    journal = tmp_path / "j.db"
    execute(journal, "CREATE TABLE t (x)", f"PRAGMA user_version={version}")
    err = await _refused(journal, JournalVersionError if version > 0 else JournalCorrupt)
    assert str(journal) in err.message
    db = sqlite3.connect(journal)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "mode changed"
    db.close()


async def test_an_empty_foreign_database_of_another_format_is_not_adopted(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "j.db"
    execute(journal, "PRAGMA user_version=-1")
    await _refused(journal, JournalCorrupt)


async def test_truncated_journal_with_its_wal(tmp_path: Path) -> None:
    """A journal whose main file lost its tail while a killed writer's -wal
    is still there."""
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    copies = (
        "INSERT INTO unplugs SELECT NULL, uri, domain_uuid, domain_name, run_id, alias, "
        "device || hex(zeroblob(2000)), sent, used, sent_at, answered_at, timeout, attempts, "
        "persistent_done, started_at, 1.0, 'removed', 'xml' FROM unplugs WHERE id=1"
    )
    execute(journal, *[copies] * 10)
    killed_writer(journal, copies + ";")
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) // 2])
    await _refused(journal, JournalCorrupt)


async def test_accepted_journal_keeps_the_killed_writers_rows(tmp_path: Path) -> None:
    """The counterpart: a journal of ours whose writer was killed is accepted
    (its -wal is ours, and recovered) and its rows are taken up."""
    journal = tmp_path / "j.db"
    fake = await journal_with_pending_row(journal)
    killed_writer(journal, "UPDATE unplugs SET domain_name='vm' WHERE id=1;")
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        assert [r.outcome for r in svc.recovered()] == ["pending"]
    assert [r["finished_at"] for r in journal_rows(journal)] == [None]


@pytest.mark.skipif(os.geteuid() != 0, reason="remounts a tmpfs read-only")
async def test_journal_on_a_read_only_filesystem(tmp_path: Path) -> None:
    """A journal with a killed writer's -wal on a filesystem remounted read-only:
    refused (it cannot be written), nothing contacted, the files as they were."""
    where = tmp_path / "mnt"
    where.mkdir()
    run = subprocess.run
    await asyncio.to_thread(
        run, ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True
    )
    try:
        journal = where / "j.db"
        await journal_with_pending_row(journal)
        killed_writer(journal, "UPDATE unplugs SET domain_name='vm';")
        await asyncio.to_thread(run, ["mount", "-o", "remount,ro", str(where)], check=True)
        err = await _refused(journal, JournalUnavailable)
        assert "Read-only" in err.message
    finally:
        await asyncio.to_thread(run, ["umount", str(where)], check=True)
