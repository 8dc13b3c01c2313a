"""The one timer behind every parked unplug's window (aiodetach._deadlines):
windows end in order and on time, one ending out of order is refused (its
unplug keeps a timer of its own), and entries left behind by unplugs woken
early are dropped before they keep anything alive for long.

Through the service too: staggered windows, journal take-ups out of order,
a pause, a lost connection or a close while many unplugs are parked, and
nothing kept alive once they end (gc looks for ``aiodetach._unplug.Unplug``
instances left)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach._deadlines import Deadlines
from aiodetach._unplug import Unplug as _LiveUnplug
from aiodetach.errors import DetachTimeout, ServiceClosed
from aiodetach.instrumentation import UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug


class _Parked:
    """Stands in for an Unplug parked on the queue."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.parked = True
        self.resumed_at: float | None = None

    def window_over(self, when: float) -> bool:
        if not self.parked_on(when):
            return False
        self.parked = False
        self.resumed_at = asyncio.get_running_loop().time()
        return True

    def parked_on(self, when: float) -> bool:
        return self.parked and self.deadline == when


async def test_windows_end_in_order_and_on_time() -> None:
    loop = asyncio.get_running_loop()
    queue = Deadlines(loop)
    now = loop.time()
    parked = [_Parked(now + d) for d in (0.05, 0.05, 0.1, 0.2)]
    assert all(queue.add(p) for p in parked)
    await asyncio.sleep(0.3)
    for p in parked:
        assert p.resumed_at is not None
        assert p.resumed_at >= p.deadline - 0.001
        assert p.resumed_at - p.deadline < 0.05
    assert len(queue) == 0


async def test_a_window_ending_before_the_last_queued_is_refused() -> None:
    loop = asyncio.get_running_loop()
    queue = Deadlines(loop)
    now = loop.time()
    assert queue.add(_Parked(now + 1.0))
    assert not queue.add(_Parked(now + 0.5))  # e.g. what is left of a journal row's window
    assert queue.add(_Parked(now + 1.0))
    queue.close()


async def test_stale_entries_are_compacted_and_release_their_unplugs() -> None:
    loop = asyncio.get_running_loop()
    queue = Deadlines(loop)
    now = loop.time()
    parked = [_Parked(now + 10 + i) for i in range(10)]
    for p in parked:
        queue.add(p)
    ref = weakref.ref(parked[0])
    for p in parked[:6]:  # woken early: their entries go stale
        p.parked = False
        queue.left()
    assert len(queue) == 4  # compacted once more than half were stale
    del p
    parked = parked[6:]
    gc.collect()
    assert ref() is None
    for p in parked:
        p.parked = False
        queue.left()
    assert len(queue) == 0
    assert queue._handle is None  # nothing left to wake up for


async def test_stale_entry_coming_up_is_dropped() -> None:
    loop = asyncio.get_running_loop()
    queue = Deadlines(loop)
    now = loop.time()
    first, second = _Parked(now + 0.02), _Parked(now + 0.04)
    queue.add(first)
    queue.add(second)
    first.parked = False  # left without telling the queue (counted or not, it is skipped)
    await asyncio.sleep(0.1)
    assert first.resumed_at is None
    assert second.resumed_at is not None
    assert len(queue) == 0


def _times(fake: FakeHypervisor) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in fake.requests:
        out[r.alias].append(r.at)
    return out


def _live_unplugs() -> list[_LiveUnplug]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, _LiveUnplug)]


async def _until(cond: Any, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never came"
        await asyncio.sleep(0.005)


def _vm_with_disks(n: int, unplug: Callable[[int], Unplug]) -> FakeHypervisor:
    """A fake with domain "vm" holding disks vd0… (aliases ua-0…), ``unplug(i)`` each."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    for i in range(n):
        dom.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=unplug(i))
    return fake


async def test_staggered_parked_windows_resend_exactly_after_timeout() -> None:
    n = 24
    fake = _vm_with_disks(n, lambda i: Unplug.never() if i % 2 == 0 else Unplug.manual())
    timeout = 0.3
    settings = DetachSettings(timeout=timeout, attempts=2)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")))
            await asyncio.sleep(0.005)
        await _until(lambda: len(fake.requests) == n)
        await asyncio.sleep(0.01)
        for i in range(1, n, 2):  # woken early: their queue entries go stale
            fake.complete("vm", f"ua-{i}")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert svc.pending() == []
    times = _times(fake)
    for i in range(n):
        alias = f"ua-{i}"
        if i % 2:
            assert results[i].confirmed_by == "event", results[i]  # type: ignore[union-attr]
            assert len(times[alias]) == 1
        else:
            err = results[i]
            assert isinstance(err, DetachTimeout), err
            assert err.attempts == 2
            assert err.alias == alias
            assert err.domain == "vm"
            first, second = times[alias]
            gap = second - first
            assert timeout - 0.01 <= gap <= timeout + 0.12, (alias, gap)


async def test_journal_take_ups_out_of_order_end_at_their_own_window(tmp_path: Path) -> None:
    """Windows taken up from the journal out of deadline order (one re-sent
    before the other was first sent): neither is re-sent before its window
    ends, both soon after."""
    journal = tmp_path / "j.db"
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vda", alias="ua-a", unplug=Unplug.never())
    dom.add_disk("vdb", alias="ua-b", unplug=Unplug.never())
    settings = DetachSettings(timeout=0.6, attempts=4, journal_sync="normal")
    async with DetachService(backend=fake, settings=settings, journal=journal, log=False) as svc:
        a = asyncio.create_task(svc.detach("vm", alias="ua-a"))
        await _until(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.45)
        b = asyncio.create_task(svc.detach("vm", alias="ua-b"))
        await _until(lambda: len(_times(fake)["ua-a"]) == 2)  # a re-sent after b's first
        await asyncio.sleep(0.05)
    await asyncio.gather(a, b, return_exceptions=True)
    sent = _times(fake)
    a_end = sent["ua-a"][-1] + 0.6
    b_end = sent["ua-b"][-1] + 0.6
    assert a_end > b_end  # a's row comes first in the journal, its window ends last
    async with DetachService(backend=fake, settings=settings, journal=journal, log=False) as svc:
        assert sorted(k[1] for k in svc.pending()) == ["ua-a", "ua-b"]
        a = asyncio.create_task(svc.detach("vm", alias="ua-a"))
        b = asyncio.create_task(svc.detach("vm", alias="ua-b"))
        await _until(lambda: len(_times(fake)["ua-a"]) == 3 and len(_times(fake)["ua-b"]) == 2)
        sent = _times(fake)
        assert a_end - 0.01 <= sent["ua-a"][2] <= a_end + 0.15
        assert b_end - 0.01 <= sent["ua-b"][1] <= b_end + 0.15
        for dev in ("ua-a", "ua-b"):
            fake.complete("vm", dev)
        ra, rb = await asyncio.gather(a, b)
        assert ra.resumed
        assert rb.resumed


async def test_paused_while_parked_then_full_timeout_after_resume() -> None:
    fake = _vm_with_disks(6, lambda _i: Unplug.manual())
    settings = DetachSettings(timeout=0.25, attempts=2)
    steps: list[tuple[float, str, str]] = []

    def hook(rec: Any) -> None:
        if isinstance(rec, UnplugRecord):
            steps.append((time.monotonic(), rec.alias, rec.kind))

    async with DetachService(backend=fake, settings=settings, hooks=[hook], log=False) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(6)]
        await _until(lambda: len(fake.requests) == 6)
        fake.pause_domain("vm")
        await asyncio.sleep(0.6)  # windows over while paused: no re-send, no attempt used
        assert len(fake.requests) == 6
        resumed_at = time.monotonic()
        fake.resume_domain("vm")
        await asyncio.sleep(0.15)  # well inside the full timeout given after RESUMED
        assert len(fake.requests) == 6
        fake.complete("vm", "ua-0")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0].confirmed_by == "event"  # type: ignore[union-attr]
    times = _times(fake)
    for i in range(1, 6):
        err = results[i]
        assert isinstance(err, DetachTimeout), err
        assert len(times[f"ua-{i}"]) == 2
        # the re-send comes a full timeout after the guest runs again
        assert times[f"ua-{i}"][1] >= resumed_at + 0.25 - 0.01


async def test_crash_while_many_parked_wakes_them_without_resend() -> None:
    n = 20
    fake = _vm_with_disks(n, lambda _i: Unplug.manual())
    settings = DetachSettings(timeout=0.8, attempts=2, reconnect_timeout=5)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(n)]
        await _until(lambda: len(fake.requests) == n)
        first = {r.alias: r.at for r in fake.requests}
        fake.crash()
        await asyncio.sleep(0.1)
        # removed while the connection was down: the event is lost for good
        for i in range(0, n, 2):
            fake.complete("vm", f"ua-{i}", emit=False)
        fake.restart()
        done = await asyncio.wait_for(
            asyncio.gather(*[tasks[i] for i in range(0, n, 2)]), timeout=0.6
        )
        assert all(r.confirmed_by == "xml" for r in done)
        assert len(fake.requests) == n  # nobody re-sent inside its window
        await _until(lambda: len(fake.requests) == n + n // 2, limit=3)
        for r in fake.requests[n:]:
            assert r.at - first[r.alias] >= 0.8 - 0.01
        for i in range(1, n, 2):
            fake.complete("vm", f"ua-{i}")
        await asyncio.gather(*tasks)
        assert svc.pending() == []


async def test_aclose_with_many_parked_ends_everything_promptly_and_keeps_nothing() -> None:
    n = 300
    fake = _vm_with_disks(n, lambda _i: Unplug.never())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=30, attempts=2), log=False)
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(n)]
    await _until(lambda: len(fake.requests) == n)
    await asyncio.sleep(0.05)
    # Some callers leave (the unplug stays, parked for nobody); some wake early.
    for t in tasks[:50]:
        t.cancel()
    t0 = time.monotonic()
    await asyncio.wait_for(svc.aclose(), 2)
    await svc.aclose()  # idempotent
    assert time.monotonic() - t0 < 1.0
    seen: list[tuple[str, str | None, str | None]] = []
    for t in tasks:
        try:
            await t
        except asyncio.CancelledError:
            seen.append(("cancelled", None, None))
        except ServiceClosed as exc:
            seen.append(("closed", exc.domain, exc.alias))
    assert all(s[0] == "cancelled" for s in seen[:50])
    for kind, domain, alias in seen[50:]:
        assert kind == "closed"
        assert domain == "vm"
        assert alias is not None
    assert svc.pending() == []
    del tasks, t
    assert _live_unplugs() == []


async def test_ended_unplug_not_kept_by_a_stale_queue_entry_once_nothing_is_parked() -> None:
    """B is woken early (its entry goes stale, 1 of 2: not compacted yet);
    A's entry comes up and A ends on its timeout.  Nothing is parked any
    more, so the queue keeps nothing (compacted when what is left after a
    firing is mostly stale), rather than B until its old deadline."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vda", alias="ua-a", unplug=Unplug.never())
    dom.add_disk("vdb", alias="ua-b", unplug=Unplug.manual())
    settings = DetachSettings(timeout=0.5, attempts=1)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        a = asyncio.create_task(svc.detach("vm", alias="ua-a"))
        await _until(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.35)
        b = asyncio.create_task(svc.detach("vm", alias="ua-b"))
        await _until(lambda: len(fake.requests) == 2)
        await asyncio.sleep(0.02)
        fake.complete("vm", "ua-b")
        assert (await b).confirmed_by == "event"
        with pytest.raises(DetachTimeout):
            await a
        assert svc.pending() == []
        await asyncio.sleep(0.02)
        del a, b
        left = _live_unplugs()
        assert left == [], [(u.key, u.phase) for u in left]


async def test_many_woken_early_leave_nothing_behind() -> None:
    n = 200
    fake = _vm_with_disks(n, lambda _i: Unplug.manual())
    async with DetachService(
        backend=fake, settings=DetachSettings(timeout=30, attempts=1), log=False
    ) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(n)]
        await _until(lambda: len(fake.requests) == n)
        await asyncio.sleep(0.02)
        for i in reversed(range(n)):
            fake.complete("vm", f"ua-{i}")
        await asyncio.gather(*tasks)
        assert svc.pending() == []
        del tasks
        await asyncio.sleep(0.02)
        assert _live_unplugs() == []


async def test_mass_wake_compacts_and_keeps_stale_entries_within_the_documented_bound() -> None:
    """Pins the documented bound: ended unplugs kept by stale entries are
    fewer than the parked ones (the queue stays within twice the parked)."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    n_never, n_done = 60, 180
    for i in range(n_never):
        dom.add_disk(f"vn{i}", alias=f"ua-n{i}", unplug=Unplug.never())
    for i in range(n_done):
        dom.add_disk(f"vm{i}", alias=f"ua-m{i}", unplug=Unplug.manual())
    async with DetachService(
        backend=fake, settings=DetachSettings(timeout=30, attempts=1), log=False
    ) as svc:
        stuck = [asyncio.create_task(svc.detach("vm", alias=f"ua-n{i}")) for i in range(n_never)]
        done = [asyncio.create_task(svc.detach("vm", alias=f"ua-m{i}")) for i in range(n_done)]
        await _until(lambda: len(fake.requests) == n_never + n_done)
        await asyncio.sleep(0.02)
        for i in range(n_done):
            fake.complete("vm", f"ua-m{i}")
        await asyncio.gather(*done)
        del done
        await asyncio.sleep(0.02)
        alive = {u.key[1] for u in _live_unplugs()}
        assert {f"ua-n{i}" for i in range(n_never)} <= alive
        ended_kept = len(alive) - n_never
        assert ended_kept <= n_never, ended_kept  # 59 of 180 here, until their old deadline
        assert svc._unplugs is not None
        assert len(svc._unplugs.deadlines) <= 2 * n_never
        for t in stuck:
            t.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
