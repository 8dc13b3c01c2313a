"""The one timer behind every parked unplug's window (aiodetach._deadlines):
windows end in order and on time, one ending out of order is refused (its
unplug keeps a timer of its own), and entries left behind by unplugs woken
early are dropped before they keep anything alive for long."""

from __future__ import annotations

import asyncio
import gc
import weakref

from aiodetach._deadlines import Deadlines


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
