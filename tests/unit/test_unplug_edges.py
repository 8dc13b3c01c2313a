"""The live unplug at the edges of its promises, on the fake hypervisor.

Each test here failed on aiodetach 0.1 (the note on each says how):
a caller's own deadline, verdicts landing mid-step, "guest is busy" before
anything is pending, and events from before our request.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachFailed, DetachTimeout
from aiodetach.testing import FakeHypervisor, Unplug

# -- a caller's own deadline never causes a re-send ----------------------------------


async def test_caller_deadline_and_retry_sends_one_request(fake: FakeHypervisor) -> None:
    """A caller that gives up after 0.1 s and asks again at once joins the
    pending unplug (0.1: a second request per retry)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.6))
    settings = DetachSettings(attempts=3, timeout=2.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        tries = 0
        while True:
            tries += 1
            try:
                async with asyncio.timeout(0.1):
                    result = await svc.detach("vm", alias="ua-d", persistent=False)
                break
            except TimeoutError:
                assert tries < 50
    assert tries >= 3, tries
    assert len(fake.requests) == 1, fake.requests
    assert result.joined
    assert result.confirmed_by == "event"


async def test_wait_for_and_cancel_then_ask_again(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=3, timeout=2.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm", alias="ua-d", persistent=False), 0.05)
        task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(svc.pending()) == 1, "the pending request is remembered"
        again = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await asyncio.sleep(0.05)
        fake.complete("vm", "ua-d")
        result = await again
    assert len(fake.requests) == 1
    assert result.joined
    assert result.attempts == 1


async def test_orphaned_unplug_is_kept_one_timeout_past_its_window(fake: FakeHypervisor) -> None:
    """Nobody waits: the unplug is remembered for the rest of its window and one
    more ``timeout``, then dropped without a re-send; a later request starts afresh."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(attempts=3, timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm", alias="ua-d", persistent=False), 0.05)
        await asyncio.sleep(0.4)  # the window is over: idle, still remembered
        assert svc.pending() != []
        await asyncio.sleep(0.4)
        assert svc.pending() == []
        assert len(fake.requests) == 1, "nothing is sent for nobody"
        with pytest.raises(DetachTimeout):
            await svc.detach("vm", alias="ua-d", persistent=False)
    assert len(fake.requests) == 4


async def test_deadline_during_the_recheck_keeps_the_attempts_used(fake: FakeHypervisor) -> None:
    """The caller's deadline fires while the live XML is re-read after a window;
    asking again carries on with the attempts left (0.2 before the fix: a
    fresh unplug, 3 requests for attempts=2)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    fake.before_call = lambda n: time.sleep(0.2) if n == "lookup" and fake.requests else None
    settings = DetachSettings(attempts=2, timeout=0.5)
    async with DetachService(backend=fake, settings=settings) as svc:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.6):  # fires inside the re-check
                await svc.detach("vm", alias="ua-d", persistent=False)
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d", persistent=False)
    assert len(fake.requests) == 2
    assert info.value.attempts == 2


@pytest.mark.parametrize("deadline", [0.05, 0.1, 0.3])
async def test_a_retry_loop_ends_in_detach_timeout_after_attempts_requests(
    fake: FakeHypervisor, deadline: float
) -> None:
    """A caller that retries after its own short deadline, forever: the device's
    attempts still bound the requests, and the loop ends in DetachTimeout."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(attempts=2, timeout=0.5)
    final: DetachTimeout | None = None
    async with DetachService(backend=fake, settings=settings) as svc:
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            try:
                async with asyncio.timeout(deadline):
                    await svc.detach("vm", alias="ua-d", persistent=False)
            except DetachTimeout as exc:  # before TimeoutError: it is one
                final = exc
                break
            except TimeoutError:
                continue
    assert isinstance(final, DetachTimeout)
    assert len(fake.requests) == 2


async def test_orphan_rejoined_late_gets_the_rest_of_its_attempts(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(attempts=2, timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm", alias="ua-d", persistent=False), 0.05)
        started = time.monotonic()
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d", persistent=False)
        waited = time.monotonic() - started
    # The first window's rest (~0.25 s), then one re-send and its 0.3 s.
    assert info.value.attempts == 2
    assert len(fake.requests) == 2
    assert waited < 0.3 + 0.3 + 0.2, waited


async def test_unqueued_orphan_sends_nothing(fake: FakeHypervisor) -> None:
    """A caller cancelled while its request still waits for a worker thread
    leaves nothing pending: no request is sent for nobody."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-busy", unplug=Unplug.manual())
    vm.add_disk("vdc", alias="ua-d", unplug=Unplug.never())
    release = threading.Event()

    def occupy_the_only_thread(name: str) -> None:
        if name == "detach_live" and not release.is_set():
            release.wait(2)

    settings = DetachSettings(attempts=3, timeout=0.3, max_threads=1)
    async with DetachService(backend=fake, settings=settings) as svc:
        fake.before_call = occupy_the_only_thread
        blocker = asyncio.create_task(svc.detach("vm", alias="ua-busy", persistent=False))
        await asyncio.sleep(0.05)
        task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.sleep(0.1)
        assert "ua-d" not in {a for _u, a in svc.pending()}, svc.pending()
        fake.complete("vm", "ua-busy")
        await blocker
    assert [r.alias for r in fake.requests] == ["ua-busy"]


# -- a verdict is honoured wherever it lands -----------------------------------------


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


# -- "guest is busy" before anything is pending ---------------------------------------


async def test_busy_before_acceptance_backs_off_without_using_an_attempt(
    fake: FakeHypervisor,
) -> None:
    """Right after a native-PCIe hot-plug QEMU refuses with "guest is busy";
    nothing is pending, so it is sent again after a back-off (0.1: waited a
    whole attempt as if in progress, and with attempts=1 timed out)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.05, busy_first=2))
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings) as svc:
        started = time.monotonic()
        result = await svc.detach("vm", alias="ua-d", persistent=False)
        elapsed = time.monotonic() - started
    assert fake.busy_refusals == 2
    assert len(fake.requests) == 3
    assert result.attempts == 1
    assert result.confirmed_by == "event"
    assert elapsed < 2.0, elapsed  # back-offs of ~0.5 s and ~0.75 s, not a 2 s attempt


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
    assert 0.35 < elapsed < 2.0, elapsed


# -- an event that predates our request is checked ------------------------------------


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
