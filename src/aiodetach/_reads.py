"""Reads of one domain shared by the callers that need them at the same time.

In a mass detach (a host evacuation) many devices of one domain are detached
at once, and each caller needs the domain looked up and its definitions
read.  Asking libvirtd once per device costs it a domain job and an XML
formatting each, for answers that are all the same.  Here concurrent
callers share them, under one rule that keeps them correct:

**A caller is never served a read that started before it arrived.**  A
device hot-plugged just before its detach is in every read that starts
after the detach was asked for, but maybe not in one already under way; a
caller joining that one would be told the device does not exist.

Hence "join the next read": per key (a lookup of one name or UUID, one
definition of one domain) at most one read is in flight and at most one is
queued behind it.  A caller finding nothing in flight starts a read; a
caller finding one in flight joins the queued one (creating it if needed),
which starts when the one in flight ends.  A read "starts" when its task
first runs, before it asks for a worker thread: callers arriving in the same
loop step as the one that created it (all the callers woken by one shared
lookup, say) still join it.  Every read therefore started after each of its
callers arrived, and N callers arriving together cost at most two reads.

A read runs in a task of its own, so one caller's cancellation never cancels
it for the others: each caller waits on a plain future of its own, which the
read's one done-callback settles (what ``asyncio.shield`` would do, without
its coroutine, outer future and two callbacks per caller: in a mass detach
ten thousand callers wait on one read, and that was most of the memory the
ramp took).  Its failure reaches every caller of that read as the same exception, which each
caller maps to its own typed error (naming its own domain and alias).  A
connection lost mid-read is `Connection.read()`'s business, as for a
read of one's own: the read waits for the reconnect and asks again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["SharedReads"]

_T = TypeVar("_T")


class _Read(Generic[_T]):
    """One read's task and the callers' futures it settles."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[_T] | None = None
        self.waiters: list[asyncio.Future[_T]] = []

    def settle(self, task: asyncio.Task[_T]) -> None:
        """The task's done-callback: each caller still waiting gets its outcome."""
        waiters, self.waiters = self.waiters, []
        if task.cancelled():
            for mine in waiters:
                mine.cancel()
            return
        error = task.exception()  # retrieved even if every caller left
        for mine in waiters:
            if mine.done():
                continue  # that caller was cancelled
            if error is not None:
                mine.set_exception(error)
            else:
                mine.set_result(task.result())


class _Slot(Generic[_T]):
    """The read in flight for one key, and the one queued behind it."""

    __slots__ = ("queued", "running", "started")

    def __init__(self) -> None:
        self.running: _Read[_T] | None = None
        self.started = False  # whether ``running`` has begun its read
        self.queued: _Read[_T] | None = None


class SharedReads:
    """Idempotent reads, shared by the callers that ask at the same time."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot[Any]] = {}

    def read(
        self, key: Hashable, start: Callable[[], Coroutine[Any, Any, _T]]
    ) -> asyncio.Future[_T]:
        """The result of a read of ``key`` that starts no earlier than now: a
        future of the caller's own (cancelling it leaves the read alone).

        ``start()`` makes the read; it is called only if this caller starts
        one (every caller of one key must mean the same read).
        """
        read = self._next(key, start)
        assert read.task is not None
        mine: asyncio.Future[_T] = read.task.get_loop().create_future()
        read.waiters.append(mine)
        return mine

    def _next(self, key: Hashable, start: Callable[[], Coroutine[Any, Any, _T]]) -> _Read[_T]:
        slot: _Slot[_T] | None = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        if slot.running is None:
            read = slot.running = self._spawn(key, slot, None, start)
            slot.started = False
        elif not slot.started:
            read = slot.running  # created, but its read has not begun: still ours to join
        elif slot.queued is None:
            read = slot.queued = self._spawn(key, slot, slot.running, start)
        else:
            read = slot.queued
        return read

    def _spawn(
        self,
        key: Hashable,
        slot: _Slot[_T],
        after: _Read[_T] | None,
        start: Callable[[], Coroutine[Any, Any, _T]],
    ) -> _Read[_T]:
        read: _Read[_T] = _Read()
        read.task = asyncio.get_running_loop().create_task(
            self._run(key, slot, read, after.task if after is not None else None, start)
        )
        read.task.add_done_callback(read.settle)
        return read

    async def _run(
        self,
        key: Hashable,
        slot: _Slot[_T],
        me: _Read[_T],
        after: asyncio.Task[_T] | None,
        start: Callable[[], Coroutine[Any, Any, _T]],
    ) -> _T:
        try:
            if after is not None:
                await asyncio.wait((after,))  # its outcome is its callers', not ours
            slot.started = True  # from here on, a new caller queues behind us
            return await start()
        finally:
            if slot.running is me:
                # The queued read is next (it begins when this step is over).
                slot.running, slot.queued, slot.started = slot.queued, None, False
            elif slot.queued is me:
                slot.queued = None
            if slot.running is None and slot.queued is None and self._slots.get(key) is slot:
                del self._slots[key]

    def in_flight(self) -> int:
        """Reads running or queued (for tests)."""
        return sum((s.running is not None) + (s.queued is not None) for s in self._slots.values())

    async def close(self, grace: float) -> None:
        """Await every read (the connection is closing).

        Not cancelled: a closing connection fails them at once with
        ``ServiceClosed`` (a read stuck in its thread included), and that, not
        a cancellation, is what their callers must see.  What is still there
        after ``grace`` seconds is cancelled.
        """
        tasks = {
            r.task
            for s in self._slots.values()
            for r in (s.running, s.queued)
            if r is not None and r.task is not None
        }
        if not tasks:
            return
        _done, left = await asyncio.wait(tasks, timeout=grace)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        self._slots.clear()
