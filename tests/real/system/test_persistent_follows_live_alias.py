"""A device named by its *libvirt-assigned* alias is detached from both definitions.

A device defined without a user alias (``<alias name='ua-…'/>``) gets an alias
from libvirt when the domain starts -- ``scsi0-0-0-1`` for a SCSI disk,
``net0`` for a NIC -- and that alias exists in the live XML only; the
inactive (persistent) definition has no ``<alias>`` at all.  A caller who
read the alias from the live XML and asks ``detach(name, alias=...)`` of a
running persistent domain means *that device*: the persistent half must find
it in the inactive XML by what identifies it there (a disk's target dev, a
NIC's MAC), not skip the persistent half because the alias is not there.

OS-less guests (SeaBIOS only) suffice: QEMU completes a SCSI unplug without a
guest OS (DEVICE_REMOVED ~50 ms after the request).  A PCI NIC is never
released by an OS-less guest, so the NIC case checks the persistent half of a
live detach that times out (the persistent half is done first, by protocol).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachTimeout
from aiodetach_lab import domains as _lab

MAC = "52:54:00:5e:a1:01"
# No user aliases: libvirt names these in the live XML only.
DISKS = (_lab.DiskSpec("sda", "scsi"), _lab.DiskSpec("sdb", "scsi"))
NICS = (_lab.NicSpec(MAC),)


@pytest.fixture
def domain(libvirtd: str) -> Iterator[_lab.LabDomain]:
    with _lab.throwaway_domain(libvirtd, disks=DISKS, nics=NICS) as dom:
        yield dom


def _xml(uri: str, name: str, *, inactive: bool = False) -> ET.Element:
    conn = libvirt.open(uri)
    try:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        text = conn.lookupByName(name).XMLDesc(flags)
    finally:
        conn.close()
    return ET.fromstring(text)  # noqa: S314 - libvirtd's own output


def _disk(root: ET.Element, target: str) -> ET.Element | None:
    for disk in root.iterfind("devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return disk
    return None


def _nic(root: ET.Element, mac: str) -> ET.Element | None:
    for nic in root.iterfind("devices/interface"):
        m = nic.find("mac")
        if m is not None and (m.get("address") or "").lower() == mac:
            return nic
    return None


def _alias(elem: ET.Element | None) -> str | None:
    if elem is None:
        return None
    a = elem.find("alias")
    return None if a is None else a.get("name")


@pytest.mark.parametrize("persistent", [None, True], ids=["default", "persistent=True"])
async def test_scsi_disk_by_libvirt_alias_leaves_both_definitions(
    libvirtd: str, domain: _lab.LabDomain, persistent: bool | None
) -> None:
    live = _xml(libvirtd, domain.name)
    alias = _alias(_disk(live, "sdb"))
    print(f"\nlive alias of sdb: {alias!r}")
    assert alias is not None, "libvirt gave the disk no alias in the live XML"
    assert not alias.startswith("ua-"), alias
    # The premise: the persistent definition has the disk, but not that alias.
    inactive = _xml(libvirtd, domain.name, inactive=True)
    assert _disk(inactive, "sdb") is not None
    assert _alias(_disk(inactive, "sdb")) is None

    async with DetachService(libvirtd) as svc:
        result = await svc.detach(domain.name, alias=alias, persistent=persistent)
    print(f"result: {result!r}")
    after_live = _xml(libvirtd, domain.name)
    after_inactive = _xml(libvirtd, domain.name, inactive=True)
    print(
        "sdb in live XML:",
        _disk(after_live, "sdb") is not None,
        "| in inactive XML:",
        _disk(after_inactive, "sdb") is not None,
    )

    assert (result.live, result.persistent) == (True, True), result
    assert result.alias == alias, result
    assert result.attempts == 1, result
    assert _disk(after_live, "sdb") is None, "sdb still in the live XML"
    assert _disk(after_inactive, "sdb") is None, "sdb still in the persistent (inactive) XML"
    # Only that disk: its neighbour is untouched in both definitions.
    assert _disk(after_live, "sda") is not None
    assert _disk(after_inactive, "sda") is not None


@pytest.mark.parametrize("persistent", [None, True], ids=["default", "persistent=True"])
async def test_nic_by_libvirt_alias_leaves_the_persistent_definition(
    libvirtd: str, domain: _lab.LabDomain, persistent: bool | None
) -> None:
    alias = _alias(_nic(_xml(libvirtd, domain.name), MAC))
    print(f"\nlive alias of the NIC: {alias!r}")
    assert alias is not None, "libvirt gave the NIC no alias in the live XML"
    assert not alias.startswith("ua-"), alias
    inactive = _xml(libvirtd, domain.name, inactive=True)
    assert _nic(inactive, MAC) is not None
    assert _alias(_nic(inactive, MAC)) is None

    # An OS-less guest never releases a PCI NIC: the live half times out (one
    # short attempt); the persistent half, done first, must have happened.
    settings = DetachSettings(attempts=1, timeout=0.5)
    async with DetachService(libvirtd, settings=settings) as svc:
        with pytest.raises(DetachTimeout) as info:
            await svc.detach(domain.name, alias=alias, persistent=persistent)
    err = info.value
    print(f"error: {err!r} persistent_done={getattr(err, 'persistent_done', '<missing>')}")
    in_live = _nic(_xml(libvirtd, domain.name), MAC) is not None
    in_inactive = _nic(_xml(libvirtd, domain.name, inactive=True), MAC) is not None
    print(f"NIC in live XML: {in_live} | in inactive XML: {in_inactive}")

    assert in_live, "an OS-less guest cannot have released the NIC"
    assert not in_inactive, "the NIC is still in the persistent (inactive) XML"
    assert (err.domain, err.alias) == (domain.name, alias)
    assert err.persistent_done is True, "the error must say the persistent half was done"
