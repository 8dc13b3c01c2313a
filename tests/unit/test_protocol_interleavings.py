"""The live unplug's promises (docs/protocol.md) under interleavings, through
the public API only, on the fake hypervisor: verdicts, stops, RESUMED, a close
or a caller's own deadline landing while a call is in its worker thread, during
a re-check, a back-off or a pause; connection losses; journal take-up; two
names for one domain; batches.

Each probe names the promise it checks.  A call can be *held* inside the fake,
in its worker thread, either before it does anything (``after=False``) or
after it took its answer (``after=True``), so that an event, a close or a
cancellation can land exactly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiodetach import DetachService
from aiodetach.backend import BackendError, ErrorCode, ErrorDomain
from aiodetach.errors import (
    BatchAborted,
    ConnectionLost,
    DetachFailed,
    DetachTimeout,
    DeviceNotFound,
    DomainStopped,
    InvalidRequest,
    ServiceClosed,
)
from aiodetach.instrumentation import DetachRecord, UnplugRecord
from aiodetach.testing import FakeHypervisor, GuestUnplug

from ._hold_fake import (
    ALIAS,
    LIVE,
    Hold,
    HoldFake,
    add_vm,
    entered,
    live_requests,
    live_xml,
    n_detach_live,
    reap,
    service,
    until,
)

# ---------------------------------------------------------------------------------------
# Rule 2: a verdict is honoured wherever it lands
# ---------------------------------------------------------------------------------------


async def test_removal_failed_while_request_in_thread_is_final(hv: HoldFake) -> None:
    """'an event that arrives while a request is in its thread ... decides the
    unplug before any further request'; DEVICE_REMOVAL_FAILED -> DetachFailed."""
    add_vm(hv, GuestUnplug.never())
    h = hv.hold("detach_live")
    async with service(hv, timeout=0.3, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await entered(h)
        hv.reject("vm-1", ALIAS)
        h.release.set()
        with pytest.raises(DetachFailed):
            await asyncio.wait_for(task, 3)
        await asyncio.sleep(0.8)
        assert n_detach_live(hv) == 1
        assert svc.pending() == []


async def test_removed_event_while_request_in_thread_counts_at_once(hv: HoldFake) -> None:
    """'events that arrive *while* our call runs count at once'."""
    add_vm(hv, GuestUnplug.never())
    h = hv.hold("detach_live")
    async with service(hv, timeout=1.0, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await entered(h)
        dom = hv.domain("vm-1")
        assert hv.sink is not None
        hv.sink.device_removed(dom.uuid, dom.name, ALIAS)
        t0 = time.monotonic()
        h.release.set()
        result = await asyncio.wait_for(task, 3)
        assert result.confirmed_by == "event"
        assert time.monotonic() - t0 < 0.8  # not after a timeout's re-check
        assert n_detach_live(hv) == 1


async def test_removed_event_after_call_answered_before_return(hv: HoldFake) -> None:
    """The request is still in its thread after the fake took it (after=True):
    an event there counts at once (a SCSI disk's fires inside the call)."""
    add_vm(hv, GuestUnplug.never())
    h = hv.hold("detach_live", after=True)
    async with service(hv, timeout=1.0, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await entered(h)
        hv.complete("vm-1", ALIAS)
        h.release.set()
        result = await asyncio.wait_for(task, 0.8)
        assert result.confirmed_by == "event"
        assert len(live_requests(hv)) == 1


@pytest.mark.parametrize(
    ("method", "after"),
    [("lookup", False), ("lookup", True), ("domain_xml", False), ("domain_xml", True)],
)
async def test_removal_failed_during_recheck_read_is_final(
    hv: HoldFake, method: str, after: bool
) -> None:
    """'an event that arrives ... during the state read or the XML re-read,
    decides the unplug before any further request (0.1 re-sent after a
    DEVICE_REMOVAL_FAILED that landed during the re-read)'."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        when = live_xml if method == "domain_xml" else (lambda *a, **k: True)
        h = hv.hold(method, after=after, when=when)
        await entered(h)
        hv.reject("vm-1", ALIAS)
        await asyncio.sleep(0.05)
        h.release.set()
        with pytest.raises(DetachFailed):
            await asyncio.wait_for(task, 3)
        await asyncio.sleep(0.4)
        assert n_detach_live(hv) == 1


async def test_removed_during_recheck_xml_read_that_still_showed_device(hv: HoldFake) -> None:
    """The re-read took an XML still showing the device; DEVICE_REMOVED lands
    before it is used: success, no re-send."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        h = hv.hold("domain_xml", after=True, when=live_xml)
        await entered(h)
        hv.complete("vm-1", ALIAS)
        await asyncio.sleep(0.05)
        h.release.set()
        result = await asyncio.wait_for(task, 3)
        assert result.live
        assert result.confirmed_by == "event"
        assert n_detach_live(hv) == 1


@pytest.mark.parametrize(("method", "after"), [("lookup", True), ("domain_xml", True)])
async def test_domain_stopped_during_recheck_read(hv: HoldFake, method: str, after: bool) -> None:
    """Rule 5: DomainStopped (with libvirt's reason) when the domain stops during
    the re-check's read; no re-send."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        when = live_xml if method == "domain_xml" else (lambda *a, **k: True)
        h = hv.hold(method, after=after, when=when)
        await entered(h)
        hv.stop_domain("vm-1", "shutdown")
        await asyncio.sleep(0.05)
        h.release.set()
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 3)
        assert info.value.reason == "shutdown"
        await asyncio.sleep(0.2)
        assert n_detach_live(hv) == 1


@pytest.mark.parametrize(
    ("method", "after"),
    [("detach_live", False), ("detach_live", True), ("lookup", True), ("domain_xml", True)],
)
async def test_domain_stopped_wakes_waiters_at_once_while_call_in_thread(
    hv: HoldFake, method: str, after: bool
) -> None:
    """Rule 5: 'The domain stops while a detach waits ...: every waiter wakes at
    once with DomainStopped'."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=3) as svc:
        if method == "detach_live":
            h = hv.hold(method, after=after)
            task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        else:
            task = asyncio.create_task(svc.detach("vm-1", **LIVE))
            await until(lambda: len(live_requests(hv)) == 1)
            when = live_xml if method == "domain_xml" else (lambda *a, **k: True)
            h = hv.hold(method, after=after, when=when)
        await entered(h)
        hv.stop_domain("vm-1", "shutdown")
        try:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert done, "the waiter still blocked 1 s after the domain stopped"
            with pytest.raises(DomainStopped):
                task.result()
        finally:
            h.release.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 3)


async def test_domain_stopped_while_request_in_thread(hv: HoldFake) -> None:
    """Rule 5 while the request sits in its thread: DomainStopped (with its
    reason), not a refusal of the request."""
    add_vm(hv, GuestUnplug.never())
    h = hv.hold("detach_live")
    async with service(hv, timeout=0.3, attempts=3) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await entered(h)
        hv.stop_domain("vm-1", "destroyed")
        h.release.set()
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 3)
        assert info.value.reason == "destroyed"


async def test_joined_callers_all_get_the_failure(hv: HoldFake) -> None:
    """Rule 3: 'All joined callers get the same result or error.'"""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=2, attempts=2) as svc:
        tasks = [asyncio.create_task(svc.detach("vm-1", **LIVE)) for _ in range(3)]
        await until(lambda: len(live_requests(hv)) == 1)
        await asyncio.sleep(0.05)
        hv.reject("vm-1", ALIAS)
        out = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 3)
        assert all(isinstance(o, DetachFailed) for o in out), out
        assert len(live_requests(hv)) == 1


# ---------------------------------------------------------------------------------------
# Rule 2: early events, busy back-off, timeouts
# ---------------------------------------------------------------------------------------


async def test_real_removal_during_busy_backoff_succeeds(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.later(5, busy_first=1))
    async with service(hv, timeout=0.8, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: hv.busy_refusals == 1)
        hv.complete("vm-1", ALIAS)
        result = await asyncio.wait_for(task, 3)
        assert result.live


async def test_stale_event_during_busy_backoff_is_checked(hv: HoldFake) -> None:
    """'a DEVICE_REMOVED for the alias that arrives while no request of ours is
    in libvirt ... counts only if the live XML agrees'."""
    vm = add_vm(hv, GuestUnplug.later(0.1, busy_first=1))
    # timeout=8: a 1 s back-off (0.2 s with 0.8 s let a loaded machine's
    # stale event land after the re-send, where it is no longer stale).
    async with service(hv, timeout=8, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: hv.busy_refusals == 1)
        hv.emit_removed("vm-1", ALIAS)  # stale: the device is still there
        assert len(live_requests(hv)) == 1, "the re-send went before the stale event"
        result = await asyncio.wait_for(task, 3)
        still = vm.live_device(ALIAS)
        assert still is None, "reported detached while the device was still attached"
        assert result.live
        assert len(live_requests(hv)) == 2  # the busy refusal and the accepted one


async def test_busy_refusals_are_not_attempts(hv: HoldFake) -> None:
    """'aiodetach backs off ... and sends again without using up an attempt'."""
    add_vm(hv, GuestUnplug.now().__class__("remove", busy_first=2))
    async with service(hv, timeout=0.4, attempts=1) as svc:
        result = await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        assert result.live
        assert hv.busy_refusals == 2


async def test_busy_forever_ends_in_timeout(hv: HoldFake) -> None:
    """'each timeout of uninterrupted refusals costs one attempt, so a slot
    that never settles still ends in DetachTimeout'."""
    add_vm(hv, GuestUnplug.never().__class__("ignore", busy_first=10_000))
    async with service(hv, timeout=0.3, attempts=2) as svc:
        t0 = time.monotonic()
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 4)
        assert time.monotonic() - t0 < 2.0
        assert hv.busy_refusals >= 2


async def test_timeout_counted_from_libvirts_answer(hv: HoldFake) -> None:
    """'no event within timeout (counted from the moment libvirt answered the
    request ...)'."""
    add_vm(hv, GuestUnplug.later(0.2))
    hv.call_latency = 0.4
    async with service(hv, timeout=0.35, attempts=1) as svc:
        result = await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        assert result.confirmed_by == "event"


async def test_in_progress_answer_is_not_a_failure(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.later(0.55, refuse_while_pending=True))
    async with service(hv, timeout=0.2, attempts=5) as svc:
        result = await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        assert result.live


async def test_exactly_attempts_requests_spaced_by_timeout(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.2, attempts=3) as svc:
        with pytest.raises(DetachTimeout) as info:
            await asyncio.wait_for(svc.detach("vm-1", alias=ALIAS), 4)
        assert info.value.persistent_done is True
        assert info.value.attempts == 3
        at = live_requests(hv)
        assert len(at) == 3
        assert all(b - a >= 0.18 for a, b in itertools.pairwise(at)), at


# ---------------------------------------------------------------------------------------
# Rule 3: callers leaving and coming back
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["wait_for", "timeout", "cancel", "sleepy"])
async def test_retry_loop_with_short_deadline(hv: HoldFake, style: str) -> None:
    """'a retry loop with a short deadline neither re-sends early nor sends more
    than attempts requests: it ends in DetachTimeout like a patient caller'."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=2) as svc:
        t0 = time.monotonic()
        while True:
            assert time.monotonic() - t0 < 4, "retry loop never ended"
            try:
                if style == "wait_for":
                    await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.05)
                elif style == "timeout":
                    async with asyncio.timeout(0.07):
                        await svc.detach("vm-1", **LIVE)
                else:
                    task = asyncio.create_task(svc.detach("vm-1", **LIVE))
                    await asyncio.sleep(0.04)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    if not task.cancelled():
                        task.result()
                    if style == "sleepy":
                        await asyncio.sleep(0.1)
                    continue
            except DetachTimeout:
                break
            except TimeoutError:
                continue
            pytest.fail("a never-releasing guest was reported detached")
        at = live_requests(hv)
        assert len(at) == 2, at
        assert at[1] - at[0] >= 0.27, at


@pytest.mark.parametrize("late", [False, True], ids=["back-at-once", "back-late"])
@pytest.mark.parametrize("steps", range(5))
async def test_cancellation_ready_with_the_last_re_check_keeps_its_timeout(
    hv: HoldFake, steps: int, late: bool
) -> None:
    """A loaded loop can run a caller's cancellation and the re-check that uses
    the last attempt in one step (CI: a retry loop then sent 4 requests with
    attempts=2).  The DetachTimeout must not go to the cancelled caller alone:
    asking again learns it, with no request sent.  ``steps`` places the
    cancellation that many loop steps after the re-check's answer is posted.
    Kept one ``timeout``, like an idle unplug: back later, a new unplug starts."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.2, attempts=1) as svc:
        recheck = hv.hold("domain_xml", nth=2, after=True, when=live_xml)
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await entered(recheck)
        loop = asyncio.get_running_loop()

        def cancel_after(n: int) -> None:
            if n:
                loop.call_soon(cancel_after, n - 1)
            else:
                task.cancel()

        recheck.release.set()
        time.sleep(0.3)  # noqa: ASYNC251 - holds the loop while the re-check's answer is posted
        loop.call_soon(cancel_after, steps)
        with contextlib.suppress(asyncio.CancelledError, DetachTimeout):
            await task
        if not task.cancelled():
            return  # the outcome reached the caller before its cancellation: fine
        if late:
            await asyncio.sleep(0.3)
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        assert len(live_requests(hv)) == (2 if late else 1)


async def test_several_impatient_callers_send_at_most_attempts(hv: HoldFake) -> None:
    """Rule 3 with five retry loops of different deadlines: no unplug sends more than
    `attempts` requests, none re-sends within `timeout`, and the loops joined when
    it ran out all get DetachTimeout."""
    add_vm(hv, GuestUnplug.never())
    records: list[Any] = []
    async with service(hv, records, timeout=0.25, attempts=3) as svc:
        first_timeout: list[float] = []

        async def loop(deadline: float) -> BaseException:
            while True:
                try:
                    await asyncio.wait_for(svc.detach("vm-1", **LIVE), deadline)
                except DetachTimeout as exc:
                    first_timeout.append(time.monotonic())
                    return exc
                except TimeoutError:
                    await asyncio.sleep(deadline / 3)

        out = await asyncio.wait_for(
            asyncio.gather(*(loop(d) for d in (0.01, 0.03, 0.07, 0.11, 0.2))), 5
        )
        assert all(isinstance(o, DetachTimeout) for o in out)
    sent: dict[int, list[float]] = {}
    for r in records:
        if isinstance(r, UnplugRecord) and r.kind == "request_sent":
            sent.setdefault(r.unplug_id, []).append(r.time)
    for times in sent.values():
        assert len(times) <= 3, sent
        assert all(b - a >= 0.22 for a, b in itertools.pairwise(times)), sent
    # The first unplug used its attempts, all of them.  (Counting the requests
    # sent before a loop saw its DetachTimeout was one schedule: a loop back
    # from its pause just after the end rightly starts a new unplug, and a
    # loaded machine can send its request before the told loop runs.)
    first = min(sent, key=lambda unplug_id: sent[unplug_id][0])
    assert len(sent[first]) == 3, sent
    assert first_timeout
    at = live_requests(hv)
    assert all(b - a >= 0.22 for a, b in itertools.pairwise(at)), at


async def test_orphan_listed_then_dropped_without_resend(hv: HoldFake) -> None:
    """'the unplug is remembered through that request's window and one more
    timeout after it ... (pending() lists it) ... with no caller back by then,
    the unplug is dropped without a re-send'."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=3) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.05)
        uuid = hv.domain("vm-1").uuid
        assert svc.pending() == [(uuid, ALIAS)]
        await asyncio.sleep(0.45)  # window over, still inside the extra timeout
        assert svc.pending() == [(uuid, ALIAS)]
        await asyncio.sleep(0.6)
        assert svc.pending() == []
        assert len(live_requests(hv)) == 1


async def test_orphan_rejoined_inside_window_carries_on(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.3, attempts=2) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.05)
        await asyncio.sleep(0.1)
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        at = live_requests(hv)
        assert len(at) == 2
        assert at[1] - at[0] >= 0.27


async def test_orphan_rejoined_after_window_uses_attempts_left(hv: HoldFake) -> None:
    """'a caller who asks again meanwhile joins it and carries on from there:
    the rest of the window, then the attempts left'."""
    add_vm(hv, GuestUnplug.never())
    records: list[Any] = []
    async with service(hv, records, timeout=0.3, attempts=2) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.05)
        await asyncio.sleep(0.42)  # past the window, inside the extra timeout
        assert len(live_requests(hv)) == 1, "re-sent for nobody"
        t0 = time.monotonic()
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        assert len(live_requests(hv)) == 2
        assert time.monotonic() - t0 < 0.9
        joined = [r for r in records if isinstance(r, DetachRecord) and r.kind == "unplug_joined"]
        assert joined, "the returning caller should join the remembered unplug"


async def test_orphan_event_then_late_caller_gets_not_found(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.5, attempts=2) as svc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.05)
        assert svc.pending()
        hv.complete("vm-1", ALIAS)
        await until(lambda: svc.pending() == [], 1, "pending() to empty after the event")
        with pytest.raises(DeviceNotFound):
            await svc.detach("vm-1", **LIVE)
        assert len(live_requests(hv)) == 1


async def _queue_second(
    hv: HoldFake, records: list[Any], svc: DetachService
) -> tuple[Hold, asyncio.Task[Any], asyncio.Task[Any]]:
    """ua-disk1's request holds the only worker thread; ua-disk2's unplug has
    started and its request waits for a thread."""
    h = hv.hold("detach_live", when=lambda uuid, alias: alias == ALIAS)
    first = asyncio.create_task(svc.detach("vm-1", **LIVE))
    second = asyncio.create_task(svc.detach("vm-1", alias="ua-disk2", live=True, persistent=False))
    await entered(h)
    await until(
        lambda: any(
            isinstance(r, DetachRecord) and r.kind == "unplug_started" and r.alias == "ua-disk2"
            for r in records
        ),
        2,
        "the second unplug to start",
    )
    await asyncio.sleep(0.05)
    return h, first, second


async def test_cancelled_before_worker_thread_sends_nothing(hv: HoldFake) -> None:
    """Rule 6: 'A caller cancelled before its request reached a worker thread
    leaves nothing behind: no request is sent for nobody.'"""
    vm = add_vm(hv, GuestUnplug.never())
    vm.add_disk("vdc", alias="ua-disk2", unplug=GuestUnplug.now())
    records: list[Any] = []
    async with service(hv, records, timeout=1, attempts=2, max_threads=1) as svc:
        h, first, second = await _queue_second(hv, records, svc)
        assert live_requests(hv, "ua-disk2") == []
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        h.release.set()
        await asyncio.sleep(0.3)
        assert live_requests(hv, "ua-disk2") == [], "a request was sent for nobody"
        assert vm.live_device("ua-disk2") is not None
        assert svc.pending() == [(vm.uuid, ALIAS)]
        await reap(first)


async def test_caller_deadline_honoured_while_call_in_thread(hv: HoldFake) -> None:
    """A caller's own deadline ends its wait on time even while the request sits in
    its worker thread; the unplug is remembered (pending()) and nothing more is sent."""
    vm = add_vm(hv, GuestUnplug.never())
    h = hv.hold("detach_live")
    async with service(hv, timeout=0.3, attempts=2) as svc:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.1)
        assert time.monotonic() - t0 < 0.4
        assert h.entered.is_set()
        assert svc.pending() == [(vm.uuid, ALIAS)]
        h.release.set()
        await asyncio.sleep(1.0)
        assert len(live_requests(hv)) == 1
        assert svc.pending() == []


async def test_stale_event_while_request_queued_is_checked(hv: HoldFake) -> None:
    """'a DEVICE_REMOVED for the alias that arrives while no request of ours is in
    libvirt ... counts only if the live XML agrees'."""
    vm = add_vm(hv, GuestUnplug.never())
    vm.add_disk("vdc", alias="ua-disk2", unplug=GuestUnplug.never())
    records: list[Any] = []
    async with service(hv, records, timeout=0.3, attempts=1, max_threads=1) as svc:
        h, first, second = await _queue_second(hv, records, svc)
        hv.emit_removed("vm-1", "ua-disk2")  # stale: ua-disk2 is still attached
        await asyncio.sleep(0.05)
        h.release.set()
        try:
            result = await asyncio.wait_for(second, 3)
        except DetachTimeout:
            pass
        else:
            assert vm.live_device("ua-disk2") is None, f"reported {result} while still attached"
        await reap(first)


async def test_straddling_reader_shares_removal(hv: HoldFake) -> None:
    """Rule 3: 'A caller whose reads straddle the end of the unplug shares it
    ... (joined=True, live=True) ... never sends a second request'."""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=2, attempts=2) as svc:
        a = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        h = hv.hold("domain_xml", after=True, when=live_xml)
        b = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await entered(h)
        hv.complete("vm-1", ALIAS)
        ra = await asyncio.wait_for(a, 2)
        assert ra.live
        h.release.set()
        rb = await asyncio.wait_for(b, 2)
        assert rb.joined
        assert rb.live
        assert n_detach_live(hv) == 1


async def test_straddling_reader_when_xml_dropped_before_event(hv: HoldFake) -> None:
    """'The same holds when libvirt already dropped the device from the live XML
    but its DEVICE_REMOVED has not reached us: the unplug in flight is joined.'"""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=2, attempts=2) as svc:
        a = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.complete("vm-1", ALIAS, emit=False)  # gone from XML, event not yet here
        b = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await asyncio.sleep(0.15)
        assert not b.done(), f"late caller ended early: {b}"
        hv.emit_removed("vm-1", ALIAS)
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 2)
        assert ra.live
        assert rb.live
        assert rb.joined
        assert n_detach_live(hv) == 1


# ---------------------------------------------------------------------------------------
# Rule 6: aclose() at any await point
# ---------------------------------------------------------------------------------------


async def _close_and_check(
    svc: DetachService, hv: HoldFake, tasks: list[asyncio.Task[Any]]
) -> None:
    # calls held before the fake saw them were handed to a thread before closing began
    held = sum(
        1
        for h in hv.holds
        if h.method == "detach_live"
        and not h.after
        and h.entered.is_set()
        and not h.release.is_set()
    )
    before = n_detach_live(hv) + held
    t0 = time.monotonic()
    await asyncio.wait_for(svc.aclose(), 4)
    assert time.monotonic() - t0 < 3
    out = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert all(isinstance(o, ServiceClosed) for o in out), out
    assert svc.pending() == []
    hv.release_all()
    await asyncio.sleep(0.4)
    assert n_detach_live(hv) <= before, "a call was made after closing began"


async def test_aclose_while_request_in_thread(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    h = hv.hold("detach_live", after=True)
    svc = service(hv, timeout=0.3, attempts=3)
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm-1", **LIVE)) for _ in range(2)]
    await entered(h)

    async def release_later() -> None:
        await asyncio.sleep(0.2)
        h.release.set()

    rel = asyncio.create_task(release_later())
    await _close_and_check(svc, hv, tasks)
    await rel


@pytest.mark.parametrize(
    ("method", "after"), [("lookup", True), ("domain_xml", True), ("domain_xml", False)]
)
async def test_aclose_during_recheck_read(hv: HoldFake, method: str, after: bool) -> None:
    add_vm(hv, GuestUnplug.never())
    svc = service(hv, timeout=0.3, attempts=3)
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm-1", **LIVE))]
    await until(lambda: len(live_requests(hv)) == 1)
    when = live_xml if method == "domain_xml" else (lambda *a, **k: True)
    h = hv.hold(method, after=after, when=when)
    await entered(h)
    closing = asyncio.create_task(_close_and_check(svc, hv, tasks))
    await asyncio.sleep(0.1)
    h.release.set()
    await closing


async def test_aclose_during_busy_backoff(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never().__class__("ignore", busy_first=10_000))
    svc = service(hv, timeout=4, attempts=2)  # back-off 1 s
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm-1", **LIVE))]
    await until(lambda: hv.busy_refusals == 1)
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await _close_and_check(svc, hv, tasks)
    assert time.monotonic() - t0 < 2.5
    assert hv.busy_refusals == 1


async def test_aclose_while_paused(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.manual())
    svc = service(hv, timeout=0.2, attempts=2)
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm-1", **LIVE))]
    await until(lambda: len(live_requests(hv)) == 1)
    hv.pause_domain("vm-1")
    await asyncio.sleep(0.5)
    await _close_and_check(svc, hv, tasks)


async def test_aclose_with_queued_request(hv: HoldFake) -> None:
    vm = add_vm(hv, GuestUnplug.never())
    vm.add_disk("vdc", alias="ua-disk2", unplug=GuestUnplug.now())
    records: list[Any] = []
    svc = service(hv, records, timeout=1, attempts=2, max_threads=1)
    await svc.open()
    h, first, second = await _queue_second(hv, records, svc)
    closing = asyncio.create_task(_close_and_check(svc, hv, [first, second]))
    await asyncio.sleep(0.1)
    h.release.set()
    await closing
    assert live_requests(hv, "ua-disk2") == []


async def test_aclose_after_caller_left(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    svc = service(hv, timeout=0.5, attempts=2)
    await svc.open()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(svc.detach("vm-1", **LIVE), 0.05)
    assert svc.pending()
    await svc.aclose()
    assert svc.pending() == []
    await asyncio.sleep(0.7)
    assert len(live_requests(hv)) == 1


async def test_aclose_cancelled_still_closes_and_is_idempotent(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    svc = service(hv, timeout=0.5, attempts=2)
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm-1", **LIVE))
    await until(lambda: len(live_requests(hv)) == 1)
    closing = asyncio.create_task(svc.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    with pytest.raises(ServiceClosed):
        await asyncio.wait_for(caller, 2)
    assert not hv.connected
    await svc.aclose()
    with pytest.raises(ServiceClosed):
        await svc.detach("vm-1", **LIVE)
    assert len(live_requests(hv)) == 1


async def test_own_cancellation_wins_over_close(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    svc = service(hv, timeout=0.5, attempts=2)
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm-1", **LIVE))
    await until(lambda: len(live_requests(hv)) == 1)
    caller.cancel()
    await svc.aclose()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_events_after_close_are_harmless(hv: HoldFake) -> None:
    """An event landing just after a close: nothing raises, nothing is sent."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    add_vm(hv, GuestUnplug.never())
    svc = service(hv, timeout=0.3, attempts=2)
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm-1", **LIVE))
    await until(lambda: len(live_requests(hv)) == 1)
    sink = hv.sink
    assert sink is not None
    dom = hv.domain("vm-1")
    await svc.aclose()
    sink.device_removed(dom.uuid, dom.name, ALIAS)
    sink.device_removal_failed(dom.uuid, dom.name, ALIAS)
    sink.domain_resumed(dom.uuid, dom.name)
    sink.domain_stopped(dom.uuid, dom.name, "destroyed")
    sink.connection_closed("eof")
    with pytest.raises(ServiceClosed):
        await caller
    await asyncio.sleep(0.5)
    assert errors == []
    assert len(live_requests(hv)) == 1
    assert hv.opens == 1


async def test_events_stream_ends_at_close(hv: HoldFake) -> None:
    vm = add_vm(hv, GuestUnplug.later(0.05))
    svc = service(hv, timeout=1, attempts=2)
    await svc.open()
    got: list[Any] = []

    async def watch() -> None:
        async for ev in svc.events(vm.uuid.upper().replace("-", "")):
            got.append(ev)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.05)
    await svc.detach("vm-1", **LIVE)
    await until(lambda: len(got) >= 1, 1, "the device-removed event in the stream")
    assert got[0].kind == "device-removed"
    assert got[0].alias == ALIAS
    await svc.aclose()
    await asyncio.wait_for(watcher, 2)


# ---------------------------------------------------------------------------------------
# Rule 7: connection loss mid-request
# ---------------------------------------------------------------------------------------


def socket_closed() -> BackendError:
    return BackendError(
        ErrorCode.INTERNAL_ERROR, "internal error: client socket is closed", origin=ErrorDomain.RPC
    )


async def test_socket_closed_is_not_an_attempt(hv: HoldFake) -> None:
    """'"client socket is closed" ... It is not counted; the connection is
    re-made and the request goes out once it is back, within the same attempts'."""
    add_vm(hv, GuestUnplug.never())
    hv.fail_next["detach_live"] = socket_closed()
    async with service(hv, timeout=0.3, attempts=2, reconnect_backoff_max=0.1) as svc:
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 4)
        at = live_requests(hv)
        assert len(at) == 2, at


async def test_daemon_gone_during_request_goes_out_once_back(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.now())
    crashed = threading.Event()

    def hook(name: str) -> None:
        if name == "detach_live" and not crashed.is_set():
            crashed.set()
            hv.crash()

    hv.before_call = hook
    async with service(hv, timeout=0.5, attempts=1, reconnect_backoff_max=0.1) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(crashed.is_set)
        await asyncio.sleep(0.2)
        assert not task.done()
        hv.restart()
        result = await asyncio.wait_for(task, 3)
        assert result.live
        assert result.attempts == 1
        assert len(live_requests(hv)) == 1


class MaybeSentFake(HoldFake):
    """The request reaches the daemon, then the connection dies before the reply."""

    def __init__(self) -> None:
        super().__init__()
        self.lose_reply = 1

    def detach_live(self, uuid: str, alias: str) -> None:
        super().detach_live(uuid, alias)
        if self.lose_reply > 0:
            self.lose_reply -= 1
            self.crash()
            raise BackendError(
                ErrorCode.SYSTEM_ERROR,
                "Cannot recv data: Connection reset by peer",
                origin=ErrorDomain.RPC,
            )


@pytest.fixture
def mf() -> Iterator[MaybeSentFake]:
    fake = MaybeSentFake()
    yield fake
    fake.release_all()
    fake.cancel_timers()


async def test_maybe_sent_is_waited_out_not_resent(mf: MaybeSentFake) -> None:
    """'such a request is *maybe sent*, counted and waited out, never re-sent at once'."""
    add_vm(mf, GuestUnplug.never())
    async with service(mf, timeout=0.4, attempts=2, reconnect_backoff_max=0.05) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(mf)) == 1)
        await asyncio.sleep(0.05)
        mf.restart()
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(task, 4)
        at = live_requests(mf)
        assert len(at) == 2, at
        assert at[1] - at[0] >= 0.36, at


async def test_maybe_sent_then_event_succeeds_with_one_request(mf: MaybeSentFake) -> None:
    add_vm(mf, GuestUnplug.manual())
    async with service(mf, timeout=0.4, attempts=2, reconnect_backoff_max=0.05) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(mf)) == 1)
        mf.restart()
        await asyncio.sleep(0.15)
        mf.complete("vm-1", ALIAS)
        result = await asyncio.wait_for(task, 3)
        assert result.live
        assert len(live_requests(mf)) == 1


async def test_removed_while_disconnected_confirmed_by_xml(hv: HoldFake) -> None:
    """Rule 7: 'every pending unplug is reconciled against the live XML — gone →
    success'."""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=2, attempts=2, reconnect_backoff_max=0.05) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.crash()
        hv.complete("vm-1", ALIAS)  # no event: not connected
        await asyncio.sleep(0.1)
        hv.restart()
        result = await asyncio.wait_for(task, 1.5)
        assert result.confirmed_by == "xml"
        assert len(live_requests(hv)) == 1


async def test_reconnect_keeps_waiting_current_attempt(hv: HoldFake) -> None:
    """'still there → keeps waiting out its current attempt without a duplicate request'."""
    add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=0.5, attempts=2, reconnect_backoff_max=0.05) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.crash()
        await asyncio.sleep(0.05)
        hv.restart()
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(task, 4)
        at = live_requests(hv)
        assert len(at) == 2, at
        assert at[1] - at[0] >= 0.45, at


async def test_connection_lost_after_reconnect_timeout(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.never())
    async with service(
        hv, timeout=5, attempts=2, reconnect_timeout=0.5, reconnect_backoff_max=0.05
    ) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.crash()
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(task, 3)
        assert time.monotonic() - t0 < 1.5


# ---------------------------------------------------------------------------------------
# Rule 2: paused domains
# ---------------------------------------------------------------------------------------


async def test_paused_uses_no_attempt_and_sends_nothing(hv: HoldFake) -> None:
    """'when an attempt runs out on one, nothing is re-sent and no attempt is used
    up; aiodetach waits for libvirt's RESUMED event ... and then gives the guest a
    full timeout again'."""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.3, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.pause_domain("vm-1")
        await asyncio.sleep(1.0)
        assert len(live_requests(hv)) == 1
        assert not task.done()
        t_resume = time.monotonic()
        hv.resume_domain("vm-1")
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(task, 3)
        at = live_requests(hv)
        assert len(at) == 2, at
        assert at[1] - t_resume >= 0.27, "the guest was not given a full timeout after resuming"


async def test_paused_lost_resume_event_is_noticed(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.3, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.pause_domain("vm-1")
        await asyncio.sleep(0.5)
        hv.resume_domain("vm-1", emit=False)
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(task, 3)
        assert len(live_requests(hv)) == 2


async def test_resumed_during_recheck_state_read_not_lost(hv: HoldFake) -> None:
    """RESUMED lands while the re-check's state read (which saw PAUSED) is in
    its thread: the resume must not wait for the next look."""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.5, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.pause_domain("vm-1")
        h = hv.hold("lookup", after=True)
        await entered(h)
        t_resume = time.monotonic()
        hv.resume_domain("vm-1")
        await asyncio.sleep(0.02)
        h.release.set()
        try:
            await until(lambda: len(live_requests(hv)) == 2, 3, "the second request")
            gap = live_requests(hv)[1] - t_resume
            assert 0.45 <= gap < 0.85, f"second request {gap:.2f}s after RESUMED"
        finally:
            await reap(task)


async def test_resumed_during_paused_look_not_lost(hv: HoldFake) -> None:
    """RESUMED lands while the paused phase's periodic state look (which saw
    PAUSED) is in its thread."""
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.5, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.pause_domain("vm-1")
        h = hv.hold("lookup", after=True, nth=2)  # the re-check's, then the first look's
        await entered(h)
        t_resume = time.monotonic()
        hv.resume_domain("vm-1")
        await asyncio.sleep(0.02)
        h.release.set()
        try:
            await until(lambda: len(live_requests(hv)) == 2, 3, "the second request")
            gap = live_requests(hv)[1] - t_resume
            assert 0.45 <= gap < 0.85, f"second request {gap:.2f}s after RESUMED"
        finally:
            await reap(task)


async def test_event_while_paused_decides(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.2, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.pause_domain("vm-1")
        await asyncio.sleep(0.4)
        hv.reject("vm-1", ALIAS)
        with pytest.raises(DetachFailed):
            await asyncio.wait_for(task, 1)


async def test_stop_while_paused(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.manual())
    async with service(hv, timeout=0.2, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        hv.pause_domain("vm-1")
        await asyncio.sleep(0.4)
        hv.stop_domain("vm-1", "saved")
        with pytest.raises(DomainStopped) as info:
            await asyncio.wait_for(task, 1)
        assert info.value.reason == "saved"


# ---------------------------------------------------------------------------------------
# Journal take-up
# ---------------------------------------------------------------------------------------


async def _leave_pending(fake: FakeHypervisor, path: Path, **kw: Any) -> None:
    svc = service(fake, journal=path, **kw)
    await svc.open()
    task = asyncio.create_task(svc.detach("vm-1", **LIVE))
    await until(lambda: len(live_requests(fake)) == 1)
    await asyncio.sleep(0.02)
    await svc.aclose()
    with pytest.raises(ServiceClosed):
        await task


async def test_journal_takeup_joins_and_counts_attempts(hv: HoldFake, tmp_path: Path) -> None:
    add_vm(hv, GuestUnplug.never())
    path = tmp_path / "j.db"
    await _leave_pending(hv, path, timeout=0.5, attempts=2)
    async with service(hv, journal=path, timeout=0.5, attempts=2) as svc:
        rec = svc.recovered()
        assert [r.outcome for r in rec] == ["pending"]
        assert svc.pending() == [(hv.domain("vm-1").uuid, ALIAS)]
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        at = live_requests(hv)
        assert len(at) == 2, at
        assert at[1] - at[0] >= 0.45


async def test_journal_takeup_event_joined(hv: HoldFake, tmp_path: Path) -> None:
    add_vm(hv, GuestUnplug.manual())
    path = tmp_path / "j.db"
    await _leave_pending(hv, path, timeout=1, attempts=2)
    async with service(hv, journal=path, timeout=1, attempts=2) as svc:
        task = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await asyncio.sleep(0.1)
        hv.complete("vm-1", ALIAS)
        result = await asyncio.wait_for(task, 2)
        assert result.joined
        assert result.resumed
        assert result.attempts == 1
        assert len(live_requests(hv)) == 1


async def test_journal_takeup_nobody_asks(hv: HoldFake, tmp_path: Path) -> None:
    add_vm(hv, GuestUnplug.never())
    path = tmp_path / "j.db"
    await _leave_pending(hv, path, timeout=0.3, attempts=2)
    async with service(hv, journal=path, timeout=0.3, attempts=2) as svc:
        assert svc.pending()
        await asyncio.sleep(1.0)
        assert svc.pending() == []
        assert len(live_requests(hv)) == 1


async def test_journal_removed_while_down(hv: HoldFake, tmp_path: Path) -> None:
    add_vm(hv, GuestUnplug.manual())
    path = tmp_path / "j.db"
    await _leave_pending(hv, path, timeout=0.5, attempts=2)
    hv.complete("vm-1", ALIAS)
    async with service(hv, journal=path, timeout=0.5, attempts=2) as svc:
        rec = svc.recovered()
        assert [(r.outcome, r.confirmed_by) for r in rec] == [("removed", "xml")]
        assert svc.pending() == []
    assert len(live_requests(hv)) == 1


async def test_journal_domain_restarted(hv: HoldFake, tmp_path: Path) -> None:
    vm = add_vm(hv, GuestUnplug.never())
    path = tmp_path / "j.db"
    await _leave_pending(hv, path, timeout=0.5, attempts=2)
    vm.run += 1
    async with service(hv, journal=path, timeout=0.5, attempts=2) as svc:
        assert [r.outcome for r in svc.recovered()] == ["stopped"]
        assert svc.pending() == []


async def test_journal_takeup_window_over_caller_resends_as_next_attempt(
    hv: HoldFake, tmp_path: Path
) -> None:
    """'still attached, window over → kept one timeout for a caller, whose call
    re-checks the XML and re-sends as attempt n+1'."""
    add_vm(hv, GuestUnplug.never())
    path = tmp_path / "j.db"
    await _leave_pending(hv, path, timeout=0.3, attempts=2)
    await asyncio.sleep(0.35)
    async with service(hv, journal=path, timeout=0.3, attempts=2) as svc:
        with pytest.raises(DetachTimeout):
            await asyncio.wait_for(svc.detach("vm-1", **LIVE), 3)
        assert len(live_requests(hv)) == 2


# ---------------------------------------------------------------------------------------
# Two names for one domain
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["upper", "nodash", "upper-nodash"])
async def test_name_and_uuid_share_one_unplug(hv: HoldFake, spelling: str) -> None:
    vm = add_vm(hv, GuestUnplug.later(0.3))
    other = vm.uuid.upper() if "upper" in spelling else vm.uuid
    if "nodash" in spelling:
        other = other.replace("-", "")
    async with service(hv, timeout=1, attempts=2) as svc:
        a = asyncio.create_task(svc.detach("vm-1", **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        b = asyncio.create_task(svc.detach(other, **LIVE))
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 2)
        assert len(live_requests(hv)) == 1
        assert rb.joined
        assert ra.domain_uuid == rb.domain_uuid == vm.uuid


async def test_name_and_uuid_both_get_domain_stopped(hv: HoldFake) -> None:
    vm = add_vm(hv, GuestUnplug.never())
    async with service(hv, timeout=1, attempts=2) as svc:
        a = asyncio.create_task(svc.detach("vm-1", **LIVE))
        b = asyncio.create_task(svc.detach(vm.uuid.upper(), **LIVE))
        await until(lambda: len(live_requests(hv)) == 1)
        await asyncio.sleep(0.05)
        hv.stop_domain("vm-1")
        out = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 1)
        assert all(isinstance(o, DomainStopped) for o in out), out
        assert len(live_requests(hv)) == 1


async def test_many_per_domain_counts_uuid_and_name_once(hv: HoldFake) -> None:
    vm = hv.add_domain("vm-1")
    for i in range(4):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=GuestUnplug.later(0.1))
    spellings = ["vm-1", vm.uuid.upper(), vm.uuid.replace("-", ""), "vm-1"]
    reqs = [
        {"domain": d, "alias": f"ua-{i}", "live": True, "persistent": False}
        for i, d in enumerate(spellings)
    ]
    records: list[Any] = []
    async with service(hv, records, timeout=1, attempts=2) as svc:
        outs = await asyncio.wait_for(svc.detach_many(reqs, per_domain=1), 4)
    assert all(o.error is None for o in outs), outs
    # with per_domain=1 no two unplugs of vm-1 overlap
    spans: dict[str, list[float]] = {}
    for r in records:
        if isinstance(r, UnplugRecord) and r.kind in ("started", "ended"):
            spans.setdefault(r.alias, []).append(r.time)
    iv = sorted((s[0], s[-1]) for s in spans.values())
    assert len(iv) == 4
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(iv)), iv


# ---------------------------------------------------------------------------------------
# detach_many
# ---------------------------------------------------------------------------------------


async def test_many_checks_whole_batch_before_sending(hv: HoldFake) -> None:
    add_vm(hv, GuestUnplug.now())
    async with service(hv, timeout=1, attempts=2) as svc:
        calls_before = list(hv.calls)
        with pytest.raises(InvalidRequest) as info:
            await svc.detach_many(
                [
                    {"domain": "vm-1", "alias": ALIAS},
                    {"domain": "vm-1", "target": "vdb"},
                    {"domain": "vm-1", "alias": ""},
                ]
            )
        assert info.value.index == 2
        assert hv.calls == calls_before


async def test_many_duplicate_device_one_request(hv: HoldFake) -> None:
    vm = add_vm(hv, GuestUnplug.later(0.1))
    async with service(hv, timeout=1, attempts=2) as svc:
        outs = await svc.detach_many(
            [
                {"domain": "vm-1", **LIVE},
                {"domain": vm.uuid.upper(), **LIVE},
                {"domain": "vm-1", "target": "vdb", "live": True, "persistent": False},
            ],
            per_domain=4,
        )
    assert len(live_requests(hv)) == 1
    ok = [o for o in outs if o.result is not None]
    # each is either a joined success or (if it began after) DeviceNotFound
    assert ok, outs
    for o in outs:
        assert o.result is not None or isinstance(o.error, DeviceNotFound), o


async def test_many_batch_aborted_leaves_nothing_running(hv: HoldFake) -> None:
    vm = hv.add_domain("vm-1")
    vm.add_disk("vda", alias="ua-fast", unplug=GuestUnplug.now())
    for i in range(3):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=GuestUnplug.manual())
    reqs = [
        {"domain": "vm-1", "alias": a, "live": True, "persistent": False}
        for a in ("ua-0", "ua-1", "ua-fast", "ua-2")
    ]

    def boom(outcome: Any, done: int, total: int) -> None:
        raise RuntimeError("boom")

    async with service(hv, timeout=0.5, attempts=2) as svc:
        with pytest.raises(BatchAborted) as info:
            await asyncio.wait_for(svc.detach_many(reqs, on_progress=boom), 3)
        err = info.value
        assert isinstance(err.__cause__, RuntimeError)
        assert sorted(err.unfinished) == [0, 1, 3]
        by_index: dict[int, Any] = {o.index: o for o in err.outcomes}  # type: ignore[attr-defined]
        assert by_index[2].result is not None
        sent = {r.alias for r in hv.requests}
        # asking again joins the unplug still running
        for alias in ("ua-0", "ua-1", "ua-2"):
            if alias in sent:
                t = asyncio.create_task(
                    svc.detach("vm-1", alias=alias, live=True, persistent=False)
                )
                await asyncio.sleep(0.05)
                hv.complete("vm-1", alias)
                res = await asyncio.wait_for(t, 1)
                assert res.joined
        assert sum(1 for r in hv.requests if r.alias != "ua-fast") == len(sent - {"ua-fast"})
