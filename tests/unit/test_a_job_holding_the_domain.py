"""A detach while another job holds the domain (a live migration), on the fake.

libvirt blocks every detach call, live or config, while a migration holds
the domain's job (measured on libvirt 9.0; tests/real/private/
test_migration_while_pending.py is the real counterpart):

- the migration completes: the blocked calls fail with "domain is not
  running" at the moment libvirt emits STOPPED/MIGRATED, and either may reach
  the client first.  The callers must learn ``reason="migrated"`` every time
  (the device is still attached on the new host), never "stopped";
- the job outlasts libvirt's wait for it (30 s): the calls fail with code 68
  having done nothing.  That is "not taken": sent again, using no attempt,
  for as long as a caller waits, for the live and the config half alike;
- the migration is cancelled: the calls go through, one request, success.

The fake's :meth:`~aiodetach.testing.FakeHypervisor.hold_job` stands for the
migration's job, with a job wait of a fraction of a second for libvirt's 30 s.
"""

from __future__ import annotations

import asyncio

import pytest

from _probes import until
from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DomainStopped
from aiodetach.testing import FakeHypervisor, GuestUnplug

SETTINGS = DetachSettings(attempts=2, timeout=5.0)


async def _blocked(fake: FakeHypervisor, call: str, n: int = 1) -> None:
    """``n`` calls of ``call`` are blocked by the job (the fake counts entries)."""
    await until(lambda: fake.calls.count(call) >= n, 5, f"{n} {call} blocked")


# ------------------------------------------------------- the migration completes
@pytest.mark.parametrize("event", ["before", "after", "lost"])
async def test_migration_completing_under_a_live_request_says_migrated(
    fake: FakeHypervisor, event: str
) -> None:
    """The request fails "not running" with the STOPPED/MIGRATED event before
    it, after it, or lost: the domain's shutoff reason says why."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")
        callers = [
            asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False)) for _ in "ab"
        ]
        await _blocked(fake, "detach_live")
        fake.finish_migration("vm", event=event)  # type: ignore[arg-type]
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert svc.pending() == []
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, DomainStopped)} == {"migrated"}
    assert fake.requests == []  # the blocked request never reached the guest


@pytest.mark.parametrize("event", ["before", "after"])
async def test_migration_completing_under_the_config_half_says_migrated(
    fake: FakeHypervisor, event: str
) -> None:
    """With the defaults the config detach is the blocked call: it then edits
    the source's now-inactive definition (``persistent_done``), and the live
    request, refused "not running", reports the migration."""
    vm = fake.add_domain("vm")
    dev = vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _blocked(fake, "detach_config")
        fake.finish_migration("vm", event=event)  # type: ignore[arg-type]
        with pytest.raises(DomainStopped) as info:
            await caller
    assert info.value.reason == "migrated"
    assert info.value.persistent_done is True
    assert dev.config is False  # removed from the source's (inactive) definition


async def test_transient_domain_migrated_waits_for_the_event(fake: FakeHypervisor) -> None:
    """A transient domain is gone from the source (no state to read): the
    STOPPED/MIGRATED event that follows the refusal says why."""
    vm = fake.add_domain("vm", persistent=False)
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _blocked(fake, "detach_live")
        fake.finish_migration("vm", event="after", event_delay=0.1)
        with pytest.raises(DomainStopped) as info:
            await caller
    assert info.value.reason == "migrated"


async def test_transient_domain_gone_without_an_event_is_undefined(
    fake: FakeHypervisor,
) -> None:
    """Nothing says why (no state, no event): the domain is gone, "undefined"."""
    vm = fake.add_domain("vm", persistent=False)
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _blocked(fake, "detach_live")
        fake.finish_migration("vm", event="lost")
        with pytest.raises(DomainStopped) as info:
            await caller
    assert info.value.reason == "undefined"


# ------------------------------------------------ a job longer than libvirt's wait
async def test_live_request_refused_by_a_held_job_is_sent_again_using_no_attempt(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.later(0.02))
    settings = DetachSettings(attempts=1, timeout=5.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        fake.hold_job("vm", wait=0.05)
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        # Three refusals with code 68, each sent again (attempts=1 would
        # otherwise have ended it at the first).
        await until(lambda: len(fake.job_timeouts) >= 3, 10, "3 refusals")
        assert not caller.done()
        fake.release_job("vm")
        result = await caller
    assert set(fake.job_timeouts) == {"detach_live"}
    assert result.attempts == 1
    assert result.confirmed_by == "event"
    assert len(fake.requests) == 1


async def test_config_half_refused_by_a_held_job_is_sent_again(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    dev = vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm", wait=0.05)
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: len(fake.job_timeouts) >= 3, 10, "3 refusals")
        assert not caller.done()
        fake.release_job("vm")
        result = await caller
    assert set(fake.job_timeouts) == {"detach_config"}
    assert (result.persistent, result.live, result.attempts) == (True, True, 1)
    assert dev.config is False
    assert len(fake.config_requests) == 1  # the refused ones did nothing


@pytest.mark.parametrize("persistent", [False, None])
async def test_a_held_job_is_waited_for_only_while_a_caller_waits(
    fake: FakeHypervisor, persistent: bool | None
) -> None:
    """The caller's own deadline bounds the wait: once it gives up, the call
    out comes back refused and nothing more is sent (neither half); the
    service closes without waiting for the job."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    svc = DetachService(backend=fake, settings=SETTINGS)
    await svc.open()
    fake.hold_job("vm", wait=0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2.5):  # refused at 0.05 s, sent again 1 s later, …
            await svc.detach("vm", alias="ua-d", persistent=persistent)
    refused = len(fake.job_timeouts)
    await until(lambda: svc.pending() == [], 5, "nothing pending")
    async with asyncio.timeout(5):  # a retry for nobody would hold the close forever
        await svc.aclose()
    assert refused >= 2
    assert len(fake.job_timeouts) <= refused + 1  # the call out when the caller left
    assert fake.requests == []
    assert fake.config_requests == []
    assert vm.live_device("ua-d") is not None


# ------------------------------------------------------ the migration is cancelled
async def test_cancelled_migration_lets_the_request_through_one_attempt(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.later(0.02))
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.hold_job("vm")
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await _blocked(fake, "detach_live")
        fake.release_job("vm")  # abortJob
        result = await caller
    assert (result.attempts, result.confirmed_by, len(fake.requests)) == (1, "event", 1)
    assert fake.job_timeouts == []
