"""Device identity against a real libvirt 9.0 + QEMU 7.2: live vs persistent XML.

An OS-less domain with every device kind libvirt accepts here without a
guest OS or host hardware (no PCI/USB passthrough, no vhost-vsock).  For
every device of the live XML the same device must be found in the
persistent (inactive) XML, where libvirt-assigned aliases do not exist, and
libvirt's own config detach of what was found must remove exactly that
device.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from aiodetach._xml import (
    DeviceRef,
    find_device,
    find_same_device,
    has_alias,
    list_devices,
    selector_from,
)
from aiodetach_lab import domains as _lab

DISKS = (
    _lab.DiskSpec("vda", "virtio"),
    _lab.DiskSpec("vdb", "virtio", alias="ua-blk"),
    _lab.DiskSpec("sda", "scsi"),
    _lab.DiskSpec("sdb", "scsi"),
    _lab.DiskSpec("sdc", "scsi"),
)
NICS = (
    _lab.NicSpec("52:54:00:ab:cd:01"),
    _lab.NicSpec("52:54:00:ab:cd:02"),
    _lab.NicSpec("52:54:00:ab:cd:03", alias="ua-net"),
)
HAVE_SWTPM = shutil.which("swtpm") is not None

# Static markup (no input of any caller); the only variable part, the 9p
# share directory, is set through ElementTree below.
EXTRA_DEVICES = """
<devices>
  <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
  <controller type='virtio-serial' index='0'/>
  <controller type='usb' index='0' model='qemu-xhci'/>
  <controller type='pci' index='1' model='pci-bridge'/>
  <filesystem type='mount' accessmode='mapped'><source dir='SET-BELOW'/>
    <target dir='share0'/></filesystem>
  <channel type='unix'><source mode='bind'/>
    <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  <channel type='pty'><target type='virtio' name='org.example.two'/></channel>
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
  <serial type='pty'><target port='0'/></serial>
  <serial type='null'><target port='1'/></serial>
  <console type='pty'><target type='serial' port='0'/></console>
  <console type='pty'><target type='virtio' port='1'/></console>
  <parallel type='null'><target port='0'/></parallel>
  <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  <watchdog model='i6300esb' action='reset'/>
  <input type='tablet' bus='usb'/>
  <input type='mouse' bus='usb'/>
  <input type='keyboard' bus='virtio'/>
  <hub type='usb'/>
  <redirdev bus='usb' type='spicevmc'/>
  <redirdev bus='usb' type='spicevmc'/>
  <smartcard mode='passthrough' type='null'/>
  <graphics type='spice' autoport='yes' listen='127.0.0.1'/>
  <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
  <sound model='ich6'><codec type='micro'/></sound>
  <video><model type='vga' vram='16384' heads='1'/></video>
  <memballoon model='virtio'/>
  <shmem name='shm0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
  <panic model='isa'><address type='isa' iobase='0x505'/></panic>
  <memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target></memory>
  <memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target></memory>
</devices>
"""
TPM = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"

# Every kind the domain above must really have (libvirt 9.0 silently drops
# elements it does not know, e.g. <crypto>: a kind missing here is a bug in
# the test, not a pass).
EXPECTED_TAGS = {
    "disk",
    "controller",
    "interface",
    "filesystem",
    "channel",
    "serial",
    "console",
    "parallel",
    "rng",
    "watchdog",
    "input",
    "hub",
    "redirdev",
    "smartcard",
    "graphics",
    "sound",
    "audio",
    "video",
    "memballoon",
    "shmem",
    "panic",
    "memory",
} | ({"tpm"} if HAVE_SWTPM else set())


def _build(name: str, workdir: Path) -> str:
    root = ET.fromstring(_lab.osless_domain_xml(name, workdir, DISKS, NICS))  # noqa: S314
    # DIMMs need hotpluggable memory slots and a NUMA node.
    max_mem = ET.SubElement(root, "maxMemory", slots="4", unit="MiB")
    max_mem.text = "1024"
    numa = ET.SubElement(ET.SubElement(root, "cpu"), "numa")
    ET.SubElement(numa, "cell", id="0", cpus="0", memory="128", unit="MiB")
    share = workdir / "share"
    share.mkdir()
    share.chmod(0o777)
    extra = ET.fromstring(EXTRA_DEVICES)  # noqa: S314 - static markup above
    source = extra.find("filesystem/source")
    assert source is not None
    source.set("dir", str(share))
    if HAVE_SWTPM:
        extra.append(ET.fromstring(TPM))  # noqa: S314 - static markup above
    devices = root.find("devices")
    assert devices is not None
    devices.extend(extra)
    return ET.tostring(root, encoding="unicode")


def _xmls(uri: str, name: str) -> tuple[str, str]:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(name)
        return str(dom.XMLDesc(0)), str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        conn.close()


@pytest.fixture(scope="module")
def rich(libvirtd: str) -> Iterator[tuple[str, str]]:
    """(live XML, inactive XML) of a running persistent domain with many device kinds."""
    with _lab.throwaway_domain(libvirtd, build_xml=_build) as dom:
        yield _xmls(libvirtd, dom.name)


def _address(ref: DeviceRef) -> dict[str, str] | None:
    """The device's guest address without the live-only DIMM ``base``: checked
    apart from the identity, which may or may not use it."""
    node = ET.fromstring(ref.xml).find("address")  # noqa: S314 - from libvirt
    if node is None:
        return None
    return {k: v for k, v in node.attrib.items() if k != "base"}


def _libvirt_alias(alias: str | None) -> bool:
    return alias is not None and not alias.startswith("ua-")


def test_the_domain_has_every_kind(rich: tuple[str, str]) -> None:
    live, _ = rich
    assert {d.tag for d in list_devices(live)} >= EXPECTED_TAGS


def test_every_live_device_has_one_identity_of_its_own(rich: tuple[str, str]) -> None:
    live, _ = rich
    refs = list_devices(live)
    assert [d for d in refs if d.identity is None] == []
    identities = [d.identity for d in refs]
    assert len(set(identities)) == len(identities), identities


def test_every_live_device_is_found_in_the_persistent_definition(
    rich: tuple[str, str],
) -> None:
    live, inactive = rich
    twins: list[DeviceRef] = []
    followed = 0
    for ref in list_devices(live):
        twin = find_same_device(inactive, ref)
        assert twin is not None, ref
        assert (twin.tag, twin.identity) == (ref.tag, ref.identity)
        assert _address(twin) == _address(ref), ref
        if _libvirt_alias(ref.alias):
            assert ref.alias is not None
            assert twin.alias is None
            assert not has_alias(inactive, ref.alias), ref.alias
            # What the fix is for: by its alias, the persistent half is not there.
            sel = selector_from(alias=ref.alias, target=None, mac=None, xml=None)
            assert find_device(inactive, sel) is None
            followed += 1
        else:
            assert twin.alias == ref.alias
        twins.append(twin)
    assert followed >= 30  # most devices here only have a libvirt alias
    # One to one, and nothing in the persistent definition is left over.
    assert len({t.xml for t in twins}) == len(twins)
    assert {t.xml for t in twins} == {d.xml for d in list_devices(inactive)}


def test_every_persistent_device_is_found_in_the_live_definition(
    rich: tuple[str, str],
) -> None:
    live, inactive = rich
    for ref in list_devices(inactive):
        twin = find_same_device(live, ref)
        assert twin is not None, ref
        assert (twin.tag, twin.identity) == (ref.tag, ref.identity)
        back = find_same_device(inactive, twin)
        assert back is not None
        assert back.xml == ref.xml


def test_live_only_fields_are_really_live_only(rich: tuple[str, str]) -> None:
    # The facts the identity rules rely on; if libvirt changes them, look again.
    live, inactive = rich
    assert " base=" in live  # a DIMM's (not the panic's iobase=)
    assert " base=" not in inactive
    assert "state=" in live
    assert "state=" not in inactive
    assert "<alias name='virtio-disk0'/>" in live
    assert "<alias " in inactive  # user aliases only
    assert "<alias name='ua-blk'/>" in inactive
    assert next(d.alias for d in list_devices(live) if d.tag == "console") == "serial0"


# libvirt aliases of devices libvirt 9.0 can remove from the persistent
# definition (it refuses persistent detach of smartcard, tpm, hub, video,
# graphics, memballoon, panic, audio; removing a default controller re-adds it).
CONFIG_DETACHABLE = (
    "virtio-disk0",
    "scsi0-0-0-1",
    "ide0-1-0",
    "net1",
    "fs0",
    "channel1",
    "serial1",
    "parallel0",
    "input0",
    "redir1",
    "watchdog0",
    "rng1",
    "sound0",
    "shmem0",
    "dimm1",
    "pci.1",
)


def test_config_detach_follows_a_live_alias_to_that_device_only(libvirtd: str) -> None:
    with _lab.throwaway_domain(libvirtd, build_xml=_build) as lab:
        conn = libvirt.open(libvirtd)
        try:
            dom = conn.lookupByName(lab.name)
            for alias in CONFIG_DETACHABLE:
                live, inactive = _xmls(libvirtd, lab.name)
                sel = selector_from(alias=alias, target=None, mac=None, xml=None)
                live_ref = find_device(live, sel)
                assert live_ref is not None, alias
                assert find_device(inactive, sel) is None, alias
                twin = find_same_device(inactive, live_ref)
                assert twin is not None, alias
                before = {d.identity for d in list_devices(inactive)}
                dom.detachDeviceFlags(twin.xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                live_after, inactive_after = _xmls(libvirtd, lab.name)
                after = {d.identity for d in list_devices(inactive_after)}
                assert before - after == {live_ref.identity}, alias
                assert after <= before, alias
                assert has_alias(live_after, alias)  # the live half is untouched
        finally:
            conn.close()
