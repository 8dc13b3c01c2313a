"""Callers that leave a device's unplug and come back (rule 3: the unplug
belongs to the device, not to a caller), on the fake hypervisor.

A caller's own deadline or cancellation removes only its interest: asking
again joins the pending unplug (no second request), an unplug nobody waits
on is kept one timeout past its window, a caller back late gets the rest of
the attempts, and a retry loop still ends in DetachTimeout after
``attempts`` requests.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections import Counter
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach._unplug import Unplug as _LiveUnplug
from aiodetach.errors import (
    DetachTimeout,
)
from aiodetach.testing import FakeHypervisor, Unplug

from ._gate_fake import GateFake, settle


async def test_caller_deadline_and_retry_sends_one_request(fake: FakeHypervisor) -> None:
    """A caller that gives up after 0.1 s and asks again at once joins the
    pending unplug (0.1: a second request per retry).  The guest releases the
    device while a retry waits: released in the instant between a give-up
    and the next ask, nobody would be waiting, and the next ask would find
    the device gone (DeviceNotFound, as documented: nothing is kept for a
    caller who has not asked yet)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=3, timeout=2.0)
    kinds: list[str] = []

    def hook(record: Any) -> None:
        kinds.append(record.kind)

    async with DetachService(backend=fake, settings=settings, hooks=[hook]) as svc:
        tries = 0
        while True:
            tries += 1
            patience = 0.1 if tries < 4 else 10.0  # the fourth waits, and sees it go
            try:
                async with asyncio.timeout(patience):
                    ask = asyncio.ensure_future(svc.detach("vm", alias="ua-d", persistent=False))
                    if tries == 4:  # the fourth ask has joined the unplug: release
                        await _until(lambda: kinds.count("unplug_joined") == 3)
                        fake.complete("vm", "ua-d")
                    result = await ask
                break
            except TimeoutError:
                assert tries < 4
    assert tries == 4, tries
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
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d", persistent=False)
    # The first window's rest, then one re-send: the same unplug's attempts
    # (a fresh unplug would have sent a third request).
    assert info.value.attempts == 2
    assert len(fake.requests) == 2


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


def _live_unplugs() -> list[_LiveUnplug]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, _LiveUnplug)]


async def _until(cond: Any, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never came"
        await asyncio.sleep(0.005)


async def test_caller_leaves_while_parked_and_returns_after_the_window() -> None:
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    timeout = 0.3
    settings = DetachSettings(timeout=timeout, attempts=2)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _until(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.1)
        assert len(svc.pending()) == 1
        assert len(fake.requests) == 1
        await asyncio.sleep(0.2)  # window over, lingering for nobody
        assert len(fake.requests) == 1
        back = time.monotonic()
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d")
        assert info.value.attempts == 2
        del info  # (its traceback keeps the call's frame, and the unplug, alive)
        assert len(fake.requests) == 2
        assert fake.requests[1].at - back < 0.1  # re-checked and re-sent at once
        assert time.monotonic() - fake.requests[1].at >= timeout - 0.01
        assert svc.pending() == []
        # the same again, nobody coming back: dropped after window + timeout
        fake.domain("vm").add_disk("vdc", alias="ua-e", unplug=Unplug.never())
        lone = asyncio.create_task(svc.detach("vm", alias="ua-e"))
        await _until(lambda: len(fake.requests) == 3)
        lone.cancel()
        await asyncio.gather(lone, return_exceptions=True)
        del lone
        await asyncio.sleep(2 * timeout + 0.1)
        assert svc.pending() == []
        assert len(fake.requests) == 3
        left = _live_unplugs()
        assert left == [], [(u.key[1], u.phase) for u in left]


async def test_retry_after_own_deadline_joins_the_unplug_no_second_request(
    gf: GateFake,
) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    for i in range(5):
        dom.add_disk(f"sx{i}", alias=f"ua-x{i}", unplug=Unplug.manual())
    settings_ = DetachSettings(timeout=5, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        others = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-x{i}", persistent=False))
            for i in range(5)
        ]
        for _ in range(3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await svc.detach("vm", alias="ua-d", persistent=False)
        assert "ua-d" in [a for _u, a in svc.pending()]
        retry = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await settle()
        gf.complete("vm", "ua-d")
        result = await retry
        for i in range(5):
            gf.complete("vm", f"ua-x{i}")
        await asyncio.gather(*others)
    assert result.joined
    assert [r.alias for r in gf.requests].count("ua-d") == 1


async def test_batch_aborted_while_unplugs_park_then_retry_joins(gf: GateFake) -> None:
    """A retry after BatchAborted joins every unplug whose request reached
    libvirt; one whose caller was cancelled before sending was abandoned, and
    its retry sends the one and only request.  Either way: one request each."""
    dom = gf.add_domain("vm")
    for i in range(6):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    dom.add_disk("sdz", alias="ua-z", unplug=Unplug.now())
    from aiodetach.errors import BatchAborted

    def boom(outcome: Any, done: int, total: int) -> None:
        raise RuntimeError("stop")

    async with DetachService(backend=gf, settings=DetachSettings(timeout=5)) as svc:
        reqs = [{"domain": "vm", "alias": "ua-z"}] + [
            {"domain": "vm", "alias": f"ua-d{i}"} for i in range(6)
        ]
        with pytest.raises(BatchAborted):
            await svc.detach_many(reqs, per_domain=None, on_progress=boom)
        sent_before = {r.alias for r in gf.requests}
        await settle()
        pending = {a for _u, a in svc.pending()}
        assert pending == sent_before - {"ua-z"}  # the unsent ones were abandoned
        retry = {
            a: asyncio.create_task(svc.detach("vm", alias=a, persistent=False))
            for a in (f"ua-d{i}" for i in range(6))
        }
        await settle()
        for i in range(6):
            gf.complete("vm", f"ua-d{i}")
        results = await asyncio.wait_for(asyncio.gather(*retry.values()), 5)
    assert {r.alias for r in results if r.joined} == pending
    per = Counter(r.alias for r in gf.requests)
    assert all(v == 1 for v in per.values()), per
