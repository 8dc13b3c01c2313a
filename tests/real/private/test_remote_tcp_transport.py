"""The remote driver's TCP transport (``qemu+tcp://``), as a fleet talks to other hosts.

The private libvirtd listens on 127.0.0.1 only (never an address off this
machine): events, timeouts and a daemon restart must behave over TCP exactly
as over the local UNIX socket.
"""

from __future__ import annotations

import asyncio
import uuid as _uuid

import pytest

from aiodetach import DetachFleet, DetachResult, DetachService, DetachSettings
from aiodetach.errors import DetachTimeout
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd, pci_slots

from .._real import domains_removed, guest_ejects, live_xml, record_requests, until

DISKS = [
    _lab.DiskSpec("sda", "scsi", alias="ua-s0"),
    _lab.DiskSpec("vdb", "virtio", alias="ua-v0"),
    _lab.DiskSpec("vdc", "virtio", alias="ua-v1"),
]


async def test_event_and_timeout_over_tcp(private_libvirtd: PrivateLibvirtd) -> None:
    daemon = private_libvirtd
    name = f"rt-{_uuid.uuid4().hex[:6]}"
    uuid = await asyncio.to_thread(daemon.define, name, DISKS)
    with domains_removed(daemon.uri, [uuid]):
        settings = DetachSettings(attempts=2, timeout=1.0)
        async with DetachFleet(settings=settings) as fleet:
            outcomes = await fleet.detach_many(
                [
                    {"uri": daemon.tcp_uri, "domain": name, "alias": "ua-s0"},
                    {"uri": daemon.tcp_uri, "domain": uuid, "alias": "ua-v0"},
                ]
            )
            assert fleet.uris == [daemon.tcp_uri]
        scsi, pci = outcomes
        assert scsi.result is not None, scsi
        assert (scsi.result.confirmed_by, scsi.result.attempts) == ("event", 1)
        assert isinstance(pci.error, DetachTimeout), pci
        assert pci.error.attempts == 2
        xml = await asyncio.to_thread(live_xml, daemon.uri, uuid)
        assert "'ua-s0'" not in xml
        assert "'ua-v0'" in xml


async def test_daemon_restart_over_tcp(
    private_libvirtd: PrivateLibvirtd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed under two pending PCI unplugs, restarted: the service reconnects
    over TCP and confirms each once (by the event or by the re-check after the
    reconnect, whichever comes first), with no second request; an unplug begun
    after the reconnect, which no re-check can end, is confirmed by its event
    on the new connection."""
    daemon = private_libvirtd
    sent = record_requests(monkeypatch)
    name = f"rt-{_uuid.uuid4().hex[:6]}"
    uuid = await asyncio.to_thread(daemon.define, name, DISKS)
    with domains_removed(daemon.uri, [uuid]):
        slots = pci_slots(await asyncio.to_thread(live_xml, daemon.uri, uuid))
        settings = DetachSettings(
            attempts=2, timeout=600.0, reconnect_timeout=30.0, reconnect_backoff_max=0.5
        )
        async with DetachService(daemon.tcp_uri, settings=settings) as svc:
            tasks = [
                asyncio.create_task(svc.detach(name, alias=alias)) for alias in ("ua-v0", "ua-v1")
            ]
            await until(lambda: len(sent.requests) == 2, 20, "2 requests sent")
            await asyncio.to_thread(daemon.kill)
            await asyncio.to_thread(daemon.start)
            await until(lambda: svc.reconnects == 1, 30, "the reconnect over TCP")
            # The SCSI disk needs no guest: its unplug, begun on the new connection
            # with a 600 s window, can end in time only by its event.
            scsi = await asyncio.wait_for(svc.detach(name, alias="ua-s0"), 30)
            await asyncio.to_thread(
                guest_ejects, daemon.uri, uuid, [slots["ua-v0"], slots["ua-v1"]]
            )
            async with asyncio.timeout(30):
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert svc.pending() == []
    assert (scsi.attempts, scsi.confirmed_by) == (1, "event")
    assert all(isinstance(o, DetachResult) for o in outcomes), outcomes
    results = [o for o in outcomes if isinstance(o, DetachResult)]
    assert [(r.alias, r.attempts) for r in results] == [("ua-v0", 1), ("ua-v1", 1)]
    assert all(r.confirmed_by in ("event", "xml") for r in results), results
    # One request each: none sent again after the reconnect.
    assert sorted(r.alias for r in sent.requests) == ["ua-s0", "ua-v0", "ua-v1"]
