"""The journal on the fake hypervisor (a fake, not libvirt).

A process restart is modelled by closing a service while its unplug is
pending in the fake guest (``Unplug.manual()`` keeps it pending) and opening
a new service on the same journal: the old service's memory is gone, the
fake guest's state and the journal file are what is left, as after a kill.
"""

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
from aiodetach import DetachFleet, DetachService, _journal
from aiodetach.errors import (
    DetachTimeout,
    DeviceNotFound,
    JournalCorrupt,
    JournalError,
    JournalLocked,
    JournalUnavailable,
    JournalVersionError,
)
from aiodetach.instrumentation import Record, UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug

from ._journal_support import (
    fleet_killed_mid_unplug,
    journal_rows,
    journal_settings,
    killed_mid_unplug,
    until_uris,
)


@pytest.fixture
def vm(fake: FakeHypervisor) -> FakeHypervisor:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    return fake


async def test_without_a_journal_nothing_is_written(
    vm: FakeHypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with DetachService(backend=vm, settings=journal_settings()) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        while not vm.requests:
            await asyncio.sleep(0.005)
        vm.complete("vm", "ua-d")
        result = await task
    assert not result.resumed
    assert list(tmp_path.iterdir()) == []  # noqa: ASYNC240 - a test's tmp dir


async def test_restart_joins_the_pending_unplug_without_a_request(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    await killed_mid_unplug(vm, journal, journal_settings())
    [row] = journal_rows(journal)
    assert row["finished_at"] is None, "closing mid-unplug is not an outcome"
    assert (row["sent"], row["used"], row["alias"]) == (1, 0, "ua-d")
    # Its description and its identity (identifiers only, no XML).
    assert row["device"] == "disk target='vdb' alias='ua-d' ('disk', 'vdb')"

    records: list[Record] = []
    async with DetachService(
        backend=vm, settings=journal_settings(), journal=journal, hooks=[records.append]
    ) as svc:
        uuid = vm.domain("vm").uuid
        assert svc.pending() == [(uuid, "ua-d")]
        [found] = svc.recovered()
        assert (found.outcome, found.alias, found.sent) == ("pending", "ua-d", 1)
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await asyncio.sleep(0.1)
        vm.complete("vm", "ua-d")
        result = await task
    assert len(vm.requests) == 1, vm.requests
    assert (result.resumed, result.joined, result.attempts) == (True, True, 1)
    assert result.confirmed_by == "event"
    assert result.persistent, "the first run's persistent half is the device's"
    steps = [r.kind for r in records if isinstance(r, UnplugRecord)]
    assert steps[:2] == ["started", "recovered"]
    assert steps[-2:] == ["removed", "ended"]
    assert all(r.resumed for r in records if isinstance(r, UnplugRecord))
    [row] = journal_rows(journal)
    assert (row["outcome"], row["confirmed_by"]) == ("removed", "event")


async def test_finished_while_down_is_reported_detached_by_xml(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    await killed_mid_unplug(vm, journal, journal_settings())
    vm.complete("vm", "ua-d")  # the guest lets go while no service runs
    records: list[Record] = []
    async with DetachService(
        backend=vm, settings=journal_settings(), journal=journal, hooks=[records.append]
    ) as svc:
        assert svc.pending() == []
        [found] = svc.recovered()
        assert (found.outcome, found.confirmed_by) == ("removed", "xml")
        with pytest.raises(DeviceNotFound):
            await svc.detach("vm", alias="ua-d")
    assert len(vm.requests) == 1
    removed = [r for r in records if isinstance(r, UnplugRecord) and r.kind == "removed"]
    assert [r.confirmed_by for r in removed] == ["xml"]
    [row] = journal_rows(journal)
    assert (row["outcome"], row["confirmed_by"]) == ("removed", "xml")


async def test_no_request_before_the_window_ends_then_attempts_counted(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    settings = journal_settings(attempts=1, timeout=1.0)
    await killed_mid_unplug(vm, journal, settings)
    sent_at = float(journal_rows(journal)[0]["sent_at"])  # type: ignore[arg-type]
    async with DetachService(backend=vm, settings=settings, journal=journal) as svc:
        with pytest.raises(DetachTimeout) as caught:
            await svc.detach("vm", alias="ua-d")
        ended = time.time()
    assert len(vm.requests) == 1, "the one attempt was the first run's"
    assert caught.value.attempts == 1
    assert ended >= sent_at + 1.0 - 0.05, "the window was waited out"
    assert journal_rows(journal)[0]["outcome"] == "timeout"


async def test_after_the_window_the_resend_counts_the_attempts(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    settings = journal_settings(attempts=2, timeout=0.5)
    await killed_mid_unplug(vm, journal, settings)
    await asyncio.sleep(0.6)  # the window ends while no service runs
    async with DetachService(backend=vm, settings=settings, journal=journal) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        while len(vm.requests) < 2:
            await asyncio.sleep(0.005)
        vm.complete("vm", "ua-d")
        result = await task
    assert result.attempts == 2
    assert result.resumed
    [row] = journal_rows(journal)
    assert (row["sent"], row["used"], row["outcome"]) == (2, 1, "removed")


async def test_nobody_asks_again_then_it_is_dropped_without_a_request(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    settings = journal_settings(timeout=0.2)
    await killed_mid_unplug(vm, journal, settings)
    async with DetachService(backend=vm, settings=settings, journal=journal) as svc:
        assert len(svc.pending()) == 1
        await asyncio.sleep(0.8)  # window (≤ 0.2 s) + one timeout of lingering
        assert svc.pending() == []
    assert len(vm.requests) == 1
    assert journal_rows(journal)[0]["outcome"] == "abandoned"


async def test_domain_restarted_or_gone_means_the_request_died(
    fake: FakeHypervisor, tmp_path: Path
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    fake.add_domain("gone", persistent=False).add_disk("vdb", alias="ua-g", unplug=Unplug.manual())
    journal = tmp_path / "j.db"
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias="ua-d")),
            asyncio.create_task(svc.detach("gone", alias="ua-g")),
        ]
        while len(fake.requests) < 2:
            await asyncio.sleep(0.005)
    await asyncio.gather(*tasks, return_exceptions=True)
    fake.domain("vm").run += 1  # destroyed and started again: a new QEMU
    fake.stop_domain("gone")  # transient: undefined
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        assert svc.pending() == []
        found = {r.alias: (r.outcome, r.reason) for r in svc.recovered()}
        assert found == {"ua-d": ("stopped", "restarted"), "ua-g": ("stopped", "undefined")}
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        while len(fake.requests) < 3:
            await asyncio.sleep(0.005)
        fake.complete("vm", "ua-d")
        result = await task
    assert not result.resumed
    assert result.attempts == 1


async def test_alias_reused_by_another_device_is_not_taken_up(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    await killed_mid_unplug(vm, journal, journal_settings())
    vm.complete("vm", "ua-d")
    vm.domain("vm").add_disk("vdz", alias="ua-d", unplug=Unplug.manual())  # a new device
    async with DetachService(backend=vm, settings=journal_settings(), journal=journal) as svc:
        assert svc.pending() == []
        assert [r.outcome for r in svc.recovered()] == ["removed"]


async def test_a_second_service_on_the_journal_is_refused(
    vm: FakeHypervisor, tmp_path: Path
) -> None:
    journal = tmp_path / "j.db"
    async with DetachService(backend=vm, settings=journal_settings(), journal=journal):
        other = FakeHypervisor()
        with pytest.raises(JournalLocked) as caught:
            async with DetachService(backend=other, journal=journal):
                pass
        assert str(os.getpid()) in caught.value.message
        assert other.calls == [], "the domain untouched: libvirt not even contacted"
        # Another process is refused as well (flock, not a per-process lock).
        code = (
            "import sys; from aiodetach._journal import Journal\n"
            "from aiodetach.errors import JournalLocked\n"
            "try:\n    Journal.open(sys.argv[1], synchronous='full', retention=1)\n"
            "except JournalLocked:\n    sys.exit(42)\n"
        )
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code, str(journal)], check=False
        )
        assert done.returncode == 42
    async with DetachService(backend=vm, settings=journal_settings(), journal=journal):
        pass  # released at close


async def test_newer_format_is_refused_untouched(vm: FakeHypervisor, tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    async with DetachService(backend=vm, journal=journal):
        pass
    db = sqlite3.connect(journal)
    db.execute("PRAGMA user_version=7")
    db.close()
    before = journal.read_bytes()
    with pytest.raises(JournalVersionError):
        async with DetachService(backend=vm, journal=journal):
            pass
    assert journal.read_bytes() == before
    assert vm.calls.count("open") == 1


@pytest.mark.parametrize("content", ["garbage", "foreign", "half"])
async def test_corrupted_file_is_refused_untouched(
    fake: FakeHypervisor, tmp_path: Path, content: str
) -> None:
    journal = tmp_path / "j.db"
    if content == "garbage":
        journal.write_bytes(os.urandom(8192))
    elif content == "foreign":
        db = sqlite3.connect(journal)
        db.execute("CREATE TABLE other (x)")
        db.commit()
        db.close()
    else:  # a real journal, its second half overwritten
        async with DetachService(backend=fake, journal=journal):
            pass
        db = sqlite3.connect(journal)
        db.execute("CREATE TABLE filler (x)")
        db.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(200)])
        db.commit()
        db.close()
        data = bytearray(journal.read_bytes())
        data[4096:] = os.urandom(len(data) - 4096)
        journal.write_bytes(bytes(data))
    before, calls = journal.read_bytes(), list(fake.calls)
    with pytest.raises(JournalCorrupt):
        async with DetachService(backend=fake, journal=journal):
            pass
    assert journal.read_bytes() == before
    assert fake.calls == calls, "libvirt contacted for a file refused"


async def test_unusable_places_are_refused(fake: FakeHypervisor, tmp_path: Path) -> None:
    with pytest.raises(JournalUnavailable):
        await DetachService(backend=fake, journal=tmp_path / "missing" / "j.db").open()
    with pytest.raises(JournalUnavailable):
        await DetachService(backend=fake, journal=tmp_path).open()
    assert fake.calls == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a read-only tmpfs")
async def test_read_only_directory_is_refused(fake: FakeHypervisor, tmp_path: Path) -> None:
    where = tmp_path / "ro"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        with pytest.raises(JournalUnavailable) as caught:
            await DetachService(backend=fake, journal=where / "j.db").open()
        assert "Read-only" in caught.value.message
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(where)], check=True)
    assert fake.calls == []


async def test_a_failed_journal_write_sends_nothing(
    vm: FakeHypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(point: str) -> None:
        if point == "request.written":
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(_journal, "fault", disk_full)
    async with DetachService(
        backend=vm, settings=journal_settings(), journal=tmp_path / "j.db"
    ) as svc:
        with pytest.raises(JournalUnavailable) as caught:
            await svc.detach("vm", alias="ua-d")
    assert vm.requests == []
    assert (caught.value.domain, caught.value.alias) == ("vm", "ua-d")
    assert isinstance(caught.value, JournalError)


async def test_finished_rows_are_pruned_and_hold_no_xml(vm: FakeHypervisor, tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    vm.domain("vm").add_disk("vdc", alias="ua-e", unplug=Unplug.now())
    async with DetachService(backend=vm, settings=journal_settings(), journal=journal) as svc:
        await svc.detach("vm", alias="ua-e")
    [row] = journal_rows(journal)
    assert row["outcome"] == "removed"
    assert not any("<" in str(v) for v in row.values()), row
    db = sqlite3.connect(journal)
    db.execute("UPDATE unplugs SET finished_at = finished_at - 3600")
    db.commit()
    db.close()
    async with DetachService(
        backend=vm, settings=journal_settings(journal_retention=60), journal=journal
    ):
        pass
    assert journal_rows(journal) == []


async def test_fleet_shares_one_journal_and_takes_up_every_host(tmp_path: Path) -> None:
    settings = journal_settings()
    hosts, journal = await fleet_killed_mid_unplug(tmp_path, settings)
    async with DetachFleet(
        settings=settings, backend_factory=hosts.__getitem__, journal=journal
    ) as fleet:
        await until_uris(fleet, sorted(hosts))  # hosts with unfinished unplugs are opened
        tasks = [asyncio.create_task(fleet.detach(uri, "vm", alias="ua-d")) for uri in hosts]
        await asyncio.sleep(0.1)
        for fake in hosts.values():
            fake.complete("vm", "ua-d")
        results = await asyncio.gather(*tasks)
    assert all(r.resumed for r in results)
    assert all(len(f.requests) == 1 for f in hosts.values())
    with pytest.raises(JournalLocked):
        async with DetachFleet(journal=journal) as fleet, DetachFleet(journal=journal):
            pass


def test_cli_takes_a_journal_and_exits_13_when_it_is_locked(tmp_path: Path) -> None:
    helper = Path(__file__).with_name("_cli_on_fake.py")
    env = child_env()
    journal = tmp_path / "j.db"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(helper), *args, "--journal", str(journal)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    done = run("detach", "vm", "--alias", "ua-ok0")
    assert done.returncode == 0, done.stderr
    assert [r["outcome"] for r in journal_rows(journal)] == ["removed"]
    held = _journal.Journal.open(journal, synchronous="full", retention=60)
    try:
        for args in (("detach", "vm", "--alias", "ua-ok1"), ("detach-many", os.devnull)):
            done = run(*args)
            assert done.returncode == 13, (args, done.stdout, done.stderr)
            assert "JournalLocked" in done.stderr
    finally:
        held.close()
