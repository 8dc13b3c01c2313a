"""The callers of a live unplug: one plain future each, and how they leave.

A caller waits on a future of its own (`Following.follow()`), so its
cancellation cancels only that future, never the unplug: what
``asyncio.shield`` of a shared future would do, with no task per caller.

A cancelled caller leaves when its task next runs (`Following.unfollow()`),
but its cancellation and what the unplug decides can be ready in one loop
step (a loaded loop runs both at once).  Counted as still waiting, it would
take an outcome to a future nobody reads, or have a request sent for nobody.
So before each decision the cancelled followers are counted as gone
(`Following.swept()`), the worker thread about to send a request does not
count them (`Following.cancelled()`), and a `DetachTimeout` that still
reached only a cancelled future is kept for the caller asking again
(`aiodetach._registry.Unplugs.untold()`).
"""

from __future__ import annotations

import asyncio

from ._ending import LiveDone, settle
from ._machine_io import Left, Phase
from ._settings import DetachSettings
from ._unplug_calls import UnplugCalls

__all__ = ["LEFT", "Following"]

LEFT = Left()


class Following(UnplugCalls):
    """An unplug's followers (`aiodetach._unplug.Unplug` is one)."""

    __slots__ = ("_followers",)

    error: BaseException | None
    result: LiveDone | None

    def __init__(self, settings: DetachSettings) -> None:
        super().__init__(settings)
        # one caller's future alone (the usual case), or a list
        self._followers: asyncio.Future[LiveDone] | list[asyncio.Future[LiveDone]] | None = None

    def follow(self) -> asyncio.Future[LiveDone]:
        """A future of the caller's own that gets how the unplug ended; hand
        it back to `unfollow()`."""
        mine: asyncio.Future[LiveDone] = self._registry.loop.create_future()
        if self.phase is Phase.DONE:
            # Over already: a caller sharing an unplug that removed the device
            # between its read and its join (see aiodetach._recent), or one
            # whose join ended it (an idle unplug with every attempt used).
            settle(mine, self.error, self.result)
        elif self._followers is None:
            self._followers = mine  # no list for the one caller most unplugs have
        elif isinstance(self._followers, list):
            self._followers.append(mine)
        else:
            self._followers = [self._followers, mine]
        return mine

    def unfollow(self, mine: asyncio.Future[LiveDone], exc: BaseException | None = None) -> None:
        """The caller stopped waiting: its result, or ``exc`` (its error or its
        cancellation, see `Registry.untold()`)."""
        if exc is not None:
            self._registry.untold(self, mine, exc)
        followers = self._followers
        if followers is mine:
            self._followers = None
        elif isinstance(followers, list) and mine in followers:
            followers.remove(mine)
        elif self.phase is not Phase.DONE:
            return  # cancelled, and already counted as gone by `swept()`
        self._feed(LEFT)

    def cancelled(self) -> int:
        """Followers cancelled that have not left yet (read from any thread:
        it changes nothing)."""
        followers = self._followers
        if isinstance(followers, list):
            return sum(1 for mine in tuple(followers) if mine.cancelled())
        return int(followers is not None and followers.cancelled())

    def swept(self) -> int:
        """Drop the followers cancelled before their `unfollow()`; how many
        (loop thread, before the machine decides anything)."""
        followers = self._followers
        if isinstance(followers, list):
            gone = self.cancelled()
            if gone:  # rare: no new list on every input of an unplug many follow
                self._followers = [mine for mine in followers if not mine.cancelled()]
            return gone
        if followers is not None and followers.cancelled():
            self._followers = None
            return 1
        return 0
