"""Another job holding the domain, and a migration ending, attacked from the
public API (docs/protocol.md rules 2, 3, 5 and 6; docs/testing.md's fake job).

Each test is one way a caller, a guest or the hypervisor may interleave with a
held job: several callers, callers leaving while the job holds the domain
(nothing may be sent for nobody afterwards, by either half), the domain
destroyed or migrated while a call is blocked, the service closed while a
call is blocked (``aclose()`` must not wait out libvirt's 30 s job wait), a
verdict landing while a blocked request is out, and a code 68 that is not a
job at all (it must not be waited on for ever).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from _probes import until
from aiodetach import BlockingDetachService, DetachService, DetachSettings
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import (
    DetachTimeout,
    DomainStopped,
    HypervisorError,
    ServiceClosed,
)
from aiodetach.instrumentation import UnplugRecord
from aiodetach.testing import FakeHypervisor, GuestUnplug

SETTINGS = DetachSettings(attempts=2, timeout=5.0)
BOUND = 15.0
"""A generous bound on something that must not wait out a 30 s job wait."""


class Gate:
    """Hold the ``nth`` call of ``name`` at its very start (in its worker
    thread), so a test can make things happen while that call is on its way:
    once a call is here the library has already decided to send it."""

    def __init__(self, fake: FakeHypervisor, name: str, nth: int) -> None:
        self.name, self.nth, self.seen = name, nth, 0
        self.reached = threading.Event()
        self.open = threading.Event()
        self._lock = threading.Lock()
        fake.before_call = self

    def __call__(self, name: str) -> None:
        if name != self.name:
            return
        with self._lock:
            self.seen += 1
            mine = self.seen == self.nth
        if mine:
            self.reached.set()
            self.open.wait(BOUND)


# ------------------------------------------------------------- several callers
async def test_several_callers_held_by_a_job_share_one_request(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.later(0.02))
    async with DetachService(backend=fake, settings=DetachSettings(attempts=1)) as svc:
        fake.hold_job("vm", wait=0.05)
        callers = [asyncio.create_task(svc.detach("vm", alias="ua-d")) for _ in range(4)]
        await until(lambda: len(fake.job_timeouts) >= 2, 10, "2 refusals")
        fake.release_job("vm")
        results = await asyncio.gather(*callers)
    assert len(fake.config_requests) == 1
    assert len(fake.requests) == 1
    assert {(r.live, r.persistent, r.attempts) for r in results} == {(True, True, 1)}


async def test_one_caller_leaving_a_held_job_leaves_the_others_served(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.later(0.02))
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm", wait=0.05)
        stay = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        leave = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.job_timeouts) >= 1, 10, "a refusal")
        leave.cancel()
        await until(lambda: len(fake.job_timeouts) >= 3, 10, "3 refusals")
        fake.release_job("vm")
        result = await stay
    assert leave.cancelled()
    assert (result.attempts, result.confirmed_by, len(fake.requests)) == (1, "event", 1)


# ----------------------------------------- callers leaving: nothing sent for nobody
async def test_config_half_sends_nothing_once_its_callers_left_a_held_job(
    fake: FakeHypervisor,
) -> None:
    """Refused quickly (code 68), the config detach waits a moment before it
    is sent again; the caller leaving during that moment must end it.  The
    job then ending must not let a config detach through for nobody."""
    vm = fake.add_domain("vm")
    dev = vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    gate = Gate(fake, "detach_config", nth=2)  # a second send, if any, waits here
    svc = DetachService(backend=fake, settings=SETTINGS)
    await svc.open()
    try:
        fake.hold_job("vm", wait=0.05)
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: len(fake.job_timeouts) >= 1, 10, "a refusal")
        caller.cancel()  # inside the gap before the next send (1 s)
        with pytest.raises(asyncio.CancelledError):
            await caller
        fake.release_job("vm")  # the migration is cancelled
        # A send for nobody would come at the end of the gap: give it the
        # chance (closing the service earlier would hide it).
        sent_again = await asyncio.to_thread(gate.reached.wait, 3.0)
    finally:
        gate.open.set()
        async with asyncio.timeout(BOUND):
            await svc.aclose()
    assert not sent_again
    assert fake.config_requests == []
    assert dev.config is True
    assert fake.calls.count("detach_config") == 1


async def test_live_half_sends_nothing_once_its_callers_left_a_held_job(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    gate = Gate(fake, "detach_live", nth=2)
    svc = DetachService(backend=fake, settings=SETTINGS)
    await svc.open()
    try:
        fake.hold_job("vm", wait=0.05)
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.job_timeouts) >= 1, 10, "a refusal")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await until(lambda: svc.pending() == [], 5, "nothing pending")
        fake.release_job("vm")
        sent_again = await asyncio.to_thread(gate.reached.wait, 3.0)
    finally:
        gate.open.set()
        async with asyncio.timeout(BOUND):
            await svc.aclose()
    assert not sent_again
    assert fake.requests == []
    assert fake.calls.count("detach_live") == 1


async def test_re_send_held_by_a_job_is_not_sent_once_its_callers_left(
    fake: FakeHypervisor,
) -> None:
    """The first request was accepted; the job began after it.  The re-send
    refused by the job is not sent again for nobody, and the unplug lingers
    with its attempts (rule 3) rather than starting over."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    settings = DetachSettings(attempts=3, timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 5, "first request")
        fake.hold_job("vm", wait=0.05)
        await until(lambda: len(fake.job_timeouts) >= 1, 10, "re-send refused")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        refused = len(fake.job_timeouts)
        await until(lambda: svc.pending() == [], 10, "dropped")
        fake.release_job("vm")
    assert len(fake.requests) == 1
    assert len(fake.job_timeouts) <= refused + 1  # at most the call out when it left


# ------------------------------------------------------- attempts and records
async def test_a_job_held_across_several_windows_uses_no_attempt(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    records: list[UnplugRecord] = []

    def hook(r: object) -> None:
        if isinstance(r, UnplugRecord):
            records.append(r)

    settings = DetachSettings(attempts=2, timeout=0.3)
    async with DetachService(backend=fake, settings=settings, hooks=[hook]) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 5, "first request")
        fake.hold_job("vm", wait=0.05)
        # Refused for longer than several windows (1 s apart each).
        await until(lambda: len(fake.job_timeouts) >= 3, 15, "3 refusals")
        assert not caller.done()
        fake.release_job("vm")
        with pytest.raises(DetachTimeout) as info:
            await caller
    assert info.value.attempts == 2
    assert len(fake.requests) == 2
    kinds = [r.kind for r in records]
    assert kinds.count("job_held") == len(fake.job_timeouts)
    assert kinds.count("attempt_timed_out") == 2


# ------------------------------------------------------- the domain stops meanwhile
@pytest.mark.parametrize("persistent", [False, None])
async def test_domain_destroyed_under_a_held_job_says_destroyed_at_once(
    fake: FakeHypervisor, persistent: bool | None
) -> None:
    """libvirt's destroy ends the migration (its job with it): the calls it
    blocked go on, and the caller learns "destroyed" without waiting out
    libvirt's 30 s job wait, whichever half was blocked."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")  # libvirt's 30 s wait
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=persistent))
        half = "detach_live" if persistent is False else "detach_config"
        await until(lambda: fake.calls.count(half) >= 1, 5, "blocked")
        fake.stop_domain("vm", reason="destroyed")
        with pytest.raises(DomainStopped) as info:
            async with asyncio.timeout(BOUND):
                await caller
    assert info.value.reason == "destroyed"
    assert fake.requests == []


@pytest.mark.parametrize("persistent", [False, None])
async def test_migration_ending_after_refusals_says_migrated(
    fake: FakeHypervisor, persistent: bool | None
) -> None:
    """Refused by the job a few times, then the migration completes (its
    event lost): still "migrated", never "stopped"."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm", wait=0.05)
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=persistent))
        await until(lambda: len(fake.job_timeouts) >= 2, 10, "2 refusals")
        fake.finish_migration("vm", event="lost")
        with pytest.raises(DomainStopped) as info:
            await caller
    assert info.value.reason == "migrated"
    assert fake.requests == []


async def test_config_half_migration_with_its_event_lost_says_migrated(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: fake.calls.count("detach_config") >= 1, 5, "blocked")
        fake.finish_migration("vm", event="lost")
        with pytest.raises(DomainStopped) as info:
            await caller
    assert (info.value.reason, info.value.persistent_done) == ("migrated", True)


# ------------------------------------------------------------------- close
@pytest.mark.parametrize("persistent", [False, None])
async def test_close_under_a_held_job_does_not_wait_out_the_job(
    fake: FakeHypervisor, persistent: bool | None
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    svc = DetachService(backend=fake, settings=SETTINGS)
    await svc.open()
    fake.hold_job("vm")  # libvirt's 30 s wait
    caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=persistent))
    half = "detach_live" if persistent is False else "detach_config"
    await until(lambda: fake.calls.count(half) >= 1, 5, "blocked")
    try:
        async with asyncio.timeout(BOUND):
            await svc.aclose()
        with pytest.raises(ServiceClosed):
            await caller
    finally:
        fake.release_job("vm")
    assert fake.requests == []


# ----------------------------------------------- a verdict while a request is held
@pytest.mark.xfail(
    strict=True,
    reason="a verdict that lands while a request is in its thread is kept until libvirt "
    "answers (the machine's SENDING rows); a request blocked by a job answers after "
    "libvirt's 30 s job wait, so the caller waits that long for a verdict it already has. "
    "(On real libvirt the DEVICE_REMOVED itself needs the job, so it rarely lands there.)",
)
async def test_device_removed_while_a_held_re_send_is_out_ends_the_unplug(
    fake: FakeHypervisor,
) -> None:
    """The first request's unplug completes while the re-send is blocked by
    the job: that verdict is the caller's, without waiting out the job."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.manual())
    settings = DetachSettings(attempts=3, timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 5, "first request")
        fake.hold_job("vm")  # libvirt's 30 s wait
        await until(lambda: fake.calls.count("detach_live") >= 2, 10, "re-send blocked")
        fake.complete("vm", "ua-d")
        try:
            async with asyncio.timeout(3.0):  # the job holds the re-send for 30 s
                result = await caller
        finally:
            fake.release_job("vm")
    assert (result.live, result.confirmed_by, result.attempts) == (True, "event", 2)


async def test_device_removed_during_a_job_back_off_ends_the_unplug(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.manual())
    settings = DetachSettings(attempts=3, timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 5, "first request")
        fake.hold_job("vm", wait=0.05)
        await until(lambda: len(fake.job_timeouts) >= 1, 10, "re-send refused")
        fake.complete("vm", "ua-d")
        result = await caller
        fake.release_job("vm")
    assert (result.live, result.confirmed_by) == (True, "event")
    assert len(fake.requests) == 1


# --------------------------------------------- a code 68 that is not a held job
class OtherTimeout:
    """Every detach call fails with code 68 for a reason that is not a job."""

    def __init__(self, fake: FakeHypervisor) -> None:
        self.refused = 0
        fake.before_call = self

    def __call__(self, name: str) -> None:
        if name in ("detach_live", "detach_config"):
            self.refused += 1
            raise BackendError(
                ErrorCode.OPERATION_TIMEOUT,
                "Timed out during operation: the guest agent did not answer",
            )


@pytest.mark.parametrize("persistent", [False, None])
async def test_code_68_that_is_not_a_held_job_is_not_waited_on_for_ever(
    fake: FakeHypervisor, persistent: bool | None
) -> None:
    """Only "cannot acquire state change lock" says another job held the
    domain and the call did nothing; another code 68 is an error like any
    other, not a reason to send again for as long as the caller waits."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    other = OtherTimeout(fake)
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        with pytest.raises(HypervisorError) as info:
            async with asyncio.timeout(BOUND):
                await svc.detach("vm", alias="ua-d", persistent=persistent)
    assert info.value.libvirt_code == ErrorCode.OPERATION_TIMEOUT
    assert other.refused == 1


# ------------------------------------------------------- a thread's own deadline
@pytest.mark.parametrize("persistent", [False, None])
def test_blocking_callers_deadline_bounds_a_held_job(
    fake: FakeHypervisor, persistent: bool | None
) -> None:
    """A thread's ``timeout=`` is its own deadline, as ``asyncio.timeout`` is:
    once it passed, the job ending lets nothing through for nobody."""
    vm = fake.add_domain("vm")
    dev = vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    with BlockingDetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm", wait=0.05)
        with pytest.raises(TimeoutError):
            svc.detach("vm", alias="ua-d", persistent=persistent, timeout=1.5)
        refused = len(fake.job_timeouts)
        fake.release_job("vm")
    # The call out when the caller left may still go through (it was sent);
    # anything after it would be a call for nobody.
    half = "detach_live" if persistent is False else "detach_config"
    assert fake.calls.count(half) <= refused + 1
    assert fake.requests == []
    if persistent is None:
        assert len(fake.config_requests) <= 1
        assert dev.live is True


# ------------------------------------------------------------ across a restart
async def test_a_request_refused_by_a_job_is_no_attempt_after_a_restart(
    fake: FakeHypervisor, tmp_path: Path
) -> None:
    """The journal must not count a request the job refused: a service
    restarted after it (the job ended meanwhile) sends, it does not wait out
    a window for it nor count it against ``attempts``."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    journal = tmp_path / "j.db"
    settings = DetachSettings(attempts=1, timeout=5.0, journal_sync="normal")
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        fake.hold_job("vm", wait=0.05)
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.job_timeouts) >= 2, 10, "2 refusals")
    with pytest.raises(ServiceClosed):
        await caller
    fake.release_job("vm")
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        async with asyncio.timeout(BOUND):
            result = await svc.detach("vm", alias="ua-d", persistent=False)
    assert (result.live, result.attempts) == (True, 1)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("event", ["before", "lost"])
async def test_migration_completing_during_a_window_says_migrated(
    fake: FakeHypervisor, event: str
) -> None:
    """The request was accepted before the migration took the job: nothing of
    ours is blocked, the window runs; the migration completing ends it as
    "migrated", from the event or (lost) from the re-check's state read."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    settings = DetachSettings(attempts=3, timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 5, "first request")
        fake.hold_job("vm")
        fake.finish_migration("vm", event=event)  # type: ignore[arg-type]
        with pytest.raises(DomainStopped) as info:
            await caller
    assert info.value.reason == "migrated"
    assert len(fake.requests) == 1
