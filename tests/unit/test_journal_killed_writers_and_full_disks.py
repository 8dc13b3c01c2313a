"""The checks at ``open()`` against real files left by real failures: an
agent SIGKILLed at each point around the journal's writes leaves a journal
the next open accepts (its killed writer's ``-wal`` is ours: recovered, not
refused), and a full filesystem, the journal's own or the one holding the
inspection's private copy, is a typed error that sends nothing and keeps
every row for the open after space is back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from _probes import child_env
from aiodetach import DetachService
from aiodetach.errors import JournalUnavailable
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_files import journal_with_pending_row, killed_writer, snapshot
from ._journal_support import journal_rows, journal_settings

UUID = "6f1c3c55-0d0e-4c59-9a43-0d3b7c1e2a10"

AGENT = textwrap.dedent(
    f"""
    import asyncio, os, signal, sys
    from aiodetach import DetachService, DetachSettings, _journal
    from aiodetach.testing import FakeHypervisor, Unplug

    def fault(point):
        if point == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)

    async def main(path):
        fake = FakeHypervisor()
        fake.add_domain("vm", uuid={UUID!r}).add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
        _journal.fault = fault
        s = DetachSettings(timeout=30, attempts=2, journal_sync="full")
        async with DetachService(backend=fake, settings=s, journal=path, log=False) as svc:
            await svc.detach("vm", alias="ua-d")

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize(
    ("point", "rows"),
    [("open.schema", 0), ("request.written", 0), ("request.committed", 1), ("request.sent", 1)],
)
async def test_a_journal_left_by_a_killed_agent_is_accepted(
    tmp_path: Path, point: str, rows: int
) -> None:
    journal = tmp_path / "j.db"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", AGENT, str(journal), point],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    fake = FakeHypervisor()
    fake.add_domain("vm", uuid=UUID).add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        assert [r.outcome for r in svc.recovered()] == ["pending"] * rows
        assert len(svc.pending()) == rows
    assert fake.requests == []
    assert len(journal_rows(journal)) == rows


ROOT = os.geteuid() == 0


def _mount(where: Path, size: str) -> None:
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)]
    subprocess.run(cmd, check=True)


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True)


def _fill(where: Path) -> Path:
    """Write until the filesystem refuses a single byte more."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(not ROOT, reason="mounts a small tmpfs")
async def test_journal_on_a_full_filesystem(tmp_path: Path) -> None:
    """A killed writer's journal on a full filesystem: accepted and taken up
    (reading it needs no room); a new request that cannot be recorded is a
    typed error and is not sent; with room again, it is."""
    where = tmp_path / "mnt"
    _mount(where, "2m")
    try:
        journal = where / "j.db"
        fake = await journal_with_pending_row(journal)
        fake.domain("vm").add_disk("vdc", alias="ua-e", unplug=Unplug.now())
        killed_writer(journal, "UPDATE unplugs SET domain_name='vm';")
        filler = _fill(where)
        async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
            assert [r.outcome for r in svc.recovered()] == ["pending"]
            with pytest.raises(JournalUnavailable) as caught:
                await svc.detach("vm", alias="ua-e")
            assert "full" in caught.value.message, caught.value.message
            assert len(fake.requests) == 1, "sent without its row"
            filler.unlink()
            await svc.detach("vm", alias="ua-e")
        assert len(fake.requests) == 2
        assert sorted(str(r["alias"]) for r in journal_rows(journal)) == ["ua-d", "ua-e"]
    finally:
        _umount(where)


@pytest.mark.skipif(not ROOT, reason="mounts a small tmpfs")
async def test_full_scratch_space_for_the_inspection_is_typed_and_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed writer's journal is inspected from a private copy (in the
    temporary directory): no room there is a typed error naming it, the
    journal as it was, and the next open with room takes the row up."""
    scratch = tmp_path / "scratch"
    _mount(scratch, "64k")
    try:
        journal = tmp_path / "j.db"
        fake = await journal_with_pending_row(journal)
        killed_writer(
            journal,
            "INSERT INTO unplugs SELECT NULL, uri, domain_uuid, domain_name,"
            " run_id, 'ua-x', device, sent, used, sent_at, answered_at, timeout,"
            " attempts, persistent_done, started_at, 1, 'removed', 'xml' FROM unplugs;"
            " UPDATE unplugs SET device=device||zeroblob(0) WHERE id=1;",
        )
        filler = _fill(scratch)
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        before = snapshot(journal)
        calls = len(fake.calls)
        with pytest.raises(JournalUnavailable) as caught:
            await DetachService(backend=fake, settings=journal_settings(), journal=journal).open()
        assert str(scratch) in caught.value.message, caught.value.message
        assert snapshot(journal) == before
        assert len(fake.calls) == calls
        filler.unlink()
        async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
            assert [r.outcome for r in svc.recovered()] == ["pending"]
        assert os.listdir(scratch) == [], "the private copy was left behind"
    finally:
        _umount(scratch)
