"""A host's libvirtaio instance with its ``loop`` guarded (what a service does
to it) takes hook calls from worker threads: watches and timers added there
run on the loop thread, in the order the calls were made, and a timer stopped
from a worker thread before the loop got to it never fires.

The instance is not registered with libvirt (registration is once per
process): its hooks are called directly, as libvirt would from a worker
thread.  In debug mode asyncio rejects loop calls from other threads, so an
unguarded call fails these tests.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import libvirt
import libvirtaio
import pytest

from aiodetach._eventloop_host import HostAsyncIO

READABLE = libvirt.VIR_EVENT_HANDLE_READABLE


async def test_a_watch_added_from_a_worker_thread_fires_on_the_loop_thread() -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)  # loop calls from another thread raise
    impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
    HostAsyncIO(impl).bind(loop)
    left, right = socket.socketpair()
    fired = asyncio.Event()
    threads: list[int] = []

    def on_readable(_watch: int, _fd: int, _events: int, _opaque: object) -> None:
        threads.append(threading.get_ident())
        left.recv(16)
        fired.set()

    try:
        watch = await asyncio.to_thread(impl._add_handle, left.fileno(), READABLE, on_readable, 1)
        right.send(b"x")
        async with asyncio.timeout(10):
            await fired.wait()
        await asyncio.to_thread(impl._update_handle, watch, 0)  # stop watching, off-thread
        await asyncio.to_thread(impl._update_handle, watch, READABLE)  # and again
        right.send(b"y")
        fired.clear()
        async with asyncio.timeout(10):
            await fired.wait()
    finally:
        impl.callbacks.clear()
        impl.descriptors.clear()
        loop.remove_reader(left.fileno())
        left.close()
        right.close()
    assert threads == [threading.get_ident()] * 2


async def test_a_timer_started_and_stopped_off_thread_before_the_loop_ran_never_fires() -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)  # loop calls from another thread raise
    impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
    HostAsyncIO(impl).bind(loop)
    ticks: list[int] = []
    late = asyncio.Event()

    def stopped(_timer: int, _opaque: object) -> None:
        ticks.append(0)

    def other(timer: int, _opaque: object) -> None:
        ticks.append(1)
        impl._update_timeout(timer, -1)  # on the loop thread: at once
        late.set()

    def off_thread() -> None:
        # Both before the loop applies anything: start, stop, start another.
        first = impl._add_timeout(0, stopped, None)
        impl._update_timeout(first, -1)
        impl._add_timeout(0, other, None)

    # The loop is held while the worker makes its three calls, so that nothing
    # is applied before all three are queued: with the loop free, it could
    # start the first timer before the worker stopped it, and a timer started
    # with timeout 0 rightly ticks until it is stopped (seen 1 in 15 under load).
    worker = threading.Thread(target=off_thread)
    worker.start()
    worker.join()
    async with asyncio.timeout(10):
        await late.wait()
    for _ in range(5):  # a wrongly started first timer would tick by now
        await asyncio.sleep(0)
    assert ticks == [1]
    impl.callbacks.clear()


async def test_a_free_callback_asked_for_off_thread_runs_while_its_thread_is_still_inside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a timer's task waits for its asking thread to leave libvirtaio
    (libvirtaio keeps that task once the call returns): a free-callback's task
    starts at once, so a closing service's settle() finds none pending
    (under load, one held back made a test see ``_pending == 1``)."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
    host = HostAsyncIO(impl).bind(loop)
    real = libvirtaio.asyncio  # type: ignore[attr-defined]
    inside = threading.Event()
    leave = threading.Event()
    freed: list[int] = []

    class HeldInside:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        @staticmethod
        def ensure_future(coro: Any, *, loop: Any = None) -> Any:
            task = real.ensure_future(coro, loop=loop)
            inside.set()
            leave.wait(10)  # still inside schedule_ff_callback
            return task

    async def ff_callback(iden: int, _opaque: object) -> None:
        freed.append(iden)

    monkeypatch.setattr(libvirtaio, "asyncio", HeldInside())
    monkeypatch.setattr(impl, "_ff_callback", ff_callback)
    worker = threading.Thread(target=impl.schedule_ff_callback, args=(7, None))
    worker.start()
    try:
        assert await asyncio.to_thread(inside.wait, 10)
        await host.settle()
        for _ in range(10):
            await asyncio.sleep(0)
        assert freed == [7]
    finally:
        leave.set()
        await asyncio.to_thread(worker.join, 10)
