"""Two real libvirt daemons from one process: the system libvirtd and a
private one on its own socket, driven through one :class:`DetachFleet`."""

from __future__ import annotations

import uuid as _uuid

from aiodetach import DetachFleet, DetachSettings
from aiodetach.errors import ConnectionLost, DeviceNotFound
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd

from .._real import domains_removed

SCSI = [_lab.DiskSpec("sda", "scsi", alias="ua-s0"), _lab.DiskSpec("sdb", "scsi", alias="ua-s1")]


async def test_one_fleet_two_daemons(libvirtd: str, private_libvirtd: PrivateLibvirtd) -> None:
    name = f"aiodetach-fleet-{_uuid.uuid4().hex[:6]}"
    private_uuid = private_libvirtd.define(name, SCSI)
    with (
        domains_removed(private_libvirtd.uri, [private_uuid]),
        _lab.throwaway_domain(libvirtd, disks=SCSI) as system_dom,
    ):
        requests = [
            {"uri": libvirtd, "domain": system_dom.name, "alias": "ua-s0"},
            {"uri": libvirtd, "domain": system_dom.name, "alias": "ua-s1"},
            {"uri": private_libvirtd.uri, "domain": name, "alias": "ua-s0"},
            {"uri": private_libvirtd.uri, "domain": name, "alias": "ua-s1"},
            # Each host only knows its own domains.
            {"uri": private_libvirtd.uri, "domain": name, "alias": "ua-nope"},
            # A host that is not there fails only its own requests.
            {
                "uri": "qemu:///session?socket=/nonexistent/libvirt-sock",
                "domain": name,
                "alias": "ua-s0",
            },
        ]
        settings = DetachSettings(attempts=2, timeout=5)
        async with DetachFleet(settings=settings) as fleet:
            outcomes = await fleet.detach_many(requests)
            assert sorted(fleet.uris) == sorted([libvirtd, private_libvirtd.uri])
        results = [o.result for o in outcomes[:4]]
        assert all(r is not None and r.confirmed_by == "event" for r in results), outcomes
        assert {r.domain_uuid for r in results if r} == {system_dom.uuid, private_uuid}
        assert isinstance(outcomes[4].error, DeviceNotFound)
        assert isinstance(outcomes[5].error, ConnectionLost)
