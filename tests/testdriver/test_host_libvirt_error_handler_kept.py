"""aiodetach leaves libvirt's process-wide error handler as the host set it.

libvirt reports every failed call to the error handler; with none registered
its default one prints ``libvirt: <domain> error : <message>`` to stderr (the
second case below measures that).  A service keeps *its own* connections'
errors off stderr and off the host's handler (it raises them), and the host's
handler still sees the errors of the host's own calls.

In a new interpreter each: the handler and the event implementation are
process-wide, and the test-driver tier registers a handler of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from _probes import child_env, fresh_python

SCRIPT = """
import asyncio, json, sys
import libvirt
from aiodetach import DetachService
from aiodetach.errors import DetachError

seen = []
if {register}:
    libvirt.registerErrorHandler(lambda ctx, err: seen.append(err[2]), None)

async def main():
    async with DetachService("test:///default") as svc:
        try:
            await svc.detach("no-such-domain", alias="ua-disk1")
        except DetachError as exc:
            ours = type(exc).__name__
        # The host's own libvirt call, failing, while the service is open.
        conn = libvirt.open("test:///default")
        try:
            conn.defineXML("<domain host-looks-for-this")
        except libvirt.libvirtError:
            pass
        conn.close()
    print(json.dumps({{"ours": ours, "seen": seen}}))

asyncio.run(main())
"""


def test_the_hosts_handler_sees_its_own_errors_and_none_of_the_services() -> None:
    done = fresh_python(textwrap.dedent(SCRIPT.format(register=True)))
    out = json.loads(done.stdout)
    assert out["ours"] == "DomainNotFound"
    assert len(out["seen"]) == 1, out
    assert "host-looks-for-this" in out["seen"][0]
    assert done.stderr == ""


def test_without_a_handler_libvirt_prints_the_hosts_errors_but_not_the_services() -> None:
    done = fresh_python(textwrap.dedent(SCRIPT.format(register=False)))
    assert json.loads(done.stdout)["ours"] == "DomainNotFound"
    # libvirt's own default prints the host's failed call (one report), and
    # nothing of the service's (its lookup's "Domain not found").
    assert done.stderr.startswith("libvirt: Domain Config error : "), done.stderr
    assert done.stderr.count("libvirt: ") == 1, done.stderr
    assert "host-looks-for-this" in done.stderr
    assert "Domain not found" not in done.stderr


def test_the_command_line_prints_its_own_error_only() -> None:
    # The CLI is an application: it owns the process's handler and silences
    # libvirt's printing itself, so a failed connect is one line of its own.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiodetach",
            "detach",
            "--uri",
            "qemu+unix:///system?socket=/nonexistent/aiodetach",
            "--alias",
            "ua-disk1",
            "vm",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    # A loaded machine can hold the worker threads' join past the close's
    # grace: the warning that says so is the CLI's too, and not libvirt's.
    lines = [x for x in done.stderr.splitlines() if "aiodetach.close_left_running" not in x]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ConnectionLost: "), done.stderr
