"""`aiodetach._waits.shielded_within()`: a bounded wait that never loses its
caller's cancellation (3.11's ``asyncio.wait_for`` returned the result when
the cancellation came in the step the future completed; ``aiodetach watch``
then ignored a Ctrl-C that landed as its connection opened)."""

from __future__ import annotations

import asyncio

import pytest

from aiodetach._waits import shielded_within


@pytest.mark.parametrize("steps", range(4))
async def test_a_cancellation_as_the_future_completes_is_raised(steps: int) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    task = asyncio.create_task(shielded_within(future, 5))
    for _ in range(3):
        await asyncio.sleep(0)  # the task waits
    future.set_result("done")
    for _ in range(steps):
        await asyncio.sleep(0)
    if task.done():
        assert task.result() == "done"  # it had its result before the cancellation
        return
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert future.result() == "done"


async def test_the_limit_raises_timeout_and_leaves_the_future_running() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await shielded_within(future, 0.01)
    assert not future.cancelled()
    future.set_result("late")


async def test_a_cancellation_leaves_the_future_running() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(shielded_within(future, 5))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not future.cancelled()
