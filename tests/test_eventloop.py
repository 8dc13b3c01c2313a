"""The thread-safe, loop-following libvirtaio implementation, without libvirt.

The hooks are called the way libvirt calls them: from worker threads, while
the loop runs in debug mode (where touching the loop off-thread raises).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from aiodetach._eventloop import _ThreadSafeImpl

READABLE = libvirt.VIR_EVENT_HANDLE_READABLE


@pytest.fixture(autouse=True)
def _no_real_free(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our opaques are not libvirt's; do not hand them to libvirt's free hook.
    monkeypatch.setattr(libvirt, "virEventInvokeFreeCallback", lambda opaque: None)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def _in_thread(fn: Any, *args: Any) -> Any:
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(fn(*args)))
    t.start()
    await asyncio.to_thread(t.join)
    return result[0]


async def test_handle_added_from_a_thread_fires_on_the_loop(pipe: tuple[int, int]) -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    impl = _ThreadSafeImpl(loop)
    fired: list[tuple[int, bool]] = []
    got = asyncio.Event()

    def cb(watch: int, fd: int, events: int, opaque: object) -> None:
        fired.append((watch, threading.current_thread() is threading.main_thread()))
        os.read(fd, 1)
        got.set()

    r, w = pipe
    watch = await _in_thread(impl._add_handle, r, READABLE, cb, "opaque")
    assert isinstance(watch, int)
    os.write(w, b"x")
    await asyncio.wait_for(got.wait(), 2)
    assert fired == [(watch, True)]
    assert await _in_thread(impl._remove_handle, watch) == 0
    assert await _in_thread(impl._remove_handle, watch) == -1
    await impl.settle()
    assert impl.is_idle()


async def test_off_thread_hook_calls_keep_their_order(pipe: tuple[int, int]) -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    impl = _ThreadSafeImpl(loop)
    r, w = pipe
    calls: list[int] = []

    def burst() -> None:
        watch = impl._add_handle(r, READABLE, lambda *a: calls.append(1), None)
        impl._update_handle(watch, 0)
        impl._update_handle(watch, READABLE)
        impl._remove_handle(watch)

    await _in_thread(burst)
    await impl.settle()
    os.write(w, b"x")
    await asyncio.sleep(0.05)
    assert calls == [], "the handle was removed last: nothing may fire"
    assert impl.is_idle()


async def test_timer_added_from_a_thread() -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    impl = _ThreadSafeImpl(loop)
    fired = asyncio.Event()
    ticks: list[int] = []

    def cb(timer: int, opaque: object) -> None:
        ticks.append(timer)
        fired.set()

    timer = await _in_thread(impl._add_timeout, 10, cb, None)
    await asyncio.wait_for(fired.wait(), 2)
    await _in_thread(impl._update_timeout, timer, -1)
    await impl.settle()
    count = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == count, "a disabled timer must not fire"
    await _in_thread(impl._remove_timeout, timer)
    await impl.settle()
    assert impl.is_idle()


def test_watches_follow_a_new_loop(pipe: tuple[int, int]) -> None:
    r, w = pipe
    first = asyncio.new_event_loop()
    impl = _ThreadSafeImpl(first)
    hits: list[str] = []
    impl._add_handle(r, READABLE, lambda _w, fd, _e, _o: hits.append(os.read(fd, 1).decode()), None)
    impl._add_timeout(5, lambda _t, _o: hits.append("tick"), None)
    first.run_until_complete(asyncio.sleep(0.05))
    first.close()

    second = asyncio.new_event_loop()
    second.set_debug(True)

    async def on_second() -> None:
        impl.bind(asyncio.get_running_loop())
        hits.clear()
        os.write(w, b"y")
        await asyncio.sleep(0.05)

    second.run_until_complete(on_second())
    second.close()
    assert "y" in hits, "the watch must work on the new loop"
    assert "tick" in hits, "the timer must run on the new loop"


def test_foreign_libvirtaio_registration_is_reported() -> None:
    code = textwrap.dedent(
        """
        import asyncio, libvirtaio, aiodetach
        from aiodetach.errors import EventLoopConflict
        async def main():
            libvirtaio.virEventRegisterAsyncIOImpl()
            try:
                aiodetach.install_event_loop()
            except EventLoopConflict as exc:
                print("conflict:", exc)
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "conflict:" in out.stdout
    assert "install_event_loop" in out.stdout


def test_install_twice_in_a_row_and_across_loops() -> None:
    code = textwrap.dedent(
        """
        import asyncio, libvirtaio, aiodetach
        async def main():
            a = aiodetach.install_event_loop()
            b = aiodetach.install_event_loop()
            assert a is b and libvirtaio.getCurrentImpl() is a
            return a
        first = asyncio.run(main())
        second = asyncio.run(main())
        assert first is second
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
