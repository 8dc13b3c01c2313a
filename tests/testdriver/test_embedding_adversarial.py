"""Embedding aiodetach the way an agent would, trying to break what the docs
promise (docs/instrumentation.md "Logging", docs/event-loops.md): the host's
``logging`` governs every record the library makes, a host-registered
libvirtaio that cannot serve a later loop is refused with a message that fits,
and a service's libvirt errors on a connection the caller gave go where the
caller's own errors on it go.

Each case in a new interpreter: logging's configuration, libvirt's error
handler and its event implementation are process-wide, and the test-driver
tier registers a handler of its own.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from _probes import fresh_python

HERE = os.path.dirname(__file__)


def _python(code: str) -> tuple[str, str]:
    done = fresh_python(textwrap.dedent(code))
    return done.stdout, done.stderr


def test_the_libvirt_event_implementation_aiodetach_registers_logs_under_aiodetach() -> None:
    # A host that logs DEBUG for itself and keeps aiodetach at WARNING must get
    # no DEBUG record from the library: libvirtaio names its logger after the
    # class, and aiodetach's subclass of it logged as "_ThreadSafeImpl", a
    # top-level logger outside the ``aiodetach`` hierarchy the docs promise.
    out, _ = _python(
        """
        import asyncio, json, logging
        from aiodetach import DetachService
        from aiodetach.errors import DetachError

        names = set()
        class Names(logging.Handler):
            def emit(self, record):
                names.add(record.name)
        logging.basicConfig(level=logging.DEBUG, handlers=[Names()])
        logging.getLogger("aiodetach").setLevel(logging.WARNING)

        async def main():
            async with DetachService("test:///default") as svc:
                try:
                    await svc.detach("test", alias="no-such-alias")
                except DetachError:
                    pass
        asyncio.run(main())
        print(json.dumps(sorted(names - {"asyncio"})))
        """
    )
    assert json.loads(out) == []


def test_a_hosts_libvirtaio_whose_loop_ended_is_refused_saying_that_it_ended() -> None:
    # A second asyncio.run after the host registered libvirtaio on the first:
    # the message must not send the caller to "open the service on that loop"
    # (it is closed) nor promise a registration by aiodetach (libvirt takes one
    # per process, and the host's is already in).
    out, _ = _python(
        """
        import asyncio, json, libvirt, libvirtaio
        from aiodetach import DetachService
        from aiodetach.errors import EventLoopConflict

        async def first():
            libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            async with DetachService("test:///default"):
                pass
        async def second():
            try:
                async with DetachService("test:///default"):
                    return "opened"
            except EventLoopConflict as exc:
                return str(exc)
        asyncio.run(first())
        print(json.dumps(asyncio.run(second())))
        """
    )
    message = json.loads(out)
    assert "has ended" in message, message
    assert "open the service on that loop" not in message, message
    assert "one asyncio.run" in message, message
    assert "install_event_loop()" in message, message


def test_a_services_errors_on_the_callers_connection_go_where_the_callers_go() -> None:
    # docs/event-loops.md: aiodetach silences only the connections it opens;
    # on a connection the caller gave, its failed calls are reported to the
    # process's handler, as the caller's own calls on it are.
    out, err = _python(
        """
        import asyncio, json, libvirt, aiodetach
        from aiodetach import DetachService
        from aiodetach.errors import DetachError

        seen = []
        libvirt.registerErrorHandler(lambda _ctx, e: seen.append(e[2]), None)

        async def main():
            aiodetach.install_event_loop()
            conn = libvirt.open("test:///default")
            async with DetachService(connection=conn) as svc:
                try:
                    await svc.detach("no-such-domain", alias="ua-disk1")
                except DetachError as exc:
                    raised = type(exc).__name__
            conn.close()
            return raised
        raised = asyncio.run(main())
        print(json.dumps({"raised": raised, "seen": seen}))
        """
    )
    result = json.loads(out)
    assert result["raised"] == "DomainNotFound"
    assert result["seen"] == ["Domain not found"], result
    assert err == ""


def test_the_hosts_libvirtaio_serves_two_services_at_once_and_one_opened_after_a_close() -> None:
    # Held when tried: the guard on the host's loop is made once and shared,
    # and nothing the services' failed calls leave reaches stderr.
    out, err = _python(
        f"""
        import asyncio, json, sys, libvirtaio
        sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
        from aiodetach import DetachService
        from aiodetach.errors import DetachError
        from _destroyed_domain import stopped_event_of_a_destroyed_domain

        async def failing(svc):
            try:
                await svc.detach("test", alias="no-such-alias")
            except DetachError as exc:
                return type(exc).__name__

        async def main():
            host = libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            seen = []
            async with DetachService("test:///default") as a, DetachService("test:///default") as b:
                seen += [await failing(a), await failing(b)]
            seen.append(await stopped_event_of_a_destroyed_domain("test:///default"))
            seen.append(libvirtaio.getCurrentImpl() is host)
            return seen
        print(json.dumps(asyncio.run(main())))
        """
    )
    assert json.loads(out) == [
        "DeviceNotFound",
        "DeviceNotFound",
        ["domain-stopped", "destroyed"],
        True,
    ]
    assert err == ""


def test_the_hosts_libvirtaio_registered_with_its_register_method_is_kept_and_guarded() -> None:
    # ``virEventAsyncIOImpl(loop=…).register()`` registers libvirtaio as much as
    # ``virEventRegisterAsyncIOImpl()`` does, but libvirtaio.getCurrentImpl()
    # stays None.  aiodetach took it for "another implementation run by a host
    # thread", so worker threads called the host's libvirtaio directly: asyncio
    # (debug mode) refused, and the service's events never arrived.
    out, err = _python(
        f"""
        import asyncio, json, sys, libvirtaio
        sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
        from _destroyed_domain import stopped_event_of_a_destroyed_domain

        async def main():
            loop = asyncio.get_running_loop()
            host = libvirtaio.virEventAsyncIOImpl(loop=loop).register()
            seen = [await stopped_event_of_a_destroyed_domain("test:///default")
                    for _ in range(2)]
            seen.append(host.loop.loop is loop)  # the guard of docs/event-loops.md
            seen.append(host._pending)  # the service's probe timer is freed
            return seen
        print(json.dumps(asyncio.run(main())))
        """
    )
    assert json.loads(out) == [
        ["domain-stopped", "destroyed"],
        ["domain-stopped", "destroyed"],
        True,
        0,
    ]
    assert err == ""


@pytest.mark.parametrize("where", ["ended", "running in another thread"])
def test_a_register_method_libvirtaio_on_another_loop_is_refused_without_a_traceback(
    where: str,
) -> None:
    # Probing what is registered added and removed a libvirt timer; libvirtaio
    # schedules the removed timer's free-callback on its own loop, which asyncio
    # refused from this thread (or, closed, at all), and libvirt-python printed
    # each refusal's traceback to stderr before the refusal was raised.
    out, err = _python(
        f"""
        import asyncio, threading, libvirtaio
        from aiodetach import DetachService
        from aiodetach.errors import EventLoopConflict

        async def service():
            try:
                async with DetachService("test:///default"):
                    return "opened"
            except EventLoopConflict as exc:
                return str(exc)

        if {where!r} == "ended":
            async def host():
                libvirtaio.virEventAsyncIOImpl(loop=asyncio.get_running_loop()).register()
            asyncio.run(host())
            print(asyncio.run(service()))
        else:
            started, stop = threading.Event(), threading.Event()
            async def host():
                libvirtaio.virEventAsyncIOImpl(loop=asyncio.get_running_loop()).register()
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
            thread = threading.Thread(target=asyncio.run, args=(host(),))
            thread.start()
            started.wait(30)
            print(asyncio.run(service()))
            stop.set()
            thread.join()
        """
    )
    expected = "has ended" if where == "ended" else "is still running"
    assert expected in out, out
    assert err == ""
