"""Which connection a blocking libvirt call runs on (the backend's *lanes*).

Each lane is one libvirt connection with at most one call inside it (why:
`aiodetach._libvirt._Lane`).  Two rules decide who gets a lane, both
measured as missing on a host where another libvirt client held one
domain's job in a loop of its own device changes, so that our detach
requests for that domain sat in libvirtd waiting for the job:

- **a call takes any free lane.**  A call that found none used to queue
  behind one lane chosen in turn, often one whose call was stuck: with one
  stuck call and 24 disks of a healthy domain in a batch, some of the
  healthy detaches took 4-9 s instead of ~0.7 s.  Here a waiting call gets
  whichever lane frees first;
- **one domain never holds every lane.**  With four stuck calls on four
  lanes, a healthy domain's last disk took 19.1 s.  A domain's calls hold
  at most ``len(lanes) - 1`` lanes (1 with a single lane), so while some
  are stuck the others' calls still go through the last one.  Calls that
  name no domain (a lookup by name) are not capped: nothing they wait for
  in libvirtd belongs to one domain's job.

Waiters that may run are served first come, first served; a call waiting
only because its domain is at the cap lets those behind it pass and keeps
its place in line for when its domain falls under the cap.  A waiting call
blocks the worker thread it came in (the service's ``max_threads``).

Every step is O(log n) in the waiters (a heap for the ready ones, a queue
per capped domain): a mass detach of thousands of devices passes through
here once per call.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

__all__ = ["Lanes", "per_domain_lanes"]

_L = TypeVar("_L")


def per_domain_lanes(lanes: int) -> int:
    """How many of ``lanes`` one domain's calls may hold at once."""
    return max(1, lanes - 1)


class _Waiter(Generic[_L]):
    """A call waiting for a lane; ordered by arrival."""

    __slots__ = ("arrived", "domain", "lane", "woken")

    def __init__(self, arrived: int, domain: str | None) -> None:
        self.arrived = arrived
        self.domain = domain
        self.lane: _L | None = None
        self.woken = threading.Event()

    def __lt__(self, other: _Waiter[_L]) -> bool:
        return self.arrived < other.arrived


class Lanes(Generic[_L]):
    """Hands out lanes to calls from any thread: `take()` for one call's
    whole duration.

    Invariants (under ``_lock``): a lane is either free or held by exactly
    one call; a free lane means nobody is ready to run (a lane that frees goes
    straight to the first ready waiter); ``_admitted[d]`` counts domain ``d``'s
    calls holding a lane *or* ready to get the next one, never more than
    ``cap``, and ``_capped[d]`` is non-empty only while it is at ``cap``.
    """

    def __init__(self, lanes: Sequence[_L]) -> None:
        if not lanes:
            raise ValueError("at least one lane is needed")
        self._lock = threading.Lock()
        self._free = list(reversed(lanes))  # a stack: the first lane is used first
        self.cap = per_domain_lanes(len(lanes))
        self._admitted: dict[str, int] = {}
        self._ready: list[_Waiter[_L]] = []  # a heap, by arrival
        self._capped: dict[str, collections.deque[_Waiter[_L]]] = {}
        self._arrivals = itertools.count()

    @contextlib.contextmanager
    def take(self, domain: str | None) -> Iterator[_L]:
        """A lane no other call is inside, for a call about ``domain`` (its
        UUID, canonical) or about no domain in particular (None)."""
        lane = self._acquire(domain)
        try:
            yield lane
        finally:
            self._release(lane, domain)

    def waiting(self) -> int:
        """Calls waiting for a lane now (for tests and instrumentation)."""
        with self._lock:
            return len(self._ready) + sum(map(len, self._capped.values()))

    def _acquire(self, domain: str | None) -> _L:
        with self._lock:
            waiter: _Waiter[_L] = _Waiter(next(self._arrivals), domain)
            if domain is not None and self._admitted.get(domain, 0) >= self.cap:
                self._capped.setdefault(domain, collections.deque()).append(waiter)
            else:
                if domain is not None:
                    self._admitted[domain] = self._admitted.get(domain, 0) + 1
                if self._free:  # then nobody is ready and waiting: no one is passed
                    return self._free.pop()
                heapq.heappush(self._ready, waiter)
        waiter.woken.wait()
        lane = waiter.lane
        assert lane is not None
        return lane

    def _release(self, lane: _L, domain: str | None) -> None:
        with self._lock:
            if domain is not None:
                capped = self._capped.get(domain)
                if capped:
                    # The domain's next call takes this one's place among the
                    # admitted: the count stays, the call joins the line by its
                    # arrival (ahead of anyone who came after it).
                    heapq.heappush(self._ready, capped.popleft())
                    if not capped:
                        del self._capped[domain]
                else:
                    left = self._admitted[domain] - 1
                    if left:
                        self._admitted[domain] = left
                    else:
                        del self._admitted[domain]
            if not self._ready:
                self._free.append(lane)
                return
            waiter = heapq.heappop(self._ready)
            waiter.lane = lane
        waiter.woken.set()
