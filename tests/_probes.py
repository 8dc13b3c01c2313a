"""Helpers shared by tests in several directories."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class LoopLag:
    """The worst oversleep of a task that sleeps ``tick`` seconds in a loop."""

    def __init__(self) -> None:
        self.worst = 0.0


@asynccontextmanager
async def loop_lag(tick: float = 0.005) -> AsyncIterator[LoopLag]:
    """Measure how long the event loop was kept from running, while inside."""
    lag = LoopLag()
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(tick)
            lag.worst = max(lag.worst, loop.time() - t - tick)

    task = asyncio.create_task(ticker())
    try:
        yield lag
    finally:
        stop.set()
        await task
