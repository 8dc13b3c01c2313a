"""The domain migrates away while its devices are being unplugged.

Two private libvirtd daemons on this machine, each with its own host UUID
(libvirt refuses to migrate to a daemon that reports its own), play source
and destination host; the OS-less guest's PCI unplugs stay pending.  The
source's service must wake every waiter at once with
``DomainStopped(reason="migrated")``, after one request per device.

Measured here (and asserted, so a libvirt that behaves otherwise is noticed):
libvirt migrates a domain with unplugs pending, and the devices are still in
the destination's live XML: the unplug did not travel with the domain, so a
caller must detach again on the new host.

While the migration runs it holds the domain's job, and libvirt blocks every
detach call (live and config) until it ends.  To hold it as long as a test
needs, the *destination's* QEMU is frozen (SIGSTOP) once the memory stream
began: the source cannot finish, and keeps the job, until it is thawed
(:class:`_FrozenMigration`).  Then: a migration that completes fails the
blocked live calls with "domain is not running" at the moment of its
STOPPED/MIGRATED event (``reason`` must be ``"migrated"`` every time); one
cancelled (``abortJob``) lets them through; one held past libvirt's job wait
(30 s) fails them with code 68, which is sent again using no attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
import time
import uuid as _uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import libvirt
import pytest

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import DomainStopped
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd

from .._real import domains_removed, live_xml, quiet, record_requests, until

ALIASES = ("ua-v0", "ua-v1")


def _migrate(source_uri: str, target_uri: str, uuid: str) -> float:
    """Live-migrate ``uuid`` (client-driven); return the seconds it took."""
    quiet()
    source, target = libvirt.open(source_uri), libvirt.open(target_uri)
    try:
        started = time.monotonic()
        # UNSAFE: the disk images are plain files on this machine, not shared storage.
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE
        # The migration stream goes to 127.0.0.1, not to whatever this host's
        # name resolves to.
        source.lookupByUUIDString(uuid).migrate(target, flags, None, "tcp://127.0.0.1", 0)
        return time.monotonic() - started
    finally:
        source.close()
        target.close()


async def test_migrated_away_wakes_every_waiter(
    private_libvirtd: PrivateLibvirtd,
    second_private_libvirtd: PrivateLibvirtd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, target = private_libvirtd, second_private_libvirtd
    sent = record_requests(monkeypatch)
    name = f"rm-{_uuid.uuid4().hex[:6]}"
    disks = [_lab.DiskSpec(f"vd{c}", "virtio", a) for c, a in zip("bc", ALIASES, strict=True)]
    uuid = await asyncio.to_thread(source.define, name, disks)
    with domains_removed(source.uri, [uuid]), domains_removed(target.uri, [uuid]):
        async with DetachService(source.uri, settings=DetachSettings(timeout=60.0)) as svc:
            callers = [
                asyncio.create_task(svc.detach(name, alias=a)) for a in ALIASES for _ in "ab"
            ]
            await until(lambda: len(sent.requests) == 2, 20, "2 requests sent")
            await asyncio.sleep(0.3)
            assert not any(c.done() for c in callers)
            took = await asyncio.to_thread(_migrate, source.tcp_uri, target.tcp_uri, uuid)
            started = time.monotonic()
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*callers, return_exceptions=True)
            woke_after_migration = time.monotonic() - started
            assert svc.pending() == []
        assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
        stopped = [o for o in outcomes if isinstance(o, DomainStopped)]
        assert {o.reason for o in stopped} == {"migrated"}
        assert sorted(o.alias or "" for o in stopped) == sorted(ALIASES * 2)
        assert len(sent.requests) == 2
        # The unplugs did not travel with the domain.
        dest_xml = await asyncio.to_thread(live_xml, target.uri, uuid)
        assert all(f"'{a}'" in dest_xml for a in ALIASES)
    print(
        f"migration: {took:.2f} s; waiters woke {woke_after_migration:.3f} s after "
        "migrate() returned (the STOPPED/MIGRATED event comes before it returns); "
        "devices still attached on the destination"
    )


# ----------------------------------------------------- a migration held open
@dataclass
class _Calls:
    """Every detach call (live and config) this process hands to libvirt:
    when it entered, and libvirt's error code if it was refused."""

    entered: list[tuple[str, str, float]] = field(default_factory=list)
    refused: list[tuple[str, str, int, float]] = field(default_factory=list)

    def of(self, what: str, uuid: str) -> int:
        return sum(1 for w, u, _ in list(self.entered) if (w, u) == (what, uuid))

    def both_blocked(self, uuid: str) -> bool:
        return self.of("detach_config", uuid) == 1 and self.of("detach_live", uuid) == 1

    def timed_out(self, what: str, uuid: str) -> list[float]:
        """How long each call refused with code 68 (job wait over) had waited."""
        return [
            took
            for w, u, code, took in list(self.refused)
            if (w, u, code) == (what, uuid, ErrorCode.OPERATION_TIMEOUT)
        ]


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    calls = _Calls()
    for what in ("detach_live", "detach_config"):
        original = getattr(LibvirtBackend, what)

        def wrapped(
            self: LibvirtBackend, uuid: str, arg: str, _o: Any = original, _w: str = what
        ) -> None:
            started = time.monotonic()
            calls.entered.append((_w, uuid, started))
            try:
                _o(self, uuid, arg)
            except BackendError as err:
                calls.refused.append((_w, uuid, err.code, time.monotonic() - started))
                raise

        monkeypatch.setattr(LibvirtBackend, what, wrapped)
    return calls


def _incoming_qemu(name: str) -> int | None:
    """The PID of the destination's QEMU for domain ``name`` (``-incoming``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-incoming" in argv and any(f"guest={name},".encode() in a for a in argv):
            return int(entry.name)
    return None


class _FrozenMigration:
    """A client-driven live migration whose destination QEMU is frozen
    (SIGSTOP) as soon as the memory stream began, so that the source holds
    the domain's migration job until :meth:`thaw` (it then completes) or
    :meth:`abort` (``abortJob``: cancelled)."""

    def __init__(self, source: PrivateLibvirtd, target: PrivateLibvirtd, uuid: str) -> None:
        quiet()
        self.source, self.target = libvirt.open(source.tcp_uri), libvirt.open(target.tcp_uri)
        self.dom = self.source.lookupByUUIDString(uuid)
        self.name = self.dom.name()
        self.pid: int | None = None
        self.error: libvirt.libvirtError | None = None
        self._thread = threading.Thread(target=self._migrate, daemon=True)

    def _migrate(self) -> None:
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE
        try:
            self.dom.migrate(self.target, flags, None, "tcp://127.0.0.1", 0)
        except libvirt.libvirtError as exc:
            self.error = exc

    def start_and_freeze(self) -> None:
        """In a thread: start it, freeze the destination once memory flows."""
        self.dom.migrateSetMaxSpeed(1)  # MiB/s: the stream lasts a good second
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = cast(dict[str, int], self.dom.jobStats())
            if stats.get("memory_processed", 0) > 0:
                self.pid = _incoming_qemu(self.name)
                if self.pid is not None:
                    os.kill(self.pid, signal.SIGSTOP)
                    return
            time.sleep(0.005)  # a probe of libvirt's progress, not a wait for a result
        raise AssertionError("the migration's memory stream never began")

    def thaw(self) -> None:
        pid, self.pid = self.pid, None
        if pid is not None:
            # A cancelled migration's destination QEMU is killed by its libvirtd.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def abort(self) -> float:
        """Cancel it (``abortJob``) and thaw the destination; when it was aborted."""
        self.dom.abortJob()
        at = time.monotonic()
        self.thaw()
        return at

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the migration did not end"

    def close(self) -> None:
        self.thaw()
        self._thread.join(60)
        self.source.close()
        self.target.close()


@contextmanager
def _frozen_migration(
    source: PrivateLibvirtd, target: PrivateLibvirtd, uuid: str
) -> Iterator[_FrozenMigration]:
    migration = _FrozenMigration(source, target, uuid)
    try:
        yield migration
    finally:
        migration.close()


def _define(daemon: PrivateLibvirtd, bus: str, aliases: tuple[str, ...]) -> tuple[str, str]:
    name = f"rm-{_uuid.uuid4().hex[:6]}"
    targets = ("sda", "sdb") if bus == "scsi" else ("vdb", "vdc")
    disks = [_lab.DiskSpec(t, bus, a) for t, a in zip(targets, aliases, strict=True)]
    return name, daemon.define(name, disks)


async def test_migration_completing_under_blocked_requests_says_migrated(
    private_libvirtd: PrivateLibvirtd,
    second_private_libvirtd: PrivateLibvirtd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race of the refusal ("domain is not running", code 55) and the
    STOPPED/MIGRATED event, five times: with the defaults (the config detach
    is the blocked call; it then edits the source's inactive definition) and
    with ``persistent=False`` (the live request is), ``reason`` is
    ``"migrated"`` every time."""
    source, target = private_libvirtd, second_private_libvirtd
    calls = _record_calls(monkeypatch)
    woke: list[float] = []
    async with DetachService(source.uri, settings=DetachSettings(timeout=60.0)) as svc:
        for _ in range(5):
            name, uuid = await asyncio.to_thread(_define, source, "virtio", ALIASES)
            with domains_removed(source.uri, [uuid]), domains_removed(target.uri, [uuid]):
                with _frozen_migration(source, target, uuid) as migration:
                    await asyncio.to_thread(migration.start_and_freeze)
                    defaults = asyncio.create_task(svc.detach(name, alias=ALIASES[0]))
                    live_only = asyncio.create_task(
                        svc.detach(name, alias=ALIASES[1], persistent=False)
                    )
                    await until(
                        functools.partial(calls.both_blocked, uuid),
                        20,
                        "both calls blocked by the migration",
                    )
                    assert not defaults.done()
                    assert not live_only.done()
                    migration.thaw()
                    thawed = time.monotonic()
                    async with asyncio.timeout(30):
                        outcomes = await asyncio.gather(defaults, live_only, return_exceptions=True)
                    woke.append(time.monotonic() - thawed)
                    await asyncio.to_thread(migration.join)
                    assert migration.error is None, migration.error
                assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
                assert [o.reason for o in outcomes if isinstance(o, DomainStopped)] == [
                    "migrated",
                    "migrated",
                ]
                first, second = outcomes
                assert isinstance(first, DomainStopped)
                assert isinstance(second, DomainStopped)
                # The config detach ran on the source's (now inactive) definition.
                assert (first.persistent_done, second.persistent_done) == (True, False)
                inactive = await asyncio.to_thread(live_xml, source.uri, uuid, inactive=True)
                assert f"'{ALIASES[0]}'" not in inactive
                assert f"'{ALIASES[1]}'" in inactive
                assert svc.pending() == []
    assert not calls.timed_out("detach_live", uuid)
    print(f"woke {min(woke):.2f}-{max(woke):.2f} s after the destination was thawed")


async def test_cancelled_migration_lets_the_request_through(
    private_libvirtd: PrivateLibvirtd,
    second_private_libvirtd: PrivateLibvirtd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``abortJob`` ends the job: the blocked request goes through, the SCSI
    disk's DEVICE_REMOVED follows, one attempt."""
    source, target = private_libvirtd, second_private_libvirtd
    sent = record_requests(monkeypatch)
    name, uuid = await asyncio.to_thread(_define, source, "scsi", ("ua-s0", "ua-s1"))
    with domains_removed(source.uri, [uuid]), domains_removed(target.uri, [uuid]):
        async with DetachService(source.uri, settings=DetachSettings(timeout=20.0)) as svc:
            with _frozen_migration(source, target, uuid) as migration:
                await asyncio.to_thread(migration.start_and_freeze)
                calls = _record_calls(monkeypatch)
                caller = asyncio.create_task(svc.detach(name, alias="ua-s0", persistent=False))
                await until(lambda: calls.of("detach_live", uuid) == 1, 20, "request blocked")
                aborted = await asyncio.to_thread(migration.abort)
                async with asyncio.timeout(20):
                    result = await caller
                answered = sent.matching("ua-s0")[0].ended - aborted
                await asyncio.to_thread(migration.join)
            assert migration.error is not None  # "operation aborted: … canceled by client"
            assert isinstance(result, DetachResult)
            assert (result.live, result.attempts, result.confirmed_by) == (True, 1, "event")
            assert len(sent.matching("ua-s0")) == 1
            assert "'ua-s0'" not in await asyncio.to_thread(live_xml, source.uri, uuid)
    print(f"the blocked request was answered {answered:.3f} s after abortJob")


@pytest.mark.slow
async def test_job_held_past_libvirts_wait_is_waited_out_using_no_attempt(
    private_libvirtd: PrivateLibvirtd,
    second_private_libvirtd: PrivateLibvirtd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libvirt gives up on the job after 30 s with code 68 ("cannot acquire
    state change lock"): the live request and the config detach are sent
    again, using no attempt (``attempts=1``), and succeed once the migration
    is cancelled."""
    source, target = private_libvirtd, second_private_libvirtd
    sent = record_requests(monkeypatch)
    calls = _record_calls(monkeypatch)
    name, uuid = await asyncio.to_thread(_define, source, "scsi", ("ua-s0", "ua-s1"))
    settings = DetachSettings(timeout=20.0, attempts=1)
    with domains_removed(source.uri, [uuid]), domains_removed(target.uri, [uuid]):
        async with DetachService(source.uri, settings=settings) as svc:
            with _frozen_migration(source, target, uuid) as migration:
                await asyncio.to_thread(migration.start_and_freeze)
                defaults = asyncio.create_task(svc.detach(name, alias="ua-s0"))
                live_only = asyncio.create_task(svc.detach(name, alias="ua-s1", persistent=False))
                await until(
                    lambda: bool(
                        calls.timed_out("detach_live", uuid)
                        and calls.timed_out("detach_config", uuid)
                    ),
                    90,
                    "both calls refused after libvirt's job wait",
                )
                # Sent again at once: blocked in libvirt again, nobody has an error.
                await until(
                    lambda: (
                        calls.of("detach_live", uuid) == 2 and calls.of("detach_config", uuid) == 2
                    ),
                    10,
                    "both sent again",
                )
                assert not defaults.done()
                assert not live_only.done()
                await asyncio.to_thread(migration.abort)
                async with asyncio.timeout(30):
                    first, second = await asyncio.gather(defaults, live_only)
                await asyncio.to_thread(migration.join)
    assert (first.persistent, first.live, first.attempts) == (True, True, 1)
    assert (second.persistent, second.live, second.attempts) == (False, True, 1)
    refused = [r for r in sent.matching("ua-s1") if r.code == ErrorCode.OPERATION_TIMEOUT]
    assert refused
    assert all("state change lock" in (r.error or "") for r in refused)
    waited = calls.timed_out("detach_live", uuid) + calls.timed_out("detach_config", uuid)
    print(f"code 68 after {min(waited):.2f}-{max(waited):.2f} s: {refused[0].error}")
