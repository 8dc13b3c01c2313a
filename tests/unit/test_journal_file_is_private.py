"""The journal decides what is re-sent to guests and names domains, devices
and hosts: it is created owner-only, and a file that others could have
written (its mode, its owner, its side files, or a symlink into a directory
others can write) is refused, untouched, instead of trusted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.errors import JournalUnavailable
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_files import journal_with_pending_row, snapshot
from ._journal_support import journal_settings

ROOT = os.geteuid() == 0


async def test_created_owner_only_with_every_file_beside_it(tmp_path: Path) -> None:
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    old = os.umask(0)
    try:
        async with DetachService(
            backend=fake, settings=journal_settings(), journal=tmp_path / "j.db"
        ) as svc:
            await svc.detach("vm", alias="ua-d")
            made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}  # noqa: ASYNC240 - a test's tmp dir
    finally:
        os.umask(old)
    assert made == {"j.db": 0o600, "j.db-shm": 0o600, "j.db-wal": 0o600}


async def _refused(path: Path, *words: str) -> None:
    before = snapshot(path)
    fake = FakeHypervisor()
    with pytest.raises(JournalUnavailable) as caught:
        await DetachService(backend=fake, settings=journal_settings(), journal=path).open()
    assert fake.calls == []
    assert snapshot(path) == before
    for word in words:
        assert word in caught.value.message, caught.value.message


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666], ids=oct)
async def test_a_journal_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    journal.chmod(mode)
    await _refused(journal, str(journal), "writable")


async def test_a_side_file_others_can_write_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    wal = tmp_path / "j.db-wal"
    wal.write_bytes(b"")
    wal.chmod(0o666)
    await _refused(journal, str(wal), "writable")


@pytest.mark.skipif(not ROOT, reason="gives the file to another user")
async def test_a_journal_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    os.chown(journal, 65534, 65534)
    await _refused(journal, str(journal), "owned by uid 65534")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770], ids=oct)
async def test_a_symlink_into_a_directory_others_can_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    journal = tmp_path / "j.db"
    journal.symlink_to(shared / "j.db")
    await _refused(journal, str(shared), "writable")
    assert list(shared.iterdir()) == [], "the journal was created in the shared directory"


async def test_a_symlink_into_a_private_directory_is_followed(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    journal = tmp_path / "j.db"
    journal.symlink_to(private / "j.db")
    async with DetachService(backend=FakeHypervisor(), journal=journal):
        pass
    assert (private / "j.db").stat().st_size > 0
