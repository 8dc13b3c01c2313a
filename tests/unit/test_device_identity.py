"""Finding the same device in the other definition of a domain (no libvirt).

libvirt-assigned aliases (``virtio-disk1``, ``scsi0-0-0-2``, ``net0``,
``hostdev0``, ``pci.1``) exist only in the live XML.  The snippets below are
shaped like what libvirt 9.0 wrote on a real run (see
tests/real/system/test_device_identity_live_vs_persistent.py): the live copy has aliases and a few
live-only extras (``<source index>``, ``state=``, a DIMM's ``base``), the
inactive copy has neither.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from aiodetach._xml import (
    DeviceRef,
    describe,
    find_device,
    find_same_device,
    list_devices,
    selector_from,
)
from aiodetach.errors import AmbiguousDevice

LIVE = """
<domain type='qemu' id='3'><name>vm</name><devices>
  <emulator>/usr/bin/qemu-system-x86_64</emulator>
  <disk type='file' device='disk'>
    <driver name='qemu' type='raw'/>
    <source file='/img/a.img' index='3'/><backingStore/>
    <target dev='vda' bus='virtio'/>
    <alias name='virtio-disk0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x0b' function='0x0'/>
  </disk>
  <disk type='file' device='disk'>
    <driver name='qemu' type='raw'/>
    <source file='/img/b.img' index='2'/><backingStore/>
    <target dev='vdb' bus='virtio'/>
    <alias name='virtio-disk1'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x0c' function='0x0'/>
  </disk>
  <disk type='file' device='disk'>
    <source file='/img/c.img' index='1'/><backingStore/>
    <target dev='sda' bus='scsi'/>
    <alias name='scsi0-0-0-0'/>
    <address type='drive' controller='0' bus='0' target='0' unit='0'/>
  </disk>
  <disk type='file' device='disk'>
    <source file='/img/d.img' index='4'/><backingStore/>
    <target dev='sdc' bus='scsi'/>
    <alias name='scsi0-0-0-2'/>
    <address type='drive' controller='0' bus='0' target='0' unit='2'/>
  </disk>
  <disk type='file' device='disk'>
    <source file='/img/e.img' index='5'/>
    <target dev='vdx' bus='virtio'/>
    <alias name='ua-x'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x11' function='0x0'/>
  </disk>
  <controller type='scsi' index='0' model='virtio-scsi'>
    <alias name='scsi0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x08' function='0x0'/>
  </controller>
  <controller type='pci' index='1' model='pci-bridge'>
    <model name='pci-bridge'/><target chassisNr='1'/>
    <alias name='pci.1'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
  </controller>
  <controller type='pci' index='0' model='pci-root'><alias name='pci.0'/></controller>
  <interface type='user'>
    <mac address='52:54:00:ab:cd:01'/><model type='virtio'/>
    <alias name='net0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
  </interface>
  <interface type='user'>
    <mac address='52:54:00:ab:cd:02'/><model type='e1000'/>
    <alias name='net1'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
  </interface>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <driver name='vfio'/>
    <source><address domain='0x0000' bus='0x06' slot='0x00' function='0x0'/></source>
    <alias name='hostdev0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
  </hostdev>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <driver name='vfio'/>
    <source><address domain='0x0000' bus='0x06' slot='0x00' function='0x1'/></source>
    <alias name='hostdev1'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
  </hostdev>
  <hostdev mode='subsystem' type='usb' managed='yes'>
    <source startupPolicy='optional'>
      <vendor id='0x1234'/><product id='0xbeef'/><address bus='1' device='5'/>
    </source>
    <alias name='hostdev2'/>
    <address type='usb' bus='0' port='1'/>
  </hostdev>
  <hostdev mode='subsystem' type='mdev' model='vfio-pci' display='off'>
    <source><address uuid='C2177883-F1BB-47F0-914D-32A22E3A8804'/></source>
    <alias name='hostdev3'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>
  </hostdev>
  <serial type='pty'>
    <source path='/dev/pts/0'/>
    <target type='isa-serial' port='0'><model name='isa-serial'/></target>
    <alias name='serial0'/>
  </serial>
  <console type='pty' tty='/dev/pts/0'>
    <source path='/dev/pts/0'/>
    <target type='serial' port='0'/>
    <alias name='serial0'/>
  </console>
  <channel type='pty'>
    <source path='/dev/pts/1'/>
    <target type='virtio' name='org.example.two' state='disconnected'/>
    <alias name='channel1'/>
    <address type='virtio-serial' controller='0' bus='0' port='2'/>
  </channel>
  <rng model='virtio'>
    <backend model='random'>/dev/urandom</backend>
    <alias name='rng0'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x0e' function='0x0'/>
  </rng>
  <rng model='virtio'>
    <backend model='random'>/dev/urandom</backend>
    <alias name='rng1'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x0f' function='0x0'/>
  </rng>
  <memory model='dimm'>
    <target><size unit='KiB'>131072</size><node>0</node></target>
    <alias name='dimm0'/>
    <address type='dimm' slot='0' base='0x100000000'/>
  </memory>
  <memory model='dimm'>
    <target><size unit='KiB'>131072</size><node>0</node></target>
    <alias name='dimm1'/>
    <address type='dimm' slot='1' base='0x108000000'/>
  </memory>
  <crypto model='virtio' type='qemu'>
    <backend model='builtin' queues='1'/>
    <alias name='crypto0'/>
  </crypto>
</devices></domain>
"""

# The persistent definition of the same domain, as XMLDesc(VIR_DOMAIN_XML_INACTIVE)
# gives it: no libvirt aliases, no live-only attributes, devices in another
# order, numbers written differently in places, one MAC in upper case.
INACTIVE = """
<domain type='qemu'><name>vm</name><devices>
  <emulator>/usr/bin/qemu-system-x86_64</emulator>
  <controller type='pci' index='0' model='pci-root'/>
  <disk type='file' device='disk'>
    <source file='/img/d.img'/>
    <target dev='sdc' bus='scsi'/>
    <address type='drive' controller='0' bus='0' target='0' unit='2'/>
  </disk>
  <disk type='file' device='disk'>
    <source file='/img/c.img'/>
    <target dev='sda' bus='scsi'/>
    <address type='drive' controller='0' bus='0' target='0' unit='0'/>
  </disk>
  <disk type='file' device='disk'>
    <driver name='qemu' type='raw'/>
    <source file='/img/b.img'/>
    <target dev='vdb' bus='virtio'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x0c' function='0x0'/>
  </disk>
  <disk type='file' device='disk'>
    <driver name='qemu' type='raw'/>
    <source file='/img/a.img'/>
    <target dev='vda' bus='virtio'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x0b' function='0x0'/>
  </disk>
  <disk type='file' device='disk'>
    <source file='/img/e-renamed.img'/>
    <target dev='vdy' bus='virtio'/>
    <alias name='ua-x'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x11' function='0x0'/>
  </disk>
  <controller type='pci' index='1' model='pci-bridge'>
    <model name='pci-bridge'/><target chassisNr='1'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
  </controller>
  <controller type='scsi' index='0' model='virtio-scsi'>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x08' function='0x0'/>
  </controller>
  <interface type='user'>
    <mac address='52:54:00:AB:CD:02'/><model type='e1000'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
  </interface>
  <interface type='user'>
    <mac address='52:54:00:ab:cd:01'/><model type='virtio'/>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
  </interface>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0' bus='6' slot='0' function='1'/></source>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
  </hostdev>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0' bus='6' slot='0' function='0'/></source>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
  </hostdev>
  <hostdev mode='subsystem' type='usb' managed='yes'>
    <source startupPolicy='optional'><vendor id='0x1234'/><product id='0xbeef'/></source>
    <address type='usb' bus='0' port='1'/>
  </hostdev>
  <hostdev mode='subsystem' type='mdev' model='vfio-pci' display='off'>
    <source><address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>
  </hostdev>
  <console type='pty'><target type='serial' port='0'/></console>
  <serial type='pty'>
    <target type='isa-serial' port='0'><model name='isa-serial'/></target>
  </serial>
  <channel type='pty'>
    <target type='virtio' name='org.example.two'/>
    <address type='virtio-serial' controller='0' bus='0' port='2'/>
  </channel>
  <rng model='virtio'>
    <backend model='random'>/dev/urandom</backend>
    <address type='pci' domain='0' bus='0' slot='15' function='0'/>
  </rng>
  <rng model='virtio'>
    <backend model='random'>/dev/urandom</backend>
    <address type='pci' domain='0' bus='0' slot='14' function='0'/>
  </rng>
  <memory model='dimm'>
    <target><size unit='KiB'>131072</size><node>0</node></target>
    <address type='dimm' slot='1'/>
  </memory>
  <memory model='dimm'>
    <target><size unit='KiB'>131072</size><node>0</node></target>
    <address type='dimm' slot='0'/>
  </memory>
  <crypto model='virtio' type='qemu'><backend model='builtin' queues='1'/></crypto>
</devices></domain>
"""


def _by_alias(xml: str, alias: str) -> DeviceRef:
    dev = find_device(xml, selector_from(alias=alias, target=None, mac=None, xml=None))
    assert dev is not None, alias
    return dev


def _elem(ref: DeviceRef) -> ET.Element:
    return ET.fromstring(ref.xml)  # noqa: S314 - test data


def _same(alias: str) -> DeviceRef:
    """The persistent twin of the live device ``alias``, which must exist."""
    live = _by_alias(LIVE, alias)
    twin = find_same_device(INACTIVE, live)
    assert twin is not None, alias
    assert twin.tag == live.tag
    assert twin.identity == live.identity
    return twin


def test_libvirt_alias_is_missing_from_the_inactive_xml() -> None:
    # The bug this module fixes: looked up by alias, the persistent half is not found.
    sel = selector_from(alias="virtio-disk1", target=None, mac=None, xml=None)
    assert find_device(LIVE, sel) is not None
    assert find_device(INACTIVE, sel) is None


def test_virtio_disk_alias_follows_to_the_inactive_disk_by_target() -> None:
    live = _by_alias(LIVE, "virtio-disk1")
    assert live.identity == ("disk", "vdb")
    twin = _same("virtio-disk1")
    assert twin.alias is None
    assert _elem(twin).find("target").get("dev") == "vdb"  # type: ignore[union-attr]
    assert "b.img" in twin.xml


def test_scsi_disk_alias_finds_its_own_unit_not_another_scsi_disk() -> None:
    twin = _same("scsi0-0-0-2")
    assert _elem(twin).find("target").get("dev") == "sdc"  # type: ignore[union-attr]
    assert "d.img" in twin.xml
    other = _same("scsi0-0-0-0")
    assert "c.img" in other.xml


def test_nic_by_mac_whatever_the_case() -> None:
    assert _by_alias(LIVE, "net1").identity == ("interface", "52:54:00:ab:cd:02")
    twin = _same("net1")
    assert _elem(twin).find("mac").get("address") == "52:54:00:AB:CD:02"  # type: ignore[union-attr]
    assert "e1000" in twin.xml
    assert "virtio" in _same("net0").xml


def test_two_pci_hostdevs_have_different_identities_and_their_own_twins() -> None:
    first, second = _by_alias(LIVE, "hostdev0"), _by_alias(LIVE, "hostdev1")
    assert first.identity is not None
    assert second.identity is not None
    assert first.identity != second.identity
    # Their descriptions are alike; only the identity tells them apart.
    assert first.description.split()[0] == second.description.split()[0] == "hostdev"
    for alias, function in (("hostdev0", "0"), ("hostdev1", "1")):
        twin = _same(alias)
        assert _elem(twin).find("source/address").get("function") == function  # type: ignore[union-attr]


def test_usb_hostdev_by_vendor_product_ignores_the_live_host_address() -> None:
    twin = _same("hostdev2")
    assert _elem(twin).find("source/address") is None  # only the live copy resolved it


def test_mdev_hostdev_by_uuid_case_insensitive() -> None:
    twin = _same("hostdev3")
    assert "c2177883" in twin.xml


def test_controller_by_type_and_index() -> None:
    assert _by_alias(LIVE, "pci.1").identity == ("controller", "pci", "1")
    assert "pci-bridge" in _same("pci.1").xml
    assert "pci-root" in _same("pci.0").xml
    assert "virtio-scsi" in _same("scsi0").xml


def test_device_with_only_an_address_matches_by_address() -> None:
    # Two identical rngs: only the guest address (0x0e vs 14) tells them apart.
    rng0, rng1 = _by_alias(LIVE, "rng0"), _by_alias(LIVE, "rng1")
    assert rng0.identity is not None
    assert rng0.identity[:2] == ("rng", "address")
    assert rng0.identity != rng1.identity
    assert _elem(_same("rng0")).find("address").get("slot") == "14"  # type: ignore[union-attr]
    assert _elem(_same("rng1")).find("address").get("slot") == "15"  # type: ignore[union-attr]


def test_dimm_matches_by_slot_without_the_live_only_base() -> None:
    assert _elem(_same("dimm0")).find("address").get("slot") == "0"  # type: ignore[union-attr]
    assert _elem(_same("dimm1")).find("address").get("slot") == "1"  # type: ignore[union-attr]


def test_channel_state_is_live_only() -> None:
    assert "org.example.two" in _same("channel1").xml


def test_console_and_serial_share_a_live_alias_but_keep_their_tag() -> None:
    serial = _by_alias(LIVE, "serial0")
    assert serial.tag == "serial"
    console = next(d for d in list_devices(LIVE) if d.tag == "console")
    assert console.alias == "serial0"
    twin = find_same_device(INACTIVE, console)
    assert twin is not None
    assert twin.tag == "console"
    assert _same("serial0").tag == "serial"


def test_device_with_nothing_identifying_has_no_identity_and_no_twin() -> None:
    crypto = _by_alias(LIVE, "crypto0")
    assert crypto.identity is None
    # The inactive XML does hold a <crypto>: guessing it would be a guess.
    assert "<crypto" in INACTIVE
    assert find_same_device(INACTIVE, crypto) is None


def test_user_alias_is_found_by_alias_even_where_the_rest_differs() -> None:
    live = _by_alias(LIVE, "ua-x")
    twin = find_same_device(INACTIVE, live)
    assert twin is not None
    assert twin.alias == "ua-x"
    assert twin.identity == ("disk", "vdy")  # the user renamed the target in the config


def test_libvirt_alias_with_a_different_identity_is_not_trusted() -> None:
    # libvirt re-issues aliases: a new disk on SCSI unit 2 is scsi0-0-0-2 again.
    stale = DeviceRef("disk", "scsi0-0-0-2", "<disk/>", "disk", ("disk", "sdz"))
    assert find_same_device(LIVE, stale) is None
    same = DeviceRef("disk", "scsi0-0-0-2", "<disk/>", "disk", ("disk", "sdc"))
    found = find_same_device(LIVE, same)
    assert found is not None
    assert found.alias == "scsi0-0-0-2"


def test_same_identity_with_another_tag_is_not_the_same_device() -> None:
    disk = _by_alias(LIVE, "virtio-disk0")
    as_controller = DeviceRef("controller", None, "<controller/>", "x", disk.identity)
    assert find_same_device(INACTIVE, as_controller) is None


def test_a_shared_identity_is_settled_by_the_guest_address_or_raises() -> None:
    live = _by_alias(LIVE, "virtio-disk0")  # vda at PCI slot 0x0b

    def with_second_vda(disk: str) -> str:
        return INACTIVE.replace("<crypto", disk + "<crypto")

    # A second vda elsewhere, or without an address: the one at slot 11 is it.
    for other in (
        "<disk><target dev='vda'/><address type='pci' slot='0x0c'/></disk>",
        "<disk><target dev='vda'/></disk>",
    ):
        twin = find_same_device(with_second_vda(other), live)
        assert twin is not None
        assert "a.img" in twin.xml
    # A second vda at the same address: a guess either way.
    same_place = (
        "<disk><target dev='vda'/>"
        "<address type='pci' domain='0' bus='0' slot='11' function='0'/></disk>"
    )
    with pytest.raises(AmbiguousDevice, match="several of them are at its guest address"):
        find_same_device(with_second_vda(same_place), live)


def test_every_live_device_has_one_twin_and_identities_are_unique() -> None:
    live = list_devices(LIVE)
    assert [d.tag for d in live if d.tag == "emulator"] == []
    with_identity = [d for d in live if d.identity is not None]
    assert len({d.identity for d in with_identity}) == len(with_identity)
    twins = [find_same_device(INACTIVE, d) for d in live]
    found = [t for t in twins if t is not None]
    assert len(found) == len(live) - 1  # all but the crypto device
    assert len({t.xml for t in found}) == len(found)  # never two onto one


@pytest.mark.parametrize("ref", list_devices(LIVE), ids=lambda d: str(d.alias))
def test_identity_never_depends_on_the_alias(ref: DeviceRef) -> None:
    elem = _elem(ref)
    alias = elem.find("alias")
    assert alias is not None
    alias.set("name", "something-else")
    renamed = ET.tostring(elem, encoding="unicode")
    domain = f"<domain><devices>{renamed}</devices></domain>"
    (again,) = list_devices(domain)
    assert again.identity == ref.identity


def test_find_device_fills_the_identity_and_old_constructors_still_work() -> None:
    dev = find_device(
        LIVE, selector_from(alias=None, target=None, mac="52:54:00:AB:CD:01", xml=None)
    )
    assert dev is not None
    assert dev.identity == ("interface", "52:54:00:ab:cd:01")
    assert DeviceRef("disk", None, "<disk/>", "disk").identity is None
    assert hash(dev) == hash(dev)


def test_twins_of_one_definition_carry_their_guest_address() -> None:
    # libvirt accepts two interfaces with one MAC; each is still its own device.
    second = (
        "<interface type='user'><mac address='52:54:00:ab:cd:01'/><model type='e1000'/>"
        "<alias name='net9'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x0a' function='0x0'/></interface>"
        "<crypto"
    )
    live = LIVE.replace("<crypto", second, 1)
    net0, net9 = _by_alias(live, "net0"), _by_alias(live, "net9")
    assert net0.identity != net9.identity
    assert net0.identity is not None
    assert net0.identity[:2] == ("interface", "52:54:00:ab:cd:01")
    assert net0.description == net9.description.replace("net9", "net0")
    assert "mac='52:54:00:ab:cd:01'" in describe("interface", "net0", net0.identity)
    assert _by_alias(LIVE, "net0").identity == (
        "interface",
        "52:54:00:ab:cd:01",
    )  # alone: as before
    twin = find_same_device(INACTIVE, net9, live)
    assert twin is None  # the inactive NIC with that MAC is at net0's address: net0's
    assert find_same_device(INACTIVE, net0, live) is not None
    with pytest.raises(AmbiguousDevice):
        find_device(live, selector_from(alias=None, target=None, mac="52:54:00:ab:cd:01", xml=None))
