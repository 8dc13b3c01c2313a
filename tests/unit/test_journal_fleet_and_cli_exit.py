"""A fleet sharing one journal (every host taken up, an unreachable one kept
for later) and the CLI's exit status 13 when the journal cannot be used."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _probes import child_env
from aiodetach import DetachFleet
from aiodetach.errors import ConnectionLost
from aiodetach.testing import Unplug

from ._journal_support import fleet_killed_mid_unplug, journal_rows, journal_settings, until_uris

HELPER = str(Path(__file__).with_name("_cli_on_fake.py"))
ENV = child_env()


async def test_fleet_rows_keyed_by_uri(tmp_path: Path) -> None:
    hosts, journal = await fleet_killed_mid_unplug(tmp_path, journal_settings())
    assert sorted(str(r["uri"]) for r in journal_rows(journal)) == sorted(hosts)


async def test_fleet_restart_with_a_host_down_takes_up_the_other(tmp_path: Path) -> None:
    settings = journal_settings(timeout=3.0)
    hosts, journal = await fleet_killed_mid_unplug(tmp_path, settings)
    a, b = hosts.values()
    a.crash()
    async with DetachFleet(
        settings=settings, backend_factory=hosts.__getitem__, journal=journal
    ) as fleet:
        await until_uris(fleet, ["fake://b/system"])
        task = asyncio.create_task(fleet.detach("fake://b/system", "vm", alias="ua-d"))
        await asyncio.sleep(0.1)
        b.complete("vm", "ua-d")
        result = await task
        assert result.resumed
        with pytest.raises(ConnectionLost):
            await fleet.detach("fake://a/system", "vm", alias="ua-d")
    assert len(b.requests) == 1
    assert [
        r["finished_at"] is None for r in journal_rows(journal) if r["uri"] == "fake://a/system"
    ] == [True], "the unreachable host keeps its row"
    # later run, host a back: taken up
    a.restart()
    async with DetachFleet(
        settings=settings, backend_factory=hosts.__getitem__, journal=journal
    ) as fleet:
        await until_uris(fleet, ["fake://a/system"])


async def test_fleet_restart_with_a_hanging_host_does_not_hold_the_other(tmp_path: Path) -> None:
    """Host a hangs in connect (partition).  Entering the fleet waits for it
    up to connect_timeout; meanwhile b's taken-up unplug has nobody to join it."""
    settings = journal_settings(timeout=0.5, connect_timeout=3.0)
    hosts, journal = await fleet_killed_mid_unplug(tmp_path, settings)
    a, b = hosts.values()

    def hang(name: str) -> None:
        if name == "open":
            time.sleep(4)

    a.before_call = hang
    t0 = time.monotonic()
    async with DetachFleet(
        settings=settings, backend_factory=hosts.__getitem__, journal=journal
    ) as fleet:
        entered = time.monotonic() - t0
        task = asyncio.create_task(fleet.detach("fake://b/system", "vm", alias="ua-d"))
        await asyncio.sleep(0.05)
        b.complete("vm", "ua-d")
        result = await task
    a.before_call = None
    print("entered after", entered, "resumed", result.resumed, "requests b", len(b.requests))
    assert entered < 1.0, f"entering the fleet took {entered:.2f} s (host a hanging)"
    assert result.resumed


def _cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, HELPER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, **(env or {})},
        check=False,
        cwd=cwd,
    )


@pytest.mark.parametrize("kind", ["dir", "missing", "toolong", "corrupt", "newer"])
def test_cli_journal_errors_exit_13(tmp_path: Path, kind: str) -> None:
    journal = tmp_path / "j.db"
    if kind == "dir":
        journal.mkdir()
    elif kind == "missing":
        journal = tmp_path / "nope" / "j.db"
    elif kind == "toolong":
        journal = tmp_path / ("x" * 300) / "j.db"
    elif kind == "corrupt":
        journal.write_bytes(os.urandom(4096))
    elif kind == "newer":
        db = sqlite3.connect(journal)
        db.execute("PRAGMA user_version=9")
        db.close()
    for args in (("detach", "vm", "--alias", "ua-ok0"), ("detach-many", os.devnull)):
        done = _cli(*args, "--journal", str(journal))
        assert done.returncode == 13, (kind, args, done.returncode, done.stdout, done.stderr[-500:])


def test_cli_detach_many_journal_failing_mid_batch(tmp_path: Path) -> None:
    """Journal fails at every request (external write lock): exit code?"""
    journal = tmp_path / "j.db"
    done = _cli("detach", "vm", "--alias", "ua-ok0", "--journal", str(journal))
    assert done.returncode == 0
    batch = tmp_path / "b.txt"
    batch.write_text("vm alias=ua-ok1\nvm alias=ua-ok2\n")
    other = sqlite3.connect(journal, isolation_level=None, timeout=1)
    other.execute("BEGIN IMMEDIATE")
    try:
        done = _cli(
            "detach-many",
            str(batch),
            "--journal",
            str(journal),
            env={"AIODETACH_FAKE_JOURNAL_BUSY_WAIT": "1"},
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    print(done.returncode, done.stdout, done.stderr[-800:])
    assert done.returncode == 13, (done.returncode, done.stdout)


def test_cli_without_journal_writes_nothing(tmp_path: Path) -> None:
    env = {**ENV, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "s")}
    done = subprocess.run(
        [sys.executable, HELPER, "detach", "vm", "--alias", "ua-ok0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []


async def test_fleet_hanging_host_makes_the_other_host_exceed_attempts(tmp_path: Path) -> None:
    """attempts=1: after a restart host b's one attempt is already used, so a
    detach of its device must end in DetachTimeout with 1 request in all.
    With host a hanging in connect (< connect_timeout), entering the fleet
    takes connect_timeout, b's taken-up unplug is dropped meanwhile, and the
    detach starts afresh: a 2nd request, attempts exceeded across the restart."""
    from aiodetach.errors import DetachTimeout

    settings = journal_settings(timeout=0.5, attempts=1, connect_timeout=3.0)
    hosts, journal = await fleet_killed_mid_unplug(tmp_path, settings, Unplug.never())
    a, b = hosts.values()

    def hang(name: str) -> None:
        if name == "open":
            time.sleep(3.5)

    a.before_call = hang
    async with DetachFleet(
        settings=settings, backend_factory=hosts.__getitem__, journal=journal
    ) as fleet:
        with pytest.raises(DetachTimeout) as caught:
            await fleet.detach("fake://b/system", "vm", alias="ua-d")
    a.before_call = None
    assert len(b.requests) == 1, f"{len(b.requests)} requests with attempts=1"
    assert caught.value.attempts == 1
