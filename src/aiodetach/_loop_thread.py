"""The one event loop thread every open blocking facade runs its service on.

Why one for the whole process: libvirt's event implementation is bound to one
running loop (docs/event-loops.md), so facades on loops of their own could not
all get their events.  It starts with the first facade and stops with the
last one's close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """The event loop every open facade runs its service on, in one daemon
    thread: started by the first facade, stopped by the last one's close."""

    _current: LoopThread | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.users = 0
        self.thread = threading.Thread(target=self._run, name="aiodetach-blocking", daemon=True)
        self.thread.start()

    @classmethod
    def acquire(cls) -> LoopThread:
        with cls._guard:
            runner = cls._current
            if runner is None:
                runner = cls._current = LoopThread()
            runner.users += 1
            return runner

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def release(self) -> None:
        """One facade fewer; the last one stops the loop (its thread then ends)."""
        with self._guard:
            self.users -= 1
            if self.users == 0:
                if type(self)._current is self:
                    type(self)._current = None
                self.loop.call_soon_threadsafe(self.loop.stop)

    def join(self, timeout: float | None) -> None:
        """Wait for the thread to end, if the last facade let go of it."""
        with self._guard:
            ending = self.users == 0
        if ending and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)  # this thread's own: nothing process-wide
        try:
            while True:
                try:
                    self.loop.run_forever()
                except (KeyboardInterrupt, SystemExit):
                    # Raised by a hook (no signal reaches this thread): asyncio
                    # lets it out of the task, which holds it for its caller,
                    # and out of the loop.  The caller's thread gets it, as an
                    # awaiting caller does; the loop serves everyone else on.
                    continue
                break
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            self.loop.close()
