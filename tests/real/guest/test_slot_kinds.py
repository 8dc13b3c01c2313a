"""Which slot the lab's guests put a virtio disk in, decided from real libvirt XML.

libvirt 9.0 + QEMU 7.2: a q35 guest's ``pcie-root-port`` hot-plugs through
ACPI by default (the live XML says ``pc-q35-7.2``; QEMU >= 6.1), natively
(pciehp, ~5 s minimum) with ``-global
ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off``; ``pc``'s ``pci-root``
through ACPI.  Only the live XML is read: the guests need not boot.
"""

from __future__ import annotations

import pytest

from aiodetach._slots import NATIVE_PCIE_MINIMUM, Slot, slot_of
from aiodetach._xml import parse_definition

from ._support import guest, virtio_disk

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("machine", "native", "slot"),
    [
        ("q35", True, Slot("native-pcie", NATIVE_PCIE_MINIMUM)),
        ("q35", False, Slot("acpi-pci")),
        ("pc", False, Slot("acpi-pci")),
    ],
    ids=["q35-native", "q35-default", "pc"],
)
def test_slot_of_a_lab_guest_disk(libvirtd: str, machine: str, native: bool, slot: Slot) -> None:
    disks = [virtio_disk("vdb", "ua-disk1")]
    with guest(
        libvirtd, machine=machine, native_pcie_hotplug=native, disks=disks, wait_ready=False
    ) as g:
        live = g.xml()
        assert slot_of(parse_definition(live), "ua-disk1") == slot, live
