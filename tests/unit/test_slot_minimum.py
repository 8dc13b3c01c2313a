"""A ``timeout`` shorter than the device's slot can ever release it in.

The slot is decided from the live XML alone (aiodetach._slots), tested as a
table; through the service, a call whose ``timeout`` is below a native-PCIe
slot's ~5 s says so once (a ``timeout_below_slot_minimum`` record and a
structlog warning), and nothing is said for ACPI or SCSI slots.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from aiodetach import DetachService, DetachSettings
from aiodetach._slots import NATIVE_PCIE_MINIMUM, Slot, slot_below, slot_of
from aiodetach._xml import parse_definition
from aiodetach.instrumentation import DetachRecord, Record
from aiodetach.testing import FakeDomain, FakeHypervisor, GuestUnplug

NATIVE_OFF = ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")
QEMU_NS = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"


def _domain(
    machine: str,
    controllers: str,
    device: str,
    *,
    acpi: bool = True,
    qemu_args: tuple[str, ...] = (),
) -> str:
    args = "".join(f"<qemu:arg value='{a}'/>" for a in qemu_args)
    return (
        f"<domain type='qemu' {QEMU_NS}><name>vm</name>"
        f"<os><type machine='{machine}'>hvm</type></os>"
        + ("<features><acpi/></features>" if acpi else "")
        + f"<devices>{controllers}{device}</devices>"
        + (f"<qemu:commandline>{args}</qemu:commandline>" if args else "")
        + "</domain>"
    )


Q35_PORTS = (
    "<controller type='pci' index='0' model='pcie-root'><alias name='pcie.0'/></controller>"
    "<controller type='pci' index='1' model='pcie-root-port'><alias name='pci.1'/></controller>"
)
Q35_PORT_OFF = (
    "<controller type='pci' index='0' model='pcie-root'/>"
    "<controller type='pci' index='1' model='pcie-root-port' hotplug='off'/>"
)
PC_ROOT = (
    "<controller type='pci' index='0' model='pci-root'/>"
    "<controller type='pci' index='1' model='pci-bridge'/>"
    "<controller type='scsi' index='0' model='virtio-scsi'/>"
)


def _disk(address: str, bus: str = "virtio") -> str:
    return (
        f"<disk type='file' device='disk'><target dev='vdb' bus='{bus}'/>"
        f"<alias name='ua-disk1'/>{address}</disk>"
    )


ON_PORT = _disk("<address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>")
ON_ROOT = _disk("<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>")
ON_BRIDGE = _disk("<address type='pci' domain='0x0000' bus='0x01' slot='0x03' function='0x0'/>")
SCSI = _disk("<address type='drive' controller='0' bus='0' target='0' unit='1'/>", "scsi")
NATIVE = Slot("native-pcie", NATIVE_PCIE_MINIMUM)

ROWS: list[tuple[str, str, Slot]] = [
    (
        "q35-port-native-by-global",
        _domain("pc-q35-7.2", Q35_PORTS, ON_PORT, qemu_args=NATIVE_OFF),
        NATIVE,
    ),
    (
        "q35-port-acpi-by-default-since-6.1",
        _domain("pc-q35-7.2", Q35_PORTS, ON_PORT),
        Slot("acpi-pci"),
    ),
    ("q35-6.1-port-acpi", _domain("pc-q35-6.1", Q35_PORTS, ON_PORT), Slot("acpi-pci")),
    ("q35-6.0-port-native", _domain("pc-q35-6.0", Q35_PORTS, ON_PORT), NATIVE),
    ("q35-unversioned-acpi", _domain("q35", Q35_PORTS, ON_PORT), Slot("acpi-pci")),
    ("q35-without-acpi-native", _domain("pc-q35-7.2", Q35_PORTS, ON_PORT, acpi=False), NATIVE),
    (
        "q35-global-on-acpi",
        _domain(
            "pc-q35-5.2",
            Q35_PORTS,
            ON_PORT,
            qemu_args=("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on"),
        ),
        Slot("acpi-pci"),
    ),
    ("q35-port-hotplug-off-unknown", _domain("pc-q35-7.2", Q35_PORT_OFF, ON_PORT), Slot("unknown")),
    ("q35-root-complex-unknown", _domain("pc-q35-7.2", Q35_PORTS, ON_ROOT), Slot("unknown")),
    ("pc-root-acpi", _domain("pc-i440fx-7.2", PC_ROOT, ON_ROOT), Slot("acpi-pci")),
    ("pc-bridge-acpi", _domain("pc-i440fx-7.2", PC_ROOT, ON_BRIDGE), Slot("acpi-pci")),
    ("scsi-disk", _domain("pc-i440fx-7.2", PC_ROOT, SCSI), Slot("scsi")),
    ("no-address-unknown", _domain("pc-q35-7.2", Q35_PORTS, _disk("")), Slot("unknown")),
]


@pytest.mark.parametrize(("xml", "slot"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_slot_of(xml: str, slot: Slot) -> None:
    assert slot_of(parse_definition(xml), "ua-disk1") == slot


def test_an_alias_not_in_the_definition_is_unknown() -> None:
    xml = _domain("pc-q35-7.2", Q35_PORTS, ON_PORT, qemu_args=NATIVE_OFF)
    assert slot_of(parse_definition(xml), "ua-other") == Slot("unknown")


@pytest.mark.parametrize(
    ("native", "timeout", "below"),
    [(True, 4.9, True), (True, NATIVE_PCIE_MINIMUM, False), (False, 0.1, False)],
)
def test_slot_below(native: bool, timeout: float, below: bool) -> None:
    args = NATIVE_OFF if native else ()
    definition = parse_definition(_domain("pc-q35-7.2", Q35_PORTS, ON_PORT, qemu_args=args))
    expected = NATIVE if below else None
    assert slot_below(definition, "ua-disk1", timeout) == expected
    assert slot_below(definition, None, timeout) is None


# ------------------------------------------------------------ through the service
def _q35(fake: FakeHypervisor, *, native: bool) -> FakeDomain:
    vm = fake.add_domain("vm")
    vm.machine = "pc-q35-7.2"
    vm.qemu_args = NATIVE_OFF if native else ()
    vm.add_device("<controller type='pci' index='1' model='pcie-root-port'/>", alias="pci.1")
    return vm


PORT = {"type": "pci", "domain": "0x0000", "bus": "0x01", "slot": "0x00", "function": "0x0"}


class Warnings:
    def __init__(self) -> None:
        self.records: list[DetachRecord] = []

    def __call__(self, record: Record) -> None:
        if isinstance(record, DetachRecord) and record.kind == "timeout_below_slot_minimum":
            self.records.append(record)


async def _detach(
    fake: FakeHypervisor, window: float, attempts: int = 3
) -> tuple[Warnings, list[MutableMapping[str, Any]]]:
    seen = Warnings()
    settings = DetachSettings(timeout=window, attempts=attempts)
    with capture_logs() as logs:
        async with DetachService(backend=fake, settings=settings, hooks=[seen]) as svc:
            await svc.detach("vm", alias="ua-disk1")
    return seen, [e for e in logs if e["event"] == "aiodetach.timeout_below_slot_minimum"]


async def test_native_pcie_slot_with_a_short_timeout_warns_once_per_call() -> None:
    fake = FakeHypervisor()
    vm = _q35(fake, native=True)
    # Released after 1.5 s: a 1 s timeout re-sends once; still one warning.
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.later(1.5), address=PORT)
    seen, logs = await _detach(fake, window=1.0)
    assert len(fake.requests) == 2
    assert [(r.slot, r.minimum, r.timeout, r.alias) for r in seen.records] == [
        ("native-pcie", NATIVE_PCIE_MINIMUM, 1.0, "ua-disk1")
    ]
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"
    assert (logs[0]["domain"], logs[0]["alias"], logs[0]["slot"], logs[0]["minimum"]) == (
        "vm",
        "ua-disk1",
        "native-pcie",
        NATIVE_PCIE_MINIMUM,
    )


async def test_native_pcie_slot_with_a_long_enough_timeout_says_nothing() -> None:
    fake = FakeHypervisor()
    vm = _q35(fake, native=True)
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.later(0.05), address=PORT)
    seen, logs = await _detach(fake, window=NATIVE_PCIE_MINIMUM)
    assert (seen.records, logs) == ([], [])


async def test_acpi_slot_with_a_short_timeout_says_nothing() -> None:
    fake = FakeHypervisor()
    vm = _q35(fake, native=False)  # q35 on QEMU >= 6.1: ACPI hotplug on its root ports
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.later(0.05), address=PORT)
    seen, logs = await _detach(fake, window=0.5)
    assert (seen.records, logs) == ([], [])


async def test_scsi_disk_with_a_short_timeout_says_nothing() -> None:
    fake = FakeHypervisor()
    vm = _q35(fake, native=True)
    scsi = {"type": "drive", "controller": "0", "bus": "0", "target": "0", "unit": "1"}
    vm.add_device(
        "<disk type='file' device='disk'><target dev='sdb' bus='scsi'/></disk>",
        alias="ua-disk1",
        unplug=GuestUnplug.later(0.05),
        address=scsi,
    )
    seen, logs = await _detach(fake, window=0.5)
    assert (seen.records, logs) == ([], [])
