"""Lost events and the domain stopping mid-detach, on the fake hypervisor.

The fake is used where a real QEMU cannot produce the case on demand (an
event that libvirt loses, a domain gone without a lifecycle event) and to run
every stop reason quickly; the real counterparts are in
tests/real/system/test_domain_stops_while_pending.py,
tests/real/private/test_migration_while_pending.py and test_libvirtd_restart.py,
and tests/real/guest/.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from _probes import until
from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach.errors import DetachTimeout, DomainStopped, InvalidRequest
from aiodetach.testing import FakeHypervisor, Unplug

FAST = DetachSettings(attempts=3, timeout=0.15, reconnect_timeout=2.0)


# ------------------------------------------------------------------ lost events
async def test_lost_event_after_prompt_unplug_is_success_by_xml(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.02, emit_event=False))
    async with DetachService(backend=fake, settings=FAST) as svc:
        result = await svc.detach("vm", alias="ua-d")
    assert result.confirmed_by == "xml"
    assert result.attempts == 1
    assert len(fake.requests) == 1  # the re-check found it gone: no second request
    assert vm.live_device("ua-d") is None


async def test_lost_event_during_last_attempt_is_success_by_xml(fake: FakeHypervisor) -> None:
    """Released (silently) after the last request: the final re-check still sees it gone."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=2, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: len(fake.requests) == 2, 5, "second request")
        fake.complete("vm", "ua-d", emit=False)
        result = await task
    assert (result.confirmed_by, result.attempts, len(fake.requests)) == ("xml", 2, 2)


async def test_lost_event_many_devices_none_times_out(fake: FakeHypervisor) -> None:
    """Every event lost, 40 devices released at random times within one timeout."""
    vm = fake.add_domain("vm")
    for i in range(40):
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.003 * i, emit_event=False))
    async with DetachService(backend=fake, settings=FAST) as svc:
        results = await asyncio.gather(*(svc.detach("vm", alias=f"ua-d{i}") for i in range(40)))
    assert {r.confirmed_by for r in results} == {"xml"}
    assert len(fake.requests) == 40


async def test_device_never_released_is_still_a_timeout(fake: FakeHypervisor) -> None:
    """The control: the XML re-check does not turn a real timeout into a success."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    async with DetachService(backend=fake, settings=FAST) as svc:
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d")
    assert info.value.attempts == 3
    assert len(fake.requests) == 3


# ------------------------------------------------------- the domain stops
@pytest.mark.parametrize(
    "reason", ["destroyed", "shutdown", "migrated", "crashed", "saved", "failed"]
)
async def test_domain_stop_wakes_every_waiter_at_once(fake: FakeHypervisor, reason: str) -> None:
    vm = fake.add_domain("vm")
    for i in range(5):
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    settings = DetachSettings(attempts=3, timeout=30.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}"))
            for i in range(5)
            for _ in range(3)  # concurrent callers of each device
        ]
        await until(lambda: len(svc.pending()) == 5 and len(fake.requests) == 5, 5, "sent")
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        fake.stop_domain("vm", reason)
        async with asyncio.timeout(1.0):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        woke_after = loop.time() - stopped_at
        assert svc.pending() == []
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, DomainStopped)} == {reason}
    assert {o.domain for o in outcomes if isinstance(o, DomainStopped)} == {"vm"}
    assert woke_after < 0.5
    assert len(fake.requests) == 5


async def test_transient_domain_destroyed(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("tvm", persistent=False)
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    async with DetachService(backend=fake, settings=DetachSettings(timeout=30.0)) as svc:
        task = asyncio.create_task(svc.detach("tvm", alias="ua-d"))
        await until(lambda: len(fake.requests) == 1, 5, "sent")
        fake.stop_domain("tvm", "destroyed")  # a transient domain is gone after that
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 1.0)
    assert info.value.reason == "destroyed"
    assert "tvm" not in [d.name for d in fake.domains.values()]


async def test_domain_vanished_without_lifecycle_event(fake: FakeHypervisor) -> None:
    """The STOPPED event was lost (e.g. during an outage): the re-check finds the domain gone."""
    vm = fake.add_domain("tvm", persistent=False)
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(attempts=3, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("tvm", alias="ua-d"))
        await until(lambda: len(fake.requests) == 1, 5, "sent")
        with fake._lock:
            del fake.domains[vm.uuid]  # undefined behind our back, no event
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 2.0)
    assert info.value.reason == "undefined"
    assert len(fake.requests) == 1


async def test_domain_shut_off_without_lifecycle_event(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(attempts=3, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: len(fake.requests) == 1, 5, "sent")
        sink, fake._sink = fake._sink, None  # the lifecycle event is lost
        fake.stop_domain("vm", "shutdown")
        fake._sink = sink
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 2.0)
    # The event is lost, but the domain's shutoff reason (its state) says why.
    assert info.value.reason == "shutdown"
    assert len(fake.requests) == 1


async def test_domain_stopped_while_request_in_thread(fake: FakeHypervisor) -> None:
    """STOPPED arrives while the request is still blocked in its worker thread."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    fake.call_latency = 0.2
    async with DetachService(backend=fake, settings=DetachSettings(timeout=30.0)) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: fake.in_flight == 1, 5, "request in its thread")
        fake.stop_domain("vm", "crashed")
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 2.0)
    assert info.value.reason == "crashed"


async def test_trailing_control_character_is_refused(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d")
    async with DetachService(backend=fake, settings=FAST) as svc:
        with pytest.raises(InvalidRequest):
            await svc.detach("vm", alias="ua-d\n")
    assert fake.requests == []


# ------------------------------------------------------- a paused domain
PAUSE = DetachSettings(attempts=2, timeout=0.5)  # the margins below are multiples of it


async def _sent_then_paused(fake: FakeHypervisor, svc: DetachService) -> asyncio.Task[object]:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    task: asyncio.Task[object] = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await until(lambda: len(fake.requests) == 1, 5, "the request")
    fake.pause_domain("vm")
    return task


async def test_paused_domain_gets_no_second_request(fake: FakeHypervisor) -> None:
    """Paused for 4 timeouts: its guest could not answer, so nothing is re-sent
    and no attempt is used up; once resumed, its answer completes the detach."""
    async with DetachService(backend=fake, settings=PAUSE) as svc:
        task = await _sent_then_paused(fake, svc)
        await asyncio.sleep(4 * PAUSE.timeout)
        assert not task.done()
        assert len(fake.requests) == 1
        fake.resume_domain("vm")
        fake.complete("vm", "ua-d")
        result = await task
    assert isinstance(result, DetachResult)
    assert (result.attempts, result.confirmed_by) == (1, "event")


@pytest.mark.parametrize("event", [True, False], ids=["resumed-event", "resumed-event-lost"])
async def test_resumed_guest_gets_a_full_timeout_before_the_next_request(
    fake: FakeHypervisor, event: bool
) -> None:
    """After the resume the guest has ``timeout`` again before a re-send; a
    lost RESUMED event is made up for by looking every ``timeout`` seconds."""
    async with DetachService(backend=fake, settings=PAUSE) as svc:
        task = await _sent_then_paused(fake, svc)
        await asyncio.sleep(3 * PAUSE.timeout)
        resumed_at = time.monotonic()
        fake.resume_domain("vm", emit=event)
        async with asyncio.timeout(5):
            with pytest.raises(DetachTimeout) as info:
                await task
    assert info.value.attempts == 2
    second = fake.requests[1].at
    assert second - resumed_at >= PAUSE.timeout - 0.02
    if event:  # woken by the event, not by the next look
        assert second - resumed_at < 2 * PAUSE.timeout


async def test_domain_stopped_while_paused(fake: FakeHypervisor) -> None:
    async with DetachService(backend=fake, settings=PAUSE) as svc:
        task = await _sent_then_paused(fake, svc)
        await asyncio.sleep(2 * PAUSE.timeout)
        fake.stop_domain("vm", "destroyed")
        async with asyncio.timeout(1):
            with pytest.raises(DomainStopped) as info:
                await task
    assert info.value.reason == "destroyed"
    assert len(fake.requests) == 1
