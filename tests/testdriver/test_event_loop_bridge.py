"""The event-loop bridge (``aiodetach.install_event_loop``) on libvirt's test driver.

What aiodetach takes from :mod:`libvirtaio` beyond its public function is
checked first, by name; then libvirt itself drives the bridge: handles and
timers added through libvirt's public ``virEventAdd*`` API (which calls the
registered implementation, from the loop thread and from worker threads),
and the lifecycle events of a real libvirt driver reaching a
:class:`DetachService` through its own :class:`LibvirtBackend`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import textwrap
import threading

import libvirt
import libvirtaio
import pytest

from _probes import fresh_python
from aiodetach import DetachService, DetachSettings, install_event_loop
from aiodetach.errors import DetachRefused

from ._destroyed_domain import stopped_event_of_a_destroyed_domain

HOOKS = (
    "_add_handle",
    "_update_handle",
    "_remove_handle",
    "_add_timeout",
    "_update_timeout",
    "_remove_timeout",
    "register",
)


def test_libvirtaio_still_has_what_aiodetach_builds_on() -> None:
    impl = libvirtaio.virEventAsyncIOImpl
    for name in HOOKS:
        assert callable(getattr(impl, name, None)), f"libvirtaio.virEventAsyncIOImpl.{name}"
    assert "loop" in inspect.signature(impl.__init__).parameters
    assert hasattr(libvirtaio, "_current_impl")
    assert callable(libvirtaio.getCurrentImpl)
    assert isinstance(libvirtaio.TimeoutCallback, type)
    # The timer's coroutine, whose task libvirtaio keeps (aiodetach._eventloop_host).
    assert inspect.iscoroutinefunction(libvirtaio.TimeoutCallback._timer)


async def test_handles_and_timers_added_through_libvirt_fire_on_the_loop() -> None:
    install_event_loop()
    loop_thread = threading.get_ident()
    fired: list[tuple[str, int]] = []
    readable = asyncio.Event()
    timed_out = asyncio.Event()
    left, right = socket.socketpair()
    try:

        def on_readable(watch: int, fd: int, events: int, _opaque: object) -> None:
            fired.append(("handle", threading.get_ident()))
            left.recv(16)
            readable.set()

        def on_timeout(timer: int, _opaque: object) -> None:
            fired.append(("timer", threading.get_ident()))
            libvirt.virEventUpdateTimeout(timer, -1)
            timed_out.set()

        watch = libvirt.virEventAddHandle(
            left.fileno(), libvirt.VIR_EVENT_HANDLE_READABLE, on_readable, None
        )
        # Added from a worker thread: queued and applied on the loop thread.
        timer = await asyncio.to_thread(libvirt.virEventAddTimeout, 10, on_timeout, None)
        right.send(b"x")
        async with asyncio.timeout(5):
            await readable.wait()
            await timed_out.wait()
        assert libvirt.virEventRemoveHandle(watch) == 0
        assert await asyncio.to_thread(libvirt.virEventRemoveTimeout, timer) == 0
    finally:
        left.close()
        right.close()
    assert {kind for kind, _ in fired} == {"handle", "timer"}
    assert all(thread == loop_thread for _, thread in fired)


async def test_lifecycle_events_of_a_real_driver_reach_the_service(test_uri: str) -> None:
    assert await stopped_event_of_a_destroyed_domain(test_uri) == ("domain-stopped", "destroyed")


def test_events_on_several_loops_one_after_another(test_uri: str) -> None:
    for _ in range(3):
        assert asyncio.run(stopped_event_of_a_destroyed_domain(test_uri)) == (
            "domain-stopped",
            "destroyed",
        )


async def test_a_libvirt_error_comes_back_typed(test_uri: str) -> None:
    # The test driver cannot detach devices: a real libvirt error, mapped.
    settings = DetachSettings(attempts=1, timeout=1)
    async with DetachService(test_uri, settings=settings) as svc:
        with pytest.raises(DetachRefused) as info:
            await svc.detach("test", target="vda")
    assert info.value.libvirt_code == libvirt.VIR_ERR_NO_SUPPORT
    assert info.value.domain == "test"


def test_never_relies_on_asyncio_get_event_loop(test_uri: str) -> None:
    """libvirtaio calls ``asyncio.get_event_loop()`` when it is given no loop,
    which Python 3.14 no longer allows outside a running loop: aiodetach always
    passes the running loop.  In a fresh process (the bridge is installed once
    per process) with ``get_event_loop`` made to follow 3.14's rule and fail
    loudly outside a running loop, the whole path runs."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {os.path.dirname(os.path.dirname(__file__))!r}]

        def as_in_python_3_14():
            # 3.14's rule: the running loop, or an error (never a new loop).
            try:
                return asyncio.get_running_loop()
            except RuntimeError:
                raise AssertionError("asyncio.get_event_loop() outside a running loop")

        asyncio.get_event_loop = as_in_python_3_14
        asyncio.events.get_event_loop = as_in_python_3_14
        from _destroyed_domain import stopped_event_of_a_destroyed_domain

        for _ in range(2):
            print(asyncio.run(stopped_event_of_a_destroyed_domain({test_uri!r})))
        """
    )
    proc = fresh_python(script)
    results = [line for line in proc.stdout.splitlines() if line.startswith("(")]
    assert results == ["('domain-stopped', 'destroyed')"] * 2, proc.stdout
