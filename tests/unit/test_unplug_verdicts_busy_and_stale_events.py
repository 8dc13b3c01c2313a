"""What ends or holds an attempt of the live unplug (rule 2), through the
service on the fake hypervisor: verdicts that land mid-step (removed or
refused while the request is in its thread, during the re-check after a
timeout, a domain stopped or paused while a shared re-check runs), "guest is
busy" before or after our request was accepted, and events from before our
request (confirmed against the live XML).  The same rules on the pure
machine alone: test_unplug_machine.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import (
    DetachFailed,
    DetachTimeout,
)
from aiodetach.testing import FakeHypervisor, Unplug

from ._gate_fake import GateFake, holding, settle


async def test_removal_failed_during_the_recheck_is_not_followed_by_a_resend(
    fake: FakeHypervisor,
) -> None:
    """DEVICE_REMOVAL_FAILED while the live XML is re-read after a timeout
    (0.1: the XML still showed the device, so it was sent again)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    reads = 0

    def reject_during_recheck(name: str) -> None:
        nonlocal reads
        if name == "domain_xml":
            reads += 1
            if reads == 2:  # the first is the caller's own read, the second the re-check
                fake.reject("vm", "ua-d")
                time.sleep(0.05)  # the event reaches the loop while the read runs

    fake.before_call = reject_during_recheck
    settings = DetachSettings(attempts=3, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        with pytest.raises(DetachFailed):
            await svc.detach("vm", alias="ua-d", persistent=False)
    assert reads == 2
    assert len(fake.requests) == 1


async def test_removed_during_the_state_read_is_success_by_event(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    lookups = 0

    def remove_during_state_read(name: str) -> None:
        nonlocal lookups
        if name == "lookup":
            lookups += 1
            if lookups == 2:
                fake.complete("vm", "ua-d")
                time.sleep(0.05)

    fake.before_call = remove_during_state_read
    settings = DetachSettings(attempts=3, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        result = await svc.detach("vm", alias="ua-d", persistent=False)
    assert result.confirmed_by == "event"
    assert len(fake.requests) == 1


async def test_removal_failed_while_the_request_is_in_its_thread(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())

    def reject_inside_the_call(name: str) -> None:
        if name == "detach_live":
            fake.reject("vm", "ua-d")
            time.sleep(0.05)

    fake.before_call = reject_inside_the_call
    async with DetachService(backend=fake, settings=DetachSettings(timeout=5)) as svc:
        with pytest.raises(DetachFailed):
            await svc.detach("vm", alias="ua-d", persistent=False)
    assert len(fake.requests) == 1


async def test_busy_before_acceptance_backs_off_without_using_an_attempt(
    fake: FakeHypervisor,
) -> None:
    """Right after a native-PCIe hot-plug QEMU refuses with "guest is busy";
    nothing is pending, so it is sent again after a back-off (0.1: waited a
    whole attempt as if in progress, and with attempts=1 timed out)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.05, busy_first=2))
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        result = await svc.detach("vm", alias="ua-d", persistent=False)
    # With attempts=1, an attempt spent on either refusal would have ended in
    # DetachTimeout: success in one attempt is the promise, however long the
    # back-offs took on a loaded machine.
    assert fake.busy_refusals == 2
    assert len(fake.requests) == 3
    assert result.attempts == 1
    assert result.confirmed_by == "event"


async def test_busy_after_our_request_is_still_in_progress(fake: FakeHypervisor) -> None:
    """The same refusal after a request of ours was accepted means "ours is
    still in progress": wait, count the attempt, no back-off loop."""
    fake.add_domain("vm").add_disk(
        "vdb", alias="ua-d", unplug=Unplug.later(0.5, refuse_while_pending=True)
    )
    fake.fail_next = {}
    settings = DetachSettings(attempts=3, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        result = await svc.detach("vm", alias="ua-d", persistent=False)
    assert [r.while_pending for r in fake.requests] == [False, True, True]
    assert result.attempts == 3


async def test_a_slot_that_stays_busy_still_times_out(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug("ignore", busy_first=10**6))
    settings = DetachSettings(attempts=2, timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        started = time.monotonic()
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d", persistent=False)
        elapsed = time.monotonic() - started
    assert info.value.attempts == 0, "no request was ever accepted"
    assert "busy" in str(info.value)
    assert elapsed > 0.35, elapsed  # not before its attempts' windows (2 x 0.2 s)


async def test_event_before_our_request_is_confirmed_against_the_xml(
    fake: FakeHypervisor,
) -> None:
    """While a "guest is busy" refusal is backed off, no request of ours is in
    libvirt: a DEVICE_REMOVED then (a late event of an earlier unplug of a
    device since re-attached under the same alias) does not count while the
    live XML still has the device (0.1: success at once, device still there)."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug("manual", busy_first=1))
    settings = DetachSettings(attempts=3, timeout=2.0)  # back-off ~0.5 s
    async with DetachService(backend=fake, settings=settings) as svc:
        ours = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        while fake.busy_refusals == 0 and not ours.done():
            await asyncio.sleep(0.005)
        fake.emit_removed("vm", "ua-d")  # stale: nothing of ours is pending
        while len(fake.requests) < 2 and not ours.done():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert not ours.done(), "a stale event must not count while the device is attached"
        assert vm.live_device("ua-d") is not None
        fake.complete("vm", "ua-d")
        result = await ours
    assert result.confirmed_by == "event"
    assert result.attempts == 1


async def test_event_before_our_request_for_a_device_really_gone(
    fake: FakeHypervisor,
) -> None:
    """The same early event, when the device really is gone: success, learnt
    from the XML, and no further request."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug("manual", busy_first=1))
    settings = DetachSettings(attempts=3, timeout=2.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        ours = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        while fake.busy_refusals == 0 and not ours.done():
            await asyncio.sleep(0.005)
        fake.complete("vm", "ua-d")  # released by someone else's unplug
        result = await ours
    assert result.confirmed_by == "xml"
    assert len(fake.requests) == 1


async def _until(cond: Any, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never came"
        await asyncio.sleep(0.005)


async def test_busy_refusals_use_no_attempt_and_then_park() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug(behaviour="manual", busy_first=2))
    settings = DetachSettings(timeout=0.4, attempts=1)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(5)]
        await _until(lambda: len(fake.requests) == 15)
        await asyncio.sleep(0.05)
        assert len(svc.pending()) == 5
        for i in range(5):
            fake.complete("vm", f"ua-{i}")
        results = await asyncio.gather(*tasks)
    assert [r.attempts for r in results] == [1] * 5
    assert fake.busy_refusals == 10


async def test_device_removed_during_shared_recheck_not_lost_no_resend(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(10):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    settings_ = DetachSettings(timeout=0.2, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(10)
        ]
        await settle(0.05)  # every caller past its own reads: the next live read is a re-check
        gf.hold["live"] = gate = threading.Event()
        await holding(gf, "live")
        # The re-check read took its answer (every device there); the guest lets go now.
        for i in range(10):
            gf.complete("vm", f"ua-d{i}")
        await settle()
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(r.confirmed_by == "event" for r in results)
    assert len(gf.requests) == 10


async def test_removal_failed_reaches_every_joiner_no_retry(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    settings_ = DetachSettings(timeout=0.3, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False)) for _ in range(6)
        ]
        await settle()
        gf.reject("vm", "ua-d")
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await settle(0.5)
    assert all(isinstance(o, DetachFailed) for o in outcomes), outcomes
    assert all(o.alias == "ua-d" and o.domain == "vm" for o in outcomes)  # type: ignore[union-attr]
    assert len(gf.requests) == 1


async def test_removal_failed_during_shared_recheck_no_resend(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    settings_ = DetachSettings(timeout=0.2, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(5)
        ]
        await settle(0.05)
        gf.hold["live"] = gate = threading.Event()
        await holding(gf, "live")
        for i in range(5):
            gf.reject("vm", f"ua-d{i}")
        await settle()
        gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(o, DetachFailed) for o in outcomes), outcomes
    assert len(gf.requests) == 5


async def test_persistent_done_reaches_every_joiner_of_a_failed_unplug(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.reject(0.05))
    async with DetachService(backend=gf) as svc:
        outcomes = await asyncio.gather(
            *(svc.detach("vm", alias="ua-d") for _ in range(4)), return_exceptions=True
        )
    assert all(isinstance(o, DetachFailed) for o in outcomes), outcomes
    assert all(o.persistent_done for o in outcomes)  # type: ignore[union-attr]
    assert len(gf.requests) == 1
    assert len(gf.config_requests) == 1


async def test_domain_stopped_silently_seen_by_shared_recheck(gf: GateFake) -> None:
    from aiodetach.backend import DomainState
    from aiodetach.errors import DomainStopped

    dom = gf.add_domain("vm", persistent=False)
    for i in range(8):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    async with DetachService(backend=gf, settings=DetachSettings(timeout=0.2, attempts=3)) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}")) for i in range(8)]
        await settle(0.05)
        with gf._lock:  # stopped, its STOPPED event lost
            dom.state = DomainState.SHUTOFF
            for d in dom.devices:
                d.live = False
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert [o.alias for o in outcomes] == [f"ua-d{i}" for i in range(8)]  # type: ignore[union-attr]
    assert len(gf.requests) == 8


async def test_pause_during_shared_recheck_uses_no_attempt(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(6):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    async with DetachService(backend=gf, settings=DetachSettings(timeout=0.2, attempts=1)) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(6)
        ]
        await settle(0.05)
        gf.pause_domain("vm")
        await settle(0.5)  # windows over while paused: no attempt used, nothing re-sent
        assert not any(t.done() for t in tasks)
        gf.resume_domain("vm")
        await settle(0.05)
        for i in range(6):
            gf.complete("vm", f"ua-d{i}")
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(r.confirmed_by == "event" for r in results)
    assert len(gf.requests) == 6
