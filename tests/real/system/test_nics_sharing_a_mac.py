"""Two NICs of one running persistent domain with the same MAC, on real libvirt + QEMU.

libvirt 9.0 defines and starts such a domain (user, ethernet, network and
bridge interfaces alike, measured; docs/libvirt-behaviour.md) and gives each
its own guest PCI address in both definitions.  Named by its libvirt alias
(``net1``, live only), the second NIC is found in the persistent definition
by MAC *and* address, so the persistent half removes it and not its twin; a
MAC alone names neither, and nothing is changed.

OS-less guests (SeaBIOS only) never release a PCI NIC: the live half times
out after one short attempt, the persistent half having been done first.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import AmbiguousDevice, DetachTimeout
from aiodetach_lab import domains as _lab
from aiodetach_lab.requests import RequestLog

MAC = "52:54:00:5e:a1:0d"
NICS = (_lab.NicSpec(MAC), _lab.NicSpec(MAC))  # no user aliases: net0, net1, live only


@pytest.fixture
def domain(libvirtd: str) -> Iterator[_lab.LabDomain]:
    with _lab.throwaway_domain(libvirtd, nics=NICS) as dom:
        yield dom


def _nics(uri: str, name: str, *, inactive: bool = False) -> list[tuple[str | None, str]]:
    """(alias, guest PCI slot) of each interface, in document order."""
    conn = libvirt.open(uri)
    try:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(flags))  # noqa: S314 - libvirtd's
    finally:
        conn.close()
    found = []
    for nic in root.iterfind("devices/interface"):
        assert (nic.find("mac").get("address") or "").lower() == MAC  # type: ignore[union-attr]
        alias, address = nic.find("alias"), nic.find("address")
        assert address is not None, "libvirt gave the NIC no guest address"
        found.append((alias.get("name") if alias is not None else None, str(address.get("slot"))))
    return found


async def test_the_second_nic_by_its_libvirt_alias_leaves_both_definitions(
    libvirtd: str, domain: _lab.LabDomain
) -> None:
    live = _nics(libvirtd, domain.name)
    inactive = _nics(libvirtd, domain.name, inactive=True)
    print(f"\nlive: {live}\ninactive: {inactive}")
    (alias0, slot0), (alias1, slot1) = live
    assert (alias0, alias1) == ("net0", "net1")
    assert slot0 != slot1
    assert inactive == [(None, slot0), (None, slot1)]  # the same addresses, no aliases

    settings = DetachSettings(attempts=1, timeout=0.5)
    async with DetachService(libvirtd, settings=settings) as svc:
        with pytest.raises(DetachTimeout) as caught:
            await svc.detach(domain.name, alias="net1")
    err = caught.value
    after_live = _nics(libvirtd, domain.name)
    after_inactive = _nics(libvirtd, domain.name, inactive=True)
    print(f"error: {err!r}\nlive after: {after_live}\ninactive after: {after_inactive}")

    assert err.persistent_done is True, "the error must say the persistent half was done"
    assert (err.domain, err.alias) == (domain.name, "net1")
    assert after_live == live, "an OS-less guest cannot have released the NIC"
    assert after_inactive == [(None, slot0)], "net1 must leave the persistent definition, net0 stay"


async def test_the_mac_they_share_names_neither_and_nothing_changes(
    libvirtd: str, domain: _lab.LabDomain, sent: RequestLog
) -> None:
    live = _nics(libvirtd, domain.name)
    inactive = _nics(libvirtd, domain.name, inactive=True)
    async with DetachService(libvirtd) as svc:
        with pytest.raises(AmbiguousDevice) as caught:
            await svc.detach(domain.name, mac=MAC)
    print(f"\nerror: {caught.value}")
    assert caught.value.domain == domain.name
    assert _nics(libvirtd, domain.name) == live
    assert _nics(libvirtd, domain.name, inactive=True) == inactive
    assert sent.matching() == []  # no live request reached libvirt
