"""One timer for the windows of every parked unplug.

A parked unplug (see `aiodetach._unplug.Unplug._park()`) waits for its
window to end or for a wake-up.  With a timer of its own each would hold a
``TimerHandle``, a copy of the context and a bound method, about 0.25 KiB,
for ten thousand pending unplugs 2.4 MiB, and put as many entries on the
loop's timer heap.

Windows are mostly appended in the order they end: every window is
``timeout`` long and starts when libvirt answers a request, so a window that
starts later ends later.  They are kept in two parallel queues (the deadline
and the unplug) with one loop timer for the head.  A window that would end
before the last one queued (a window taken up from the journal, with only
what is left of it) is refused, and that unplug keeps a timer of its own.

An unplug woken before its deadline (the usual end: its event came) leaves
its entry behind, *stale*: removing it from the middle of a queue would cost
a scan per wake-up.  Stale entries are counted, and once they are more than
half of the queue it is compacted in one pass (when an unplug leaves its park,
and when entries come up), so the queue stays within about twice the parked
unplugs, and once the last parked unplug is gone nothing is kept at all.  An
ended unplug may otherwise be kept by its stale entry until that entry's
deadline, while more than half of the queue is live.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

__all__ = ["Deadlines"]

_RESOLUTION = time.get_clock_info("monotonic").resolution
"""The loop's clock is ``time.monotonic``: an entry this close to now is due
(as the loop itself runs a timer whose time is within its clock's resolution)."""


class Parked(Protocol):
    deadline: float

    def window_over(self, when: float) -> bool:
        """The window ending at ``when`` is over: resume if it is still parked
        on it (True), else its entry was stale (False)."""

    def parked_on(self, when: float) -> bool:
        """Still parked on the queue's entry for the window ending at ``when``."""


class Deadlines:
    """Parked unplugs in the order their windows end, and one timer for the first."""

    __slots__ = ("_handle", "_loop", "_parked", "_stale", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._when: deque[float] = deque()
        self._parked: deque[Parked] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._stale = 0  # entries whose unplug is no longer parked on them

    def __len__(self) -> int:
        return len(self._when)

    def add(self, unplug: Parked) -> bool:
        """Queue ``unplug`` until its ``deadline``.  False if that comes before
        the last one queued: the caller keeps a timer of its own instead."""
        when = unplug.deadline
        queue = self._when
        if queue and when < queue[-1]:
            return False
        queue.append(when)
        self._parked.append(unplug)
        self._schedule()
        return True

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time() + _RESOLUTION
        while self._when and self._when[0] <= now:
            when = self._when.popleft()
            unplug = self._parked.popleft()
            try:
                if not unplug.window_over(when):
                    self._stale = max(self._stale - 1, 0)
            except Exception as exc:
                self._loop.call_exception_handler(
                    {"message": "aiodetach: resuming a parked unplug failed", "exception": exc}
                )
        if self._stale * 2 > len(self._when):
            # What is left is mostly stale (the last live entry just came up,
            # say): drop it now rather than at its old deadlines.
            self._compact()
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is None and self._when:
            self._handle = self._loop.call_at(self._when[0], self._fire)

    def left(self) -> None:
        """An unplug left its park before its entry came up: the entry is stale."""
        self._stale += 1
        if self._stale * 2 > len(self._when):
            self._compact()

    def _compact(self) -> None:
        kept = [
            (when, unplug)
            for when, unplug in zip(self._when, self._parked, strict=True)
            if unplug.parked_on(when)
        ]
        self._when = deque(when for when, _unplug in kept)
        self._parked = deque(unplug for _when, unplug in kept)
        self._stale = 0
        if not kept and self._handle is not None:
            self._handle.cancel()  # (otherwise it fires at most once early, for nothing)
            self._handle = None

    def close(self) -> None:
        """Forget every entry (the service closes: its unplugs end on their own)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._when.clear()
        self._parked.clear()
        self._stale = 0
