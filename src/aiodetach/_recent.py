"""What ended since a caller began: the memory behind "one request per device".

A detach reads the domain's definitions, then acts on what it read (joins
the device's unplug, shares its config detach).  Those two steps are not
one: another caller's unplug or config detach of the same device can end
in between.  Without a record of it, the late caller either does not find
the device (and raises "not found" for a detach that did happen) or finds it
in a read taken just before it went and sends a second request for a device
already gone.

So each caller takes a `Recent.ticket()` when it begins and gives it back
once it has acted; whatever ends meanwhile is kept (`Recent.add()`) until
no caller that began before it is left.  With nobody in flight nothing is
kept at all, so an idle or steady service holds no records.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from ._xml import Identity

__all__ = ["Recent", "shared_identity"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Values that ended since the oldest caller in flight began, by key."""

    __slots__ = ("_callers", "_ended", "seq")

    def __init__(self) -> None:
        self.seq = 0
        """Bumped by every `add()`: a ticket, or a mark taken later, is a value of it."""
        self._ended: dict[K, list[tuple[int, V]]] = {}  # one key may end more than once
        self._callers: Counter[int] = Counter()  # tickets in flight

    def ticket(self) -> int:
        """Take when a caller begins; give it back with `release()`."""
        self._callers[self.seq] += 1
        return self.seq

    def release(self, ticket: int) -> None:
        self._callers[ticket] -= 1
        if self._callers[ticket] <= 0:
            del self._callers[ticket]
        if not self._ended:
            return
        # Only a caller whose ticket predates an end can need its record.  The
        # oldest ticket is the first key: tickets are taken in rising order (a
        # ticket given back and taken again is the current, highest one).
        oldest = next(iter(self._callers), self.seq)
        for key in list(self._ended):
            kept = [(seq, value) for seq, value in self._ended[key] if seq > oldest]
            if kept:
                self._ended[key] = kept
            else:
                del self._ended[key]

    def add(self, key: K, value: V) -> None:
        """``value`` ended now; kept while a caller that began before is in flight."""
        self.seq += 1
        if self._callers:
            self._ended.setdefault(key, []).append((self.seq, value))

    def get(self, key: K, since: int) -> list[V]:
        """What ended under ``key`` after ``since`` (a ticket or a later mark), oldest first."""
        return [value for seq, value in self._ended.get(key, ()) if seq > since]

    def since(self, since: int) -> Iterator[tuple[K, V]]:
        """Everything that ended after ``since``."""
        for key, ended in self._ended.items():
            for seq, value in ended:
                if seq > since:
                    yield key, value


_IDENTITIES: dict[Identity, Identity] = {}
_IDENTITIES_MAX = 4096


def shared_identity(identity: Identity | None) -> Identity | None:
    """One copy of each identity (its strings interned): the same targets and
    tags recur across thousands of pending unplugs, and each would otherwise
    hold its own tuple and the strings of its own parse of a definition.
    The table is bounded (emptied when full): MACs and hostdev sources are
    unique, and it is only a cache."""
    if identity is None:
        return None
    found = _IDENTITIES.get(identity)
    if found is None:
        if len(_IDENTITIES) >= _IDENTITIES_MAX:
            _IDENTITIES.clear()
        found = tuple(sys.intern(part) if type(part) is str else part for part in identity)
        _IDENTITIES[found] = found
    return found
