"""A caller's connection opened before any libvirt event implementation was
registered (docs/event-loops.md, docs/connecting.md), on a real libvirtd.

libvirt's client adds its socket watch when it connects: without an event
implementation then, the connection has none for its whole life.  In a fresh
process (an implementation is registered once per process): a connection
opened first still detaches through a service (its event is read only when a
later call reads the socket, which is why the docs say to register first),
but libvirt refuses it keepalive; one opened after the service registered
aiodetach's implementation has both.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid as _uuid

from _probes import fresh_python
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd

from .._real import domains_removed

_CHILD = """
import asyncio, json, libvirt
from aiodetach import DetachService, DetachSettings

libvirt.registerErrorHandler(lambda _c, _e: None, None)

def keepalive(conn):
    try:
        conn.setKeepAlive(5, 3)
        return "set"
    except libvirt.libvirtError as exc:
        return exc.get_error_message()

async def main():
    early = libvirt.open({uri!r})  # no event implementation registered yet
    settings = DetachSettings(attempts=2, timeout=3)
    async with DetachService(connection=early, settings=settings) as svc:
        first = await svc.detach({name!r}, alias="ua-s0")
        early_keepalive = keepalive(early)
    late = libvirt.open({uri!r})  # after the service registered aiodetach's
    async with DetachService(connection=late, settings=settings) as svc:
        second = await svc.detach({name!r}, alias="ua-s1")
        late_keepalive = keepalive(late)
    print(json.dumps({{
        "early": [first.confirmed_by, first.attempts, round(first.elapsed, 2), early_keepalive],
        "late": [second.confirmed_by, second.attempts, round(second.elapsed, 2), late_keepalive],
    }}))

asyncio.run(main())
"""


async def test_a_connection_opened_before_an_event_loop_detaches_without_keepalive(
    private_libvirtd: PrivateLibvirtd,
) -> None:
    daemon = private_libvirtd
    name = f"eb-{_uuid.uuid4().hex[:6]}"
    disks = [
        _lab.DiskSpec("sda", "scsi", alias="ua-s0"),
        _lab.DiskSpec("sdb", "scsi", alias="ua-s1"),
    ]
    uuid = await asyncio.to_thread(daemon.define, name, disks)
    with domains_removed(daemon.uri, [uuid]):
        code = textwrap.dedent(_CHILD).format(uri=daemon.tcp_uri, name=name)
        done = await asyncio.to_thread(fresh_python, code, 120)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    print(seen)
    early_by, early_attempts, _early_elapsed, early_keepalive = seen["early"]
    late_by, late_attempts, _late_elapsed, late_keepalive = seen["late"]
    assert early_attempts == 1  # completed: the event came in with the re-check's read
    assert early_by in ("event", "xml")
    assert "missing event loop implementation" in early_keepalive
    assert (late_by, late_attempts, late_keepalive) == ("event", 1, "set")
