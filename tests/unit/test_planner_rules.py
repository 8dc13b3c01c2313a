"""The planner's rules (aiodetach._rules), called directly: values in, values out.

Which halves a detach does, which device each definition means, and the
errors that refuse a detach before anything is sent: each error says which
definition it is about and what to do instead, and carries the domain (and
the alias, when the caller named the device by one), because that is what a
caller handling many detaches reads (docs/errors.md).  No hypervisor, no loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aiodetach._rules import (
    Found,
    Plan,
    ambiguous,
    check_flags,
    domain_ref,
    find_devices,
    halves,
    names_domain,
    plan_devices,
)
from aiodetach._xml import DeviceRef, Selector, find_device, list_devices
from aiodetach.backend import DomainInfo, DomainState
from aiodetach.errors import (
    AmbiguousDevice,
    DetachError,
    DeviceNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    InvalidRequest,
)

RUNNING = DomainInfo("6695eb01-f6a4-8304-79aa-97f2502e193f", "vm", DomainState.RUNNING, True)
SHUTOFF = DomainInfo(RUNNING.uuid, "vm", DomainState.SHUTOFF, True)
TRANSIENT = DomainInfo(RUNNING.uuid, "vm", DomainState.RUNNING, False)

NIC = "<interface type='user'><mac address='52:54:00:ab:cd:01'/>{alias}{address}</interface>"
SLOT = "<address type='pci' domain='0x0000' bus='0x00' slot='0x{slot:02x}' function='0x0'/>"
DISK = "<disk type='file' device='disk'><target dev='{dev}' bus='virtio'/>{alias}</disk>"
FS = "<filesystem type='mount'><source dir='/srv/{n}'/><target dir='share'/>{address}</filesystem>"


def domain(*devices: str) -> str:
    return f"<domain type='qemu'><name>vm</name><devices>{''.join(devices)}</devices></domain>"


def alias(name: str) -> str:
    return f"<alias name='{name}'/>"


def nic(name: str = "", slot: int | None = None) -> str:
    return NIC.format(
        alias=alias(name) if name else "", address="" if slot is None else SLOT.format(slot=slot)
    )


def disk(dev: str, name: str = "") -> str:
    return DISK.format(dev=dev, alias=alias(name) if name else "")


def raised(kind: type[DetachError], call: object, *args: object) -> DetachError:
    with pytest.raises(kind) as info:
        call(*args)  # type: ignore[operator]
    return info.value


# ------------------------------------------------------------ domain_ref
@dataclass
class VirDomain:
    uuid: str

    def UUIDString(self) -> str:
        return self.uuid


def test_a_vir_domain_is_named_by_its_uuid() -> None:
    assert domain_ref(VirDomain(RUNNING.uuid)) == RUNNING.uuid
    assert domain_ref("  vm ") == "vm"


@pytest.mark.parametrize("ref", ["vm\x00", "v\x1fm", "vm\x7f"])
def test_a_domain_name_with_a_control_character_is_refused(ref: str) -> None:
    exc = raised(InvalidRequest, domain_ref, ref)
    assert exc.message == f"domain {ref!r} is not a valid domain name or UUID"


def test_a_name_with_non_ascii_letters_is_a_name() -> None:
    assert domain_ref("vm-\x80\xe9") == "vm-\x80\xe9"


def test_a_domain_that_is_neither_says_what_it_got() -> None:
    exc = raised(InvalidRequest, domain_ref, 42)
    assert exc.message == "domain must be a name, a UUID string or a libvirt.virDomain, not int"


def test_a_name_that_reads_as_a_uuid_names_that_uuid_or_that_name() -> None:
    named = names_domain(RUNNING.uuid.upper())
    assert named(RUNNING.uuid, "other")
    assert named("00000000-0000-0000-0000-000000000000", RUNNING.uuid.upper())
    assert not named("00000000-0000-0000-0000-000000000000", "vm")
    by_name = names_domain("vm")
    assert by_name("00000000-0000-0000-0000-000000000000", "vm")
    assert not by_name(RUNNING.uuid, "vm2")


# ------------------------------------------------------- flags and halves
@pytest.mark.parametrize(
    ("live", "persistent", "bad"), [(1, None, "live"), (None, "y", "persistent")]
)
def test_a_flag_that_is_not_a_bool_is_named(live: object, persistent: object, bad: str) -> None:
    exc = raised(InvalidRequest, check_flags, "vm", live, persistent)
    assert (exc.message, exc.domain) == (f"{bad} must be True, False or None", "vm")


def test_neither_half_is_nothing_to_detach() -> None:
    exc = raised(InvalidRequest, check_flags, "vm", False, False)
    assert exc.message == "live=False and persistent=False: nothing to detach"
    assert exc.domain == "vm"
    check_flags("vm", False, None)
    check_flags("vm", None, False)


@pytest.mark.parametrize(
    ("info", "live", "persistent", "done"),
    [
        (RUNNING, None, None, (True, True)),
        (RUNNING, False, None, (False, True)),
        (RUNNING, None, False, (True, False)),
        (SHUTOFF, None, None, (False, True)),
        (SHUTOFF, False, None, (False, True)),
        (SHUTOFF, False, True, (False, True)),
        (TRANSIENT, None, None, (True, False)),
        (TRANSIENT, True, False, (True, False)),
    ],
)
def test_halves_as_asked_else_as_the_domain_is(
    info: DomainInfo, live: bool | None, persistent: bool | None, done: tuple[bool, bool]
) -> None:
    assert halves(info, live, persistent) == done


def test_live_asked_of_a_shut_off_domain_says_what_to_do() -> None:
    exc = raised(DomainNotRunning, halves, SHUTOFF, True, None)
    assert exc.message == (
        "live detach asked of a shut-off domain; use persistent=True (or the default)"
    )
    assert exc.domain == "vm"


def test_persistent_asked_of_a_transient_domain_says_why() -> None:
    exc = raised(DomainNotPersistent, halves, TRANSIENT, None, True)
    assert exc.message == (
        "persistent detach asked of a transient domain (it has no persistent definition)"
    )
    assert exc.domain == "vm"


# ------------------------------------------------------------ find_devices
def test_a_user_alias_only_the_persistent_copy_has_finds_the_live_copy_by_identity() -> None:
    # Attached to the persistent definition as ua-data, hot-plugged live
    # without it: libvirt named the live copy virtio-disk1.
    live = domain(disk("vda", "virtio-disk0"), disk("vdb", "virtio-disk1"))
    persistent = domain(disk("vda"), disk("vdb", "ua-data"))
    found = find_devices(RUNNING, Selector("alias", "ua-data"), live, persistent)
    assert found.live is not None
    assert found.persistent is not None
    assert (found.live.alias, found.persistent.alias) == ("virtio-disk1", "ua-data")
    assert (found.live_read, found.persistent_read, found.gone) == (True, True, False)


def test_a_libvirt_alias_finds_the_persistent_copy_by_identity() -> None:
    live = domain(disk("vda", "virtio-disk0"), disk("vdb", "virtio-disk1"))
    persistent = domain(disk("vda"), disk("vdb"))
    found = find_devices(RUNNING, Selector("alias", "virtio-disk1"), live, persistent)
    assert found.persistent == find_device(persistent, Selector("target", "vdb"))


@pytest.mark.parametrize("read", ["live", "persistent"])
def test_a_definition_not_read_is_neither_found_nor_missed(read: str) -> None:
    xml = domain(disk("vdb", "ua-data"))
    live, persistent = (xml, None) if read == "live" else (None, xml)
    found = find_devices(RUNNING, Selector("alias", "ua-data"), live, persistent)
    assert (found.live_read, found.persistent_read) == (read == "live", read == "persistent")
    assert (found.live is not None, found.persistent is not None) == (
        read == "live",
        read == "persistent",
    )
    assert not found.live_missed
    assert not found.persistent_missed


def test_twins_in_the_live_definition_say_live() -> None:
    live = domain(nic("net0", 5), nic("net1", 6))
    exc = raised(
        AmbiguousDevice, find_devices, RUNNING, Selector("mac", "52:54:00:ab:cd:01"), live, None
    )
    assert exc.message.startswith(
        "mac='52:54:00:ab:cd:01': cannot tell which device of the live definition is meant: "
    )
    assert (exc.domain, exc.alias) == ("vm", None)


def test_twins_in_the_persistent_definition_say_persistent() -> None:
    live = domain(nic("net0", 5))
    persistent = domain(nic(slot=5), nic(slot=6))
    exc = raised(
        AmbiguousDevice,
        find_devices,
        RUNNING,
        Selector("mac", "52:54:00:ab:cd:01"),
        live,
        persistent,
    )
    assert "cannot tell which device of the persistent definition is meant" in exc.message


def test_live_twins_of_a_device_found_by_its_persistent_alias_say_live() -> None:
    # Named by a user alias only the persistent copy carries; the live
    # definition has two NICs of its MAC and neither at its address.
    live = domain(nic("net0"), nic("net1"))
    persistent = domain(nic("ua-wan", 5))
    exc = raised(
        AmbiguousDevice, find_devices, RUNNING, Selector("alias", "ua-wan"), live, persistent
    )
    assert exc.message.startswith(
        "alias='ua-wan': cannot tell which device of the live definition is meant: "
    )
    assert (exc.domain, exc.alias) == ("vm", "ua-wan")


def test_a_persistent_nic_whose_twin_is_the_live_one_is_not_live() -> None:
    # Two NICs of one MAC in the persistent definition; only the one at slot 6
    # runs.  The one named (at slot 5) is not taken for it, nor called ambiguous.
    live = domain(nic("net0", 6))
    persistent = domain(nic("ua-wan", 5), nic(slot=6))
    found = find_devices(RUNNING, Selector("alias", "ua-wan"), live, persistent)
    assert found.live is None
    assert found.persistent is not None
    assert found.persistent.alias == "ua-wan"


def test_the_persistent_copy_of_a_nic_plugged_live_only_is_none() -> None:
    # net1 shared net0's MAC and was hot-plugged live only; another caller's
    # unplug removed it.  The persistent NIC of that MAC is net0's copy.
    ended = list_devices(domain(nic("net0", 5), nic("net1", 6)))[1]
    found = Found(None, None, True, True).unplugged(
        ended, domain(nic(slot=5)), domain(nic("net0", 5))
    )
    assert (found.live, found.persistent, found.gone) == (ended, None, True)


def test_ambiguous_says_nothing_was_done_and_what_to_do() -> None:
    exc = ambiguous(RUNNING, Selector("alias", "net0"), "live", "two of them")
    assert exc.message == (
        "alias='net0': cannot tell which device of the live definition is meant: two of "
        "them; nothing was detached (name it by its persistent XML with its guest address, "
        "or detach one definition only)"
    )
    assert (exc.domain, exc.alias) == ("vm", "net0")
    assert ambiguous(RUNNING, Selector("target", "vdb"), "live", "x").alias is None


# ------------------------------------------------- what other callers ended
LIVE_VDB = DeviceRef("disk", "virtio-disk1", "", "disk vdb", ("disk", "vdb"))


def test_an_unplug_that_ended_is_shared_with_the_persistent_copy_found() -> None:
    persistent = domain(disk("vda"), disk("vdb"))
    missed = Found(None, None, True, True)
    found = missed.unplugged(LIVE_VDB, persistent, domain(disk("vda", "virtio-disk0")))
    assert found.live == LIVE_VDB
    assert found.gone
    assert found.persistent == find_device(persistent, Selector("target", "vdb"))
    assert missed.unplugged(None, persistent, None) is missed


def test_an_unplug_that_ended_keeps_a_persistent_copy_already_found() -> None:
    own = DeviceRef("disk", "ua-data", "<disk/>", "disk vdb", ("disk", "vdb"))
    found = Found(None, own, True, True).unplugged(LIVE_VDB, domain(disk("vdb")), None)
    assert (found.live, found.persistent, found.gone) == (LIVE_VDB, own, True)
    unread = Found(None, None, True, False).unplugged(LIVE_VDB, None, None)
    assert (unread.live, unread.persistent, unread.gone) == (LIVE_VDB, None, True)


def test_a_config_detach_under_way_is_shared() -> None:
    missed = Found(None, None, True, True)
    assert missed.config_removed(None) is missed
    removed = DeviceRef("disk", None, "<disk/>", "disk vdb", ("disk", "vdb"))
    assert missed.config_removed(removed) == Found(None, removed, True, True)


# ------------------------------------------------------------ plan_devices
VDB = DeviceRef("disk", "virtio-disk1", "<disk/>", "disk vdb", ("disk", "vdb"))
VDB_CONFIG = DeviceRef("disk", None, "<disk/>", "disk vdb", ("disk", "vdb"))
BY_ALIAS_ONLY = DeviceRef("rng", "rng0", "<rng/>", "rng", None)


def plan(
    found: Found, live: bool | None = None, persistent: bool | None = None, by: str = "alias"
) -> Plan:
    value = {"alias": "virtio-disk1", "target": "vdb"}[by]
    return plan_devices(RUNNING, Selector(by, value), live, persistent, found)  # type: ignore[arg-type]


def test_both_found_is_both_planned_and_described_live_first() -> None:
    assert plan(Found(VDB, VDB_CONFIG, True, True), persistent=True) == Plan(
        VDB, VDB_CONFIG, VDB, False
    )
    assert plan(Found(VDB, None, True, True, gone=True)).gone


def test_live_asked_and_not_live_is_not_found_there() -> None:
    exc = raised(DeviceNotFound, plan, Found(None, VDB_CONFIG, True, True), True)
    assert exc.message == "no device with alias='virtio-disk1' in the live definition"
    assert (exc.domain, exc.alias) == ("vm", "virtio-disk1")


def test_persistent_only_device_is_planned_without_a_live_half() -> None:
    found = Found(None, VDB_CONFIG, True, True)
    assert plan(found, live=False) == Plan(None, VDB_CONFIG, VDB_CONFIG)
    assert plan(found, persistent=True) == Plan(None, VDB_CONFIG, VDB_CONFIG)


def test_persistent_asked_and_nowhere_is_not_found_in_the_persistent_definition() -> None:
    exc = raised(DeviceNotFound, plan, Found(None, None, True, True), None, True)
    assert exc.message == "no device with alias='virtio-disk1' in the persistent definition"
    assert (exc.domain, exc.alias) == ("vm", "virtio-disk1")
    exc = raised(DeviceNotFound, plan, Found(None, None, False, True), None, True, "target")
    assert (exc.message, exc.alias) == (
        "no device with target='vdb' in the persistent definition",
        None,
    )


def test_live_only_asked_and_not_live_is_not_found_there() -> None:
    exc = raised(DeviceNotFound, plan, Found(None, None, True, False), None, False)
    assert exc.message == "no device with alias='virtio-disk1' in the live definition"


@pytest.mark.parametrize(
    ("live_read", "persistent_read", "where"),
    [(True, True, "live or persistent"), (True, False, "live"), (False, True, "persistent")],
)
def test_nowhere_names_the_definitions_read(
    live_read: bool, persistent_read: bool, where: str
) -> None:
    exc = raised(DeviceNotFound, plan, Found(None, None, live_read, persistent_read))
    assert exc.message == f"no device with alias='virtio-disk1' in the {where} definition"
    assert (exc.domain, exc.alias) == ("vm", "virtio-disk1")


def test_a_device_only_a_libvirt_alias_names_cannot_be_looked_for_in_the_persistent() -> None:
    exc = raised(InvalidRequest, plan, Found(BY_ALIAS_ONLY, None, True, True), None, True)
    assert exc.message == (
        "the device with alias='virtio-disk1' has nothing but its live alias to identify it "
        "in the persistent definition; name it with xml= (its persistent XML) or detach with "
        "persistent=False"
    )
    assert (exc.domain, exc.alias) == ("vm", "virtio-disk1")


def test_a_device_only_an_alias_names_is_planned_where_that_suffices() -> None:
    # Not asked for the persistent half: the live one alone.
    assert plan(Found(BY_ALIAS_ONLY, None, True, True)) == Plan(BY_ALIAS_ONLY, None, BY_ALIAS_ONLY)
    # Both copies found: nothing is left to guess.
    both = Found(BY_ALIAS_ONLY, VDB_CONFIG, True, True)
    assert plan(both, persistent=True) == Plan(BY_ALIAS_ONLY, VDB_CONFIG, BY_ALIAS_ONLY)
    # A user alias is in both definitions: not in the persistent one, it is not there.
    user = DeviceRef("rng", "ua-rng", "<rng/>", "rng", None)
    assert plan(Found(user, None, True, True), persistent=True) == Plan(user, None, user)


def test_filesystem_twins_in_the_persistent_definition_are_refused() -> None:
    persistent = domain(
        FS.format(n=1, address=SLOT.format(slot=7)), FS.format(n=2, address=SLOT.format(slot=8))
    )
    twin = list_devices(persistent)[0]
    exc = raised(AmbiguousDevice, plan, Found(None, twin, False, True))
    assert exc.message.startswith(
        "alias='virtio-disk1': cannot tell which device of the persistent definition is meant: "
        "libvirt's config detach finds a filesystem by its target alone"
    )
    assert (exc.domain, exc.alias) == ("vm", "virtio-disk1")
