"""``LIBVIRT_DEFAULT_URI`` names the hypervisor of a service given no URI (real libvirtd).

libvirt itself applies the variable (aiodetach passes ``None`` to libvirt):
the service detaches on the daemon it names, and reports that URI, as
libvirt gives it back for the connection, in ``svc.uri`` and its records.
"""

from __future__ import annotations

import asyncio
import uuid as _uuid

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.instrumentation import Record
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd

from .._real import domains_removed, live_xml


async def test_a_service_without_a_uri_detaches_where_the_variable_says(
    private_libvirtd: PrivateLibvirtd, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = private_libvirtd
    name = f"du-{_uuid.uuid4().hex[:6]}"
    uuid = await asyncio.to_thread(
        daemon.define, name, [_lab.DiskSpec("sda", "scsi", alias="ua-s0")]
    )
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", daemon.tcp_uri)
    records: list[Record] = []
    with domains_removed(daemon.uri, [uuid]):
        svc = DetachService(
            settings=DetachSettings(attempts=1, timeout=20.0), hooks=[records.append]
        )
        assert svc.uri == daemon.tcp_uri  # before open: the variable libvirt will use
        async with svc:
            result = await svc.detach(name, alias="ua-s0")
            assert svc.uri == daemon.tcp_uri  # after: libvirt's URI for the connection
        assert (result.confirmed_by, result.attempts) == ("event", 1)
        assert "'ua-s0'" not in await asyncio.to_thread(live_xml, daemon.uri, uuid)
    assert {r.uri for r in records} == {daemon.tcp_uri}
