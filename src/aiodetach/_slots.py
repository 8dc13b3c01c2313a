"""What kind of slot a device sits in, and how fast such a slot can release it.

A native-PCIe slot (a ``pcie-root-port`` driven by the guest's pciehp)
cannot release a device in under ~5 s: Linux acts on the attention button
only after a 5 s window in which a second press cancels it (measured: 6.2 s
for virtio-blk under TCG, against 22-83 ms for ACPI hotplug and ~60 ms for a
SCSI disk).  A ``timeout`` below that can only end in re-sends into a
running unplug, so the call says so (see `aiodetach._call`).

Decided from the live XML alone, pure: the device's ``<address
type='pci' bus=…>`` names its controller (``<controller type='pci'
index=…>``), whose model says the bus.  Whether a q35 root port hot-plugs
natively or through ACPI is not in libvirt 9.0's XML as such: QEMU 6.1 and
later machine types (``pc-q35-6.1``…) default to ACPI hotplug on root ports,
earlier ones and a domain without ``<acpi/>`` use native PCIe, and the
passthrough ``-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off``
(``<qemu:commandline>``) turns ACPI hotplug off.  ACPI hotplug of root ports
is q35's own (ICH9): a root port on any other machine type (aarch64
``virt`` on QEMU 7.2) is native.  A slot not decided so is
``"unknown"`` and has no minimum.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from ._xml import Definition

__all__ = ["NATIVE_PCIE_MINIMUM", "Slot", "SlotKind", "slot_below", "slot_of"]

SlotKind = Literal["native-pcie", "acpi-pci", "scsi", "unknown"]

NATIVE_PCIE_MINIMUM = 5.0
"""Seconds a native-PCIe slot cannot release a device in (pciehp's 5 s
attention-button window; the unplug measured 6.2 s)."""

_ACPI_GLOBAL = "ICH9-LPC.acpi-pci-hotplug-with-bridge-support="
_Q35_VERSION = re.compile(r"pc-q35-(\d+)\.(\d+)")
_PCIE_PORTS = frozenset({"pcie-root-port", "pcie-switch-downstream-port"})
_ACPI_BUSES = frozenset({"pci-root", "pci-bridge"})


@dataclass(frozen=True, slots=True)
class Slot:
    kind: SlotKind
    minimum: float = 0.0
    """Seconds the slot cannot release a device in (0: none known)."""


_UNKNOWN = Slot("unknown")


def slot_below(definition: Definition, alias: str | None, timeout: float) -> Slot | None:
    """The device's slot if it cannot release the device within ``timeout``
    (else None; the XML is not searched when no slot needs that long)."""
    if alias is None or timeout >= NATIVE_PCIE_MINIMUM:
        return None
    slot = slot_of(definition, alias)
    return slot if timeout < slot.minimum else None


def slot_of(definition: Definition, alias: str) -> Slot:
    """The slot of the device ``alias`` in a live definition."""
    device = next((d for d in definition.devices if _alias(d) == alias), None)
    address = device.find("address") if device is not None else None
    if device is None or address is None:
        return _UNKNOWN
    kind = address.get("type")
    if kind == "drive":
        return Slot("scsi") if _on_scsi(device) else _UNKNOWN
    if kind != "pci":
        return _UNKNOWN
    controller = _bus_controller(definition, address.get("bus"))
    model = controller.get("model") if controller is not None else None
    if model in _ACPI_BUSES:
        return Slot("acpi-pci")
    if controller is not None and model in _PCIE_PORTS:
        if controller.get("hotplug") == "off":
            return _UNKNOWN  # libvirt refuses the unplug itself
        if _native_pcie(*definition.platform):
            return Slot("native-pcie", NATIVE_PCIE_MINIMUM)
        return Slot("acpi-pci")
    return _UNKNOWN


def _native_pcie(machine: str, acpi: bool, qemu_args: tuple[str, ...]) -> bool:
    """Does a q35 root port hot-plug natively (pciehp) rather than through ACPI?"""
    if not acpi:
        return True  # no ACPI, no ACPI hotplug
    if machine and "q35" not in machine:
        return True  # ACPI hotplug of root ports is q35's (ICH9): aarch64 ``virt`` has none
    for arg in reversed(qemu_args):  # QEMU takes the last -global given
        if arg.startswith(_ACPI_GLOBAL):
            return arg[len(_ACPI_GLOBAL) :].lower() in ("off", "false", "no", "0")
    version = _Q35_VERSION.fullmatch(machine)
    if version is None:
        return False  # "q35" itself: the newest machine type, ACPI hotplug (QEMU >= 6.1)
    return (int(version.group(1)), int(version.group(2))) < (6, 1)


def _alias(device: ET.Element) -> str | None:
    found = device.find("alias")
    return found.get("name") if found is not None else None


def _on_scsi(device: ET.Element) -> bool:
    target = device.find("target")
    return target is not None and target.get("bus") == "scsi"


def _number(text: str | None) -> int | None:
    """libvirt writes ``bus='0x01'`` but ``index='1'``."""
    if text is None:
        return None
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


def _bus_controller(definition: Definition, bus: str | None) -> ET.Element | None:
    index = _number(bus)
    if index is None:
        return None
    return next(
        (
            d
            for d in definition.devices
            if d.tag == "controller" and d.get("type") == "pci" and _number(d.get("index")) == index
        ),
        None,
    )
