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

from _probes import fresh_python

HERE = os.path.dirname(__file__)
PRELUDE = f"""
import asyncio, sys, threading
import libvirt, libvirtaio
sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
import aiodetach
from aiodetach.errors import EventLoopConflict
from test_event_loop_bridge import _stopped_event_of_a_destroyed_domain
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
                print(await _stopped_event_of_a_destroyed_domain(URI))
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
            print(asyncio.run(_stopped_event_of_a_destroyed_domain(URI)))
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
