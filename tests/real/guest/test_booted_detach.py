"""A booted Linux guest releases PCI devices asynchronously; aiodetach waits for it.

For i440fx (``pc``) and ``q35`` (QEMU 7.2 uses ACPI PCI hotplug on q35's root
ports by default): a virtio-blk disk, a virtio NIC and a PCI controller (a
virtio-scsi HBA with no disks) are unplugged by the guest's kernel after
``detachDeviceAlias``; libvirt's DEVICE_REMOVED completes each detach with
exactly one request, and the device is gone from the live and the persistent
definition.  One guest per machine type serves the three tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from aiodetach import DetachSettings

from ._support import Guest, guest, nic, recording_service, scsi_controller, virtio_disk

DEVICES: dict[str, tuple[str, dict[str, Any]]] = {
    # kind: (alias, how the test names the device to detach())
    "virtio-blk disk": ("ua-blk1", {"target": "vdb"}),
    "virtio NIC": ("ua-net1", {"mac": "52:54:00:a1:de:01"}),
    "virtio-scsi controller": ("ua-hba1", {"alias": "ua-hba1"}),
}


@pytest.fixture(scope="module", params=["pc", "q35"])
def booted(request: pytest.FixtureRequest, libvirtd: str) -> Iterator[Guest]:
    with guest(
        libvirtd,
        machine=request.param,
        disks=[virtio_disk("vdb", "ua-blk1")],
        nics=[nic("52:54:00:a1:de:01", "ua-net1")],
        snippets=[scsi_controller("ua-hba1")],
    ) as dom:
        yield dom


@pytest.mark.parametrize("kind", list(DEVICES))
async def test_guest_releases_device_and_event_completes_detach(booted: Guest, kind: str) -> None:
    alias, selector = DEVICES[kind]
    assert booted.has_alias(alias)
    assert booted.has_alias(alias, inactive=True)
    settings = DetachSettings(timeout=15, attempts=2)
    async with recording_service(booted.uri, settings) as (svc, backend):
        result = await svc.detach(booted.name, **selector)

    assert (result.live, result.persistent) == (True, True), result
    assert result.confirmed_by == "event", result
    assert result.attempts == 1, result
    assert result.alias == alias
    assert [(r.alias, r.error) for r in backend.requests] == [(alias, None)]
    # Measured 7-100 ms under TCG; generous for a loaded CI machine.
    assert result.elapsed < 5, result
    assert not booted.has_alias(alias), f"{kind} still in the live XML"
    assert not booted.has_alias(alias, inactive=True), f"{kind} still in the persistent XML"
