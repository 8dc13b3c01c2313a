"""A host that registered libvirt's event implementation first keeps it, and
services work with it: libvirtaio on the service's loop (made safe for the
worker threads' hook calls), or libvirt's default implementation run by a host
thread (callbacks handed to the service's loop).  What cannot work is refused
with a message that says what to do.

Each case in a new interpreter under ``-X dev`` (asyncio's debug mode rejects
loop calls from other threads): an implementation is registered once per
process.  The events are those of libvirt's own test driver: destroying its
domain from a worker thread, on the service's connection, as a blocking call
would.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from _probes import fresh_python

HERE = os.path.dirname(__file__)
PRELUDE = f"""
import asyncio, sys, threading
import libvirt, libvirtaio
sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
import aiodetach
from aiodetach.errors import EventLoopConflict
from _destroyed_domain import stopped_event_of_a_destroyed_domain
libvirt.registerErrorHandler(lambda _c, _e: None, None)
URI = "test:///default"
"""


def _run(body: str) -> list[str]:
    proc = fresh_python(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
    return proc.stdout.splitlines()


def test_the_hosts_libvirtaio_on_the_same_loop_is_kept_and_events_arrive() -> None:
    out = _run(
        """
        async def main():
            host = libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            for _ in range(2):
                print(await stopped_event_of_a_destroyed_domain(URI))
            print("kept", libvirtaio.getCurrentImpl() is host)
            # The host's own timers still run on its loop, also added off-thread.
            fired = asyncio.Event(); loop = asyncio.get_running_loop(); where = []
            def tick(timer, _o):
                where.append(threading.get_ident() == threading.main_thread().ident)
                libvirt.virEventRemoveTimeout(timer)
                fired.set()
            await asyncio.to_thread(libvirt.virEventAddTimeout, 0, tick, None)
            async with asyncio.timeout(5):
                await fired.wait()
            print("tick on the loop thread", where)
        asyncio.run(main())
        """
    )
    assert out == [
        "('domain-stopped', 'destroyed')",
        "('domain-stopped', 'destroyed')",
        "kept True",
        "tick on the loop thread [True]",
    ]


@pytest.mark.parametrize("hold", [0.3, 1.3])
def test_a_timer_added_off_thread_and_removed_by_its_callback_stops(hold: float) -> None:
    """libvirtaio keeps the timer's task only once its add returns in the
    asking thread: a task started before that (the loop is free, the asking
    thread descheduled) could fire and remove its timer while libvirtaio saw
    no task to cancel, and the timer then fired on every loop iteration for
    good (once in four runs of the fast tiers beside other work).  Here the
    asking thread is held right there, and past 1 s a warning says so."""
    out = _run(
        f"""
        import logging, time
        logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
        real = libvirtaio.asyncio
        class HeldAfterEnsureFuture:
            def __getattr__(self, name):
                return getattr(real, name)
            @staticmethod
            def ensure_future(coro, *, loop=None):
                task = real.ensure_future(coro, loop=loop)
                if threading.current_thread() is not threading.main_thread():
                    time.sleep({hold})  # before libvirtaio keeps ``task``
                return task
        async def main():
            libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            print(await stopped_event_of_a_destroyed_domain(URI))  # the guard is in place
            libvirtaio.asyncio = HeldAfterEnsureFuture()
            fired = asyncio.Event(); ticks = []
            def tick(timer, _o):
                ticks.append(libvirt.virEventRemoveTimeout(timer))
                fired.set()
            await asyncio.to_thread(libvirt.virEventAddTimeout, 0, tick, None)
            libvirtaio.asyncio = real
            async with asyncio.timeout(5):
                await fired.wait()
            for _ in range(50):
                await asyncio.sleep(0)
            await asyncio.sleep(0.1)
            print("removed by its one tick", ticks)
        asyncio.run(main())
        """
    )
    slow = [line for line in out if line.startswith("aiodetach.libvirtaio_call_slow ")]
    rest = [line for line in out if line not in slow]
    assert rest == ["('domain-stopped', 'destroyed')", "removed by its one tick [0]"]
    assert len(slow) == (1 if hold > 1 else 0), out


def test_the_hosts_libvirtaio_on_another_running_loop_is_refused() -> None:
    out = _run(
        """
        started = threading.Event(); stop = threading.Event()
        def host_loop():
            async def run():
                libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
            asyncio.run(run())
        th = threading.Thread(target=host_loop); th.start(); started.wait(10)
        async def mine():
            try:
                async with aiodetach.DetachService(URI):
                    return "opened"
            except EventLoopConflict as exc:
                return f"conflict: {exc}"
        print(asyncio.run(mine()))
        stop.set(); th.join()
        """
    )
    assert len(out) == 1
    assert out[0].startswith("conflict: "), out
    assert "is still running" in out[0]
    assert "run_coroutine_threadsafe" in out[0]


def test_the_default_implementation_in_a_host_thread_delivers_to_the_services_loop() -> None:
    out = _run(
        """
        libvirt.virEventRegisterDefaultImpl()
        def run_default():
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=run_default, daemon=True).start()
        for _ in range(2):  # two loops one after the other
            print(asyncio.run(stopped_event_of_a_destroyed_domain(URI)))
        print("libvirtaio untouched", libvirtaio.getCurrentImpl() is None)
        """
    )
    assert out == [
        "('domain-stopped', 'destroyed')",
        "('domain-stopped', 'destroyed')",
        "libvirtaio untouched True",
    ]


def test_a_registered_implementation_that_nothing_runs_is_refused() -> None:
    out = _run(
        """
        import aiodetach._eventloop_host as host
        host.RUNNING_CHECK = 0.5  # a due timer fires in microseconds when it runs
        libvirt.virEventRegisterDefaultImpl()  # and no thread runs it
        async def mine():
            try:
                async with aiodetach.DetachService(URI):
                    return "opened"
            except EventLoopConflict as exc:
                return f"conflict: {exc}"
        print(asyncio.run(mine()))
        """
    )
    assert len(out) == 1
    assert out[0].startswith("conflict: "), out
    assert "virEventRunDefaultImpl()" in out[0]
