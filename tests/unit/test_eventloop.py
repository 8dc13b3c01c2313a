"""The thread-safe, loop-following libvirtaio implementation, without libvirt
(and, in subprocesses with libvirt imported, its watches and timers across
several loops in turn).

The hooks are called the way libvirt calls them: from worker threads, while
the loop runs in debug mode (where touching the loop off-thread raises).
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from _probes import fresh_python
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


async def test_a_hook_call_made_again_while_one_is_queued_does_not_deadlock(
    pipe: tuple[int, int],
) -> None:
    """A libvirt object freed by the garbage collector in a worker thread calls
    the hooks again from inside a hook call (its ``__del__`` runs at whatever
    bytecode the thread is at).  Simulated: queueing the first call makes the
    same thread queue a second one.  Both are applied, in the order queued."""
    loop = asyncio.get_running_loop()
    impl = _ThreadSafeImpl(loop)
    r, _ = pipe
    watch = impl._add_handle(r, READABLE, lambda *a: None, None)
    await impl.settle()
    applied: list[str] = []

    class FinalizerOnAppend(collections.deque[Any]):
        def append(self, op: Any) -> None:
            if not applied:
                applied.append("outer queued")
                impl._submit(lambda: applied.append("from the finalizer"))
            super().append(op)

    impl._ops = FinalizerOnAppend(impl._ops)
    worker = threading.Thread(
        target=impl._submit, args=(lambda: applied.append("outer"),), daemon=True
    )
    worker.start()
    await asyncio.to_thread(worker.join, 5)
    assert not worker.is_alive(), "the worker thread waits on a lock it holds itself"
    await impl.settle()
    assert applied == ["outer queued", "from the finalizer", "outer"]
    impl._remove_handle(watch)
    await impl.settle()


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


def test_the_hosts_libvirtaio_registration_is_kept_not_refused() -> None:
    code = textwrap.dedent(
        """
        import asyncio, libvirtaio, aiodetach
        async def main():
            host = libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            aiodetach.install_event_loop()
            aiodetach.install_event_loop()
            assert libvirtaio.getCurrentImpl() is host
            assert host.loop.loop is asyncio.get_running_loop()  # wrapped once
            print("kept")
        asyncio.run(main())
        """
    )
    out = fresh_python(code)
    assert out.stdout.strip() == "kept"


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
    out = fresh_python(code)
    assert out.stdout.strip() == "ok"


async def test_a_failing_hook_call_does_not_strand_the_ones_queued_after_it(
    pipe: tuple[int, int],
) -> None:
    """A connect that fails in its worker thread closes its socket before the
    loop applies the watch libvirt added for it: that add fails (EBADF).  The
    timer and the watch queued behind it (the next connection's) must still
    be applied, and the dead fd must keep no callback behind."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    impl = _ThreadSafeImpl(loop)
    dead_r, dead_w = os.pipe()
    r, w = pipe
    ticked = asyncio.Event()
    readable = asyncio.Event()

    def burst() -> tuple[int, int, int]:
        dead = impl._add_handle(dead_r, READABLE, lambda *a: None, None)
        os.close(dead_r)
        os.close(dead_w)
        timer = impl._add_timeout(5, lambda _t, _o: loop.call_soon(ticked.set), None)
        watch = impl._add_handle(r, READABLE, lambda *a: loop.call_soon(readable.set), None)
        return dead, timer, watch

    # All three are queued before the loop gets to any of them: the loop
    # thread blocks (on purpose) until the burst is done.
    out: list[tuple[int, int, int]] = []
    thread = threading.Thread(target=lambda: out.append(burst()))
    thread.start()
    thread.join()
    dead, timer, watch = out[0]
    os.write(w, b"x")
    await asyncio.wait_for(ticked.wait(), 2)
    await asyncio.wait_for(readable.wait(), 2)
    assert dead_r not in dict(impl.descriptors), "the failed add left a callback behind"
    assert await _in_thread(impl._remove_handle, dead) == 0
    assert await _in_thread(impl._remove_timeout, timer) == 0
    assert await _in_thread(impl._remove_handle, watch) == 0
    await impl.settle()
    assert impl.is_idle()


async def test_a_failing_hook_call_made_on_the_loop_thread_is_contained() -> None:
    loop = asyncio.get_running_loop()
    impl = _ThreadSafeImpl(loop)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    # On the loop thread the call is applied at once; it must not raise into
    # libvirt (which called us from C) nor leave libvirtaio's books wrong.
    watch = impl._add_handle(r, READABLE, lambda *a: None, None)
    assert r not in dict(impl.descriptors)
    assert impl._remove_handle(watch) == 0
    await impl.settle()
    assert impl.is_idle()


def test_removals_queued_without_a_loop_are_applied_before_watches_move() -> None:
    """A libvirt connection closed after its loop ended: its watches' removals
    wait in the queue and its fds are closed.  The next loop must apply the
    removals first (re-watching a closed fd raises EBADF) and then work."""
    code = textwrap.dedent(
        """
        import asyncio, os, libvirt, aiodetach
        R = libvirt.VIR_EVENT_HANDLE_READABLE
        libvirt.virEventInvokeFreeCallback = lambda opaque: None
        state = {}
        async def first():
            aiodetach.install_event_loop()
            r, w = os.pipe()
            state["fds"] = (r, w)
            state["watch"] = libvirt.virEventAddHandle(r, R, lambda *a: None, None)
            state["timer"] = libvirt.virEventAddTimeout(1000, lambda *a: None, None)
            await asyncio.sleep(0.05)
        asyncio.run(first())
        # Closed with no loop running, as conn.close() after asyncio.run would.
        libvirt.virEventRemoveHandle(state["watch"])
        libvirt.virEventRemoveTimeout(state["timer"])
        for fd in state["fds"]:
            os.close(fd)
        async def second():
            aiodetach.install_event_loop()
            r, w = os.pipe()
            got = asyncio.Event()
            loop = asyncio.get_running_loop()
            libvirt.virEventAddHandle(r, R, lambda *a: loop.call_soon(got.set), None)
            os.write(w, b"x")
            await asyncio.wait_for(got.wait(), 2)
            impl = aiodetach._eventloop._impl
            await impl.settle()
            # The queued removals' free-callbacks ran on this loop and were counted.
            print("ok", impl._ff_inflight, impl._pending - len(impl.callbacks))
        asyncio.run(second())
        """
    )
    out = fresh_python(code)
    assert out.stdout.strip() == "ok 0 0"
    assert "event_hook_failed" not in out.stdout + out.stderr
    assert "never retrieved" not in out.stderr, out.stderr


async def test_a_timer_removed_from_a_thread_never_fires_again() -> None:
    """libvirt may free a timer's opaque once removal returned: a tick already
    due on the loop must not reach libvirt after that."""
    loop = asyncio.get_running_loop()
    impl = _ThreadSafeImpl(loop)
    removed = threading.Event()
    late: list[int] = []

    def cb(timer: int, opaque: object) -> None:
        if removed.is_set():
            late.append(timer)

    timer = await _in_thread(impl._add_timeout, 0, cb, None)  # fires every iteration
    await asyncio.sleep(0.05)
    # Removed from a worker thread while the loop thread waits for it.
    thread = threading.Thread(target=lambda: impl._remove_timeout(timer))
    thread.start()
    thread.join()
    removed.set()
    await asyncio.sleep(0.1)
    assert late == []
    await impl.settle()
    assert impl.is_idle()


async def test_a_watch_removed_from_a_thread_never_fires_again(pipe: tuple[int, int]) -> None:
    loop = asyncio.get_running_loop()
    impl = _ThreadSafeImpl(loop)
    removed = threading.Event()
    late: list[int] = []
    r, w = pipe

    def cb(watch: int, fd: int, events: int, opaque: object) -> None:
        if removed.is_set():
            late.append(watch)
        os.read(fd, 1)

    watch = await _in_thread(impl._add_handle, r, READABLE, cb, None)
    await asyncio.sleep(0.05)

    def remove_while_readable() -> None:
        thread = threading.Thread(target=lambda: impl._remove_handle(watch))
        thread.start()
        thread.join()
        removed.set()

    def arm() -> None:
        os.write(w, b"x")
        loop.call_soon(remove_while_readable)

    loop.call_soon(arm)
    await asyncio.sleep(0.1)
    assert late == []
    await impl.settle()
    assert impl.is_idle()


PRELUDE = """
import asyncio, os, threading, time, libvirt, aiodetach
R = libvirt.VIR_EVENT_HANDLE_READABLE
libvirt.virEventInvokeFreeCallback = lambda opaque: None
def in_thread(fn, *a):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*a))); t.start(); t.join()
    return out[0]
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_watches_and_timers_changed_between_loops_follow_every_new_loop() -> None:
    """A timer disabled and another added from threads while no loop runs;
    three loops in a row; everything removed with no loop; then a fourth."""
    out = _run(
        """
        hits = []
        r, w = os.pipe()
        state = {}
        async def first():
            aiodetach.install_event_loop()
            state["watch"] = in_thread(
                libvirt.virEventAddHandle, r, R,
                lambda wt, fd, ev, o: hits.append(os.read(fd, 1)), None)
            state["timer"] = in_thread(
                libvirt.virEventAddTimeout, 20, lambda t, o: hits.append("tick"), None)
            await asyncio.sleep(0.1)
        asyncio.run(first())
        assert "tick" in hits
        in_thread(libvirt.virEventUpdateTimeout, state["timer"], -1)
        t2 = in_thread(libvirt.virEventAddTimeout, 10, lambda t, o: hits.append("tick2"), None)
        for n in range(3):
            hits.clear()
            async def again():
                aiodetach.install_event_loop()
                os.write(w, b"z")
                await asyncio.sleep(0.15)
            asyncio.run(again())
            assert b"z" in hits, (n, hits)
            assert "tick" not in hits, (n, hits)
            assert "tick2" in hits, (n, hits)
        in_thread(libvirt.virEventRemoveHandle, state["watch"])
        in_thread(libvirt.virEventRemoveTimeout, state["timer"])
        in_thread(libvirt.virEventRemoveTimeout, t2)
        os.close(r); os.close(w)
        async def last():
            impl = aiodetach.install_event_loop()
            await impl.settle()
            hits.clear()
            await asyncio.sleep(0.1)
            assert hits == [], hits
            assert impl.is_idle(), impl
        asyncio.run(last())
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert "event_hook_failed" not in out.stdout + out.stderr, out.stdout[-2000:]


def test_a_second_loop_running_at_once_is_a_conflict_and_works_after_the_first_ends() -> None:
    out = _run(
        """
        started = threading.Event(); stop = threading.Event()
        def other():
            async def m():
                aiodetach.install_event_loop()
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
            asyncio.run(m())
        th = threading.Thread(target=other); th.start(); started.wait(5)
        async def mine():
            try:
                aiodetach.install_event_loop()
            except aiodetach.errors.EventLoopConflict:
                return "conflict"
            return "no conflict"
        print(asyncio.run(mine()))
        stop.set(); th.join()
        r, w = os.pipe()
        async def after():
            aiodetach.install_event_loop()
            got = asyncio.Event(); loop = asyncio.get_running_loop()
            in_thread(libvirt.virEventAddHandle, r, R, lambda *a: loop.call_soon(got.set), None)
            os.write(w, b"x")
            await asyncio.wait_for(got.wait(), 2)
            return "after ok"
        print(asyncio.run(after()))
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["conflict", "after ok"], out.stdout[-800:]


def test_a_watch_on_an_fd_closed_between_loops_strands_no_other_watch() -> None:
    """An fd closed between loops whose watch libvirt has not removed yet: the
    next loop still serves the other watches, and the late removal works."""
    out = _run(
        """
        state = {}
        async def first():
            aiodetach.install_event_loop()
            r, w = os.pipe()
            state["fds"] = (r, w)
            state["watch"] = in_thread(libvirt.virEventAddHandle, r, R, lambda *a: None, None)
            await asyncio.sleep(0.05)
        asyncio.run(first())
        for fd in state["fds"]:
            os.close(fd)
        async def second():
            aiodetach.install_event_loop()
            r, w = os.pipe()
            got = asyncio.Event(); loop = asyncio.get_running_loop()
            in_thread(libvirt.virEventAddHandle, r, R, lambda *a: loop.call_soon(got.set), None)
            os.write(w, b"x")
            await asyncio.wait_for(got.wait(), 2)
            assert in_thread(libvirt.virEventRemoveHandle, state["watch"]) == 0
            await asyncio.sleep(0.05)
            print("ok")
        asyncio.run(second())
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
