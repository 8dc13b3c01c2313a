"""The journal failing or interfered with while a service runs (deleted,
replaced, locked, disk errors), and a close or cancel at arbitrary points:
each is a typed error or a clean close, never a lost or early request."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _probes import child_env
from aiodetach import DetachService, _journal
from aiodetach.errors import JournalError, JournalLocked, ServiceClosed
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_support import journal_rows, journal_settings

ENV = child_env()


async def test_journal_file_deleted_mid_run(tmp_path: Path) -> None:
    """rm j.db* while the service runs: rows go to an unlinked inode, no
    error; after a restart the pending unplug is unknown and re-sent."""
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    journal = tmp_path / "j.db"
    settings = journal_settings(timeout=5.0)
    raised: BaseException | None = None
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        for p in tmp_path.glob("j.db*"):  # noqa: ASYNC240 - a test reading its own files
            if not p.name.endswith(".lock"):
                p.unlink()
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await asyncio.sleep(0.2)
        if task.done():
            raised = task.exception()
    if raised is None:
        with pytest.raises(ServiceClosed):
            await task
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        pending = svc.pending()
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await asyncio.sleep(0.2)
        fake.complete("vm", "ua-d")
        await task
    assert isinstance(raised, JournalError) or (pending and len(fake.requests) == 1), (
        f"no error mid-run, then pending()={pending}, requests={len(fake.requests)} "
        "within one 5 s window"
    )


DISK_FULL = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys
    from aiodetach import DetachService, DetachSettings
    from aiodetach.testing import FakeHypervisor, Unplug

    async def main(path):
        fake = FakeHypervisor()
        fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.now())
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        s = DetachSettings(timeout=1, attempts=2, journal_sync=sys.argv[2])
        async with DetachService(backend=fake, settings=s, journal=path, log=False) as svc:
            biggest = max(os.path.getsize(p) for p in [path, path + "-wal"] if os.path.exists(p))
            resource.setrlimit(resource.RLIMIT_FSIZE, (biggest, biggest))
            try:
                r = await svc.detach("vm", alias="ua-d")
                out = {"ok": True}
            except Exception as exc:
                out = {"ok": False, "error": type(exc).__name__, "msg": str(exc)}
            out["requests"] = len(fake.requests)
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_disk_full_before_the_row_sends_nothing(tmp_path: Path, sync: str) -> None:
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "j.db"), sync],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["requests"] == 0 or (out["ok"] is False and out["requests"] == 0), out
    if not out["ok"]:
        assert out["error"].startswith("Journal"), out


FORKED = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    from aiodetach import DetachService
    from aiodetach.testing import FakeHypervisor

    async def main(path):
        async with DetachService(backend=FakeHypervisor(), journal=path, log=False):
            if os.fork() == 0:           # a helper process (multiprocessing 'fork', a plugin)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                time.sleep(8)
                os._exit(0)
            print(os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # the agent dies (OOM kill)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_lock_outlives_the_agent_in_a_forked_child(tmp_path: Path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(FORKED)
    journal = tmp_path / "j.db"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), str(journal)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert done.returncode == -9, done.stderr
    try:
        async with DetachService(backend=FakeHypervisor(), journal=journal):
            pass
    except JournalLocked as exc:
        pytest.fail(f"restarted agent refused while the dead agent's forked child lives: {exc}")


@pytest.mark.parametrize("mode", ["close", "cancel"])
async def test_close_or_cancel_at_random_points_never_resends_in_window(
    tmp_path: Path, mode: str
) -> None:
    """Many restarts/cancellations at random moments, all inside one 30 s
    window of a guest that never answers: one request in all, and the journal
    opens each time with at most one unfinished row per device."""
    rnd = random.Random(13)
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    aliases = [f"ua-{i}" for i in range(3)]
    for i, a in enumerate(aliases):
        vm.add_disk(f"vd{chr(98 + i)}", alias=a, unplug=Unplug.manual())
    fake.call_latency = 0.01
    journal = tmp_path / "j.db"
    settings = journal_settings(timeout=30.0, attempts=2)
    for _ in range(25):
        async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
            tasks = [asyncio.create_task(svc.detach("vm", alias=a)) for a in aliases]
            await asyncio.sleep(rnd.uniform(0, 0.03))
            if mode == "cancel":
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(rnd.uniform(0, 0.02))
        await asyncio.gather(*tasks, return_exceptions=True)
        unfinished = [r for r in journal_rows(journal) if r["finished_at"] is None]
        keys = [r["alias"] for r in unfinished]
        assert len(keys) == len(set(keys)), unfinished
    per = {a: sum(1 for r in fake.requests if r.alias == a) for a in aliases}
    assert all(n <= 1 for n in per.values()), per
    # every request sent has its row
    rows = journal_rows(journal)
    for a in aliases:
        if per[a]:
            assert any(r["alias"] == a for r in rows), (a, rows)


async def test_external_write_lock_blocks_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process (a backup, sqlite3 CLI) holds a write transaction:
    the request waits for the journal's busy wait (10 s; 1 s here) and then
    fails typed, having sent nothing."""
    monkeypatch.setattr(_journal, "BUSY_WAIT", 1.0)
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-a", unplug=Unplug.now())
    vm.add_disk("vdc", alias="ua-b", unplug=Unplug.now())
    journal = tmp_path / "j.db"
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        other = sqlite3.connect(journal, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            t0 = time.monotonic()
            with pytest.raises(JournalError):
                await asyncio.wait_for(svc.detach("vm", alias="ua-a"), 20)
            took = time.monotonic() - t0
        finally:
            other.execute("ROLLBACK")
            other.close()
    assert fake.requests == []
    assert 0.9 <= took < 10, took  # the busy wait set, not a fixed 10 s
