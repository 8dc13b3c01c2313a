"""Real detaches inside a host process that set things up its own way: the
host's ``logging`` decides what the library's events do (nothing on stdout or
stderr at WARNING), and the libvirt event implementation the host registered
first (libvirtaio on its loop, or libvirt's default one run by a host thread)
carries the DEVICE_REMOVED that completes the detach.

Each in a new interpreter: logging, structlog and libvirt's event
implementation are process-wide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from _probes import child_env, without_slow_steps

DETACH = """
import asyncio, sys, threading
import libvirt, libvirtaio
from aiodetach import DetachService, DetachSettings
from aiodetach_lab import domains as _lab

URI = sys.argv[1]

async def detach(name):
    async with DetachService(URI, settings=DetachSettings(timeout=20.0)) as svc:
        return await svc.detach(name, alias="ua-s1")

def run(coro_fn):
    with _lab.throwaway_domain(URI, disks=[_lab.DiskSpec("sda", "scsi", "ua-s1")]) as dom:
        return coro_fn(dom.name)
"""


def _run(uri: str, body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(DETACH) + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code, uri],
        capture_output=True,
        text=True,
        timeout=180,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return without_slow_steps(done)


def test_a_real_detach_prints_nothing_when_the_host_logs_warnings_only(libvirtd: str) -> None:
    done = _run(
        libvirtd,
        """
        import logging
        logging.basicConfig(level=logging.WARNING)
        result = run(lambda name: asyncio.run(detach(name)))
        assert result.live and result.persistent, result
        """,
    )
    assert done.stdout == ""
    assert done.stderr == ""


def test_a_real_detach_logs_through_the_hosts_logging(libvirtd: str) -> None:
    done = _run(
        libvirtd,
        """
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
        run(lambda name: asyncio.run(detach(name)))
        """,
    )
    lines = done.stdout.splitlines()
    assert any(ln.startswith("aiodetach aiodetach.detach_sent ") for ln in lines), lines
    detached = [ln for ln in lines if ln.startswith("aiodetach aiodetach.detached ")]
    assert len(detached) == 1, lines
    assert "alias=ua-s1" in detached[0]
    assert "confirmed_by=event" in detached[0]
    assert "<domain" not in done.stdout
    assert done.stderr == ""


def test_a_real_detach_with_the_hosts_libvirtaio_registered_first(libvirtd: str) -> None:
    done = _run(
        libvirtd,
        """
        async def host_app(name):
            host = libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
            result = await detach(name)
            assert libvirtaio.getCurrentImpl() is host
            return result
        print(run(lambda name: asyncio.run(host_app(name))).confirmed_by)
        """,
    )
    assert done.stdout.splitlines() == ["event"], done.stderr[-2000:]


def test_a_real_detach_with_the_default_implementation_in_a_host_thread(libvirtd: str) -> None:
    done = _run(
        libvirtd,
        """
        libvirt.virEventRegisterDefaultImpl()
        def run_default():
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=run_default, daemon=True).start()
        print(run(lambda name: asyncio.run(detach(name))).confirmed_by)
        print(libvirtaio.getCurrentImpl() is None)
        """,
    )
    assert done.stdout.splitlines() == ["event", "True"], done.stderr[-2000:]


def test_the_hosts_libvirt_error_handler_sees_its_errors_and_none_of_the_services(
    libvirtd: str,
) -> None:
    # No lab domain here: the lab registers a handler of its own.
    done = _run(
        libvirtd,
        """
        from aiodetach.errors import DomainNotFound
        seen = []
        libvirt.registerErrorHandler(lambda _ctx, err: seen.append(err[2]), None)
        async def host_app():
            async with DetachService(URI) as svc:
                try:
                    await svc.detach("aiodetach-no-such-domain", alias="ua-s1")
                except DomainNotFound:
                    print("DomainNotFound")
                conn = libvirt.open(URI)  # the host's own connection and call
                try:
                    conn.lookupByName("host-looks-for-this")
                except libvirt.libvirtError:
                    pass
                conn.close()
        asyncio.run(host_app())
        print(len(seen), "host-looks-for-this" in seen[0])
        """,
    )
    assert done.stdout.splitlines() == ["DomainNotFound", "1 True"]
    assert done.stderr == ""
