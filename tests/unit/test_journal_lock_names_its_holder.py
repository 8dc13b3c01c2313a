"""``JournalLocked`` names the process that holds the journal file now,
however either of them spelled its path, not one that used it before."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from _probes import child_env
from aiodetach import DetachService
from aiodetach.errors import JournalLocked
from aiodetach.testing import FakeHypervisor

HOLD = (
    "import sys\n"
    "from aiodetach._journal import Journal\n"
    "j = Journal.open(sys.argv[1], synchronous='normal', retention=60)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
    "j.close()\n"
)


def _use_and_exit(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HOLD, str(path)],
        input="",
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == "held", done.stderr


@pytest.mark.parametrize("spelling", ["symlink", "hard link", "relative"])
def test_the_lock_names_the_live_holder(
    tmp_path: Path, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "j.db"
    _use_and_exit(journal)  # process A: used it earlier, exited
    if spelling == "symlink":
        other = tmp_path / "link.db"
        other.symlink_to(journal)
    elif spelling == "hard link":
        other = tmp_path / "hard.db"
        other.hardlink_to(journal)
    else:
        monkeypatch.chdir(tmp_path)
        other = Path("j.db")
    with subprocess.Popen(  # process B: holds it now, through the other spelling
        [sys.executable, "-c", HOLD, str(other)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "held"
            fake = FakeHypervisor()
            with pytest.raises(JournalLocked) as caught:
                asyncio.run(DetachService(backend=fake, journal=journal).open())
            assert f"pid {holder.pid}" in caught.value.message, caught.value.message
            assert fake.calls == []
        finally:
            holder.stdin.close()  # B closes the journal and exits
