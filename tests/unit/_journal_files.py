"""Real journal files in the states the file checks are about: written by a
process killed mid-write (its ``-wal`` left behind), another program's
database, a journal with a damaged row; and a snapshot of a file's bytes
with its side files, to tell "refused" from "refused, untouched"."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_support import journal_settings, killed_mid_unplug

SIDES = ("", "-wal", "-shm", "-journal")


def snapshot(path: Path) -> dict[str, str | None]:
    """The bytes (a digest) of the main file and each side file, None when absent."""
    out: dict[str, str | None] = {}
    for side in SIDES:
        p = path.with_name(path.name + side)
        out[side] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    return out


def killed_writer(path: Path, statements: str, *, wal: bool = True) -> None:
    """Run ``statements`` against ``path`` in a child process that is then
    SIGKILLed with its connection open: in WAL mode its commits stay in the
    ``-wal`` (nothing checkpoints them); in rollback mode, a statement left
    open leaves a hot ``-journal``."""
    code = textwrap.dedent(
        f"""
        import os, signal, sqlite3
        db = sqlite3.connect({str(path)!r}, isolation_level=None)
        db.execute("PRAGMA journal_mode={"WAL" if wal else "DELETE"}")
        db.executescript({statements!r})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == -signal.SIGKILL, done


async def journal_with_pending_row(path: Path) -> FakeHypervisor:
    """A real journal (written by a service) holding one unfinished row of a
    device still being unplugged in the fake guest."""
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    await killed_mid_unplug(fake, path, journal_settings())
    return fake


def execute(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Change a journal file by hand (as a user with ``sqlite3`` would)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement, params if "?" in statement else ())
    finally:
        db.close()
