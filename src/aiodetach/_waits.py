"""`shielded_within()`: wait for a future at most so long, never cancelling it.

``asyncio.wait_for(asyncio.shield(future), limit)`` says the same, but on
Python 3.11 ``wait_for`` loses its caller's cancellation when that comes in
the loop step the awaited future completes: it returns the result instead
(CPython gh-86296; 3.12 rebuilt ``wait_for`` on ``asyncio.timeout``).  A
Ctrl-C that landed as the connection opened was lost that way, and
``aiodetach watch`` then watched on.  ``asyncio.timeout`` tells its own
expiry from a cancellation from outside on every supported Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["shielded_within"]

_T = TypeVar("_T")


async def shielded_within(future: Awaitable[_T], limit: float) -> _T:
    """``future``'s result; `TimeoutError` after ``limit`` seconds, with the
    future left running (shielded); the caller's cancellation always raised."""
    async with asyncio.timeout(limit):
        return await asyncio.shield(future)
