"""A device whose identity its definition shares is never half-detached in silence.

libvirt 9.0 defines and starts a domain with two interfaces of one MAC, two
filesystems of one target, two shared-memory devices of one name, two
guestfwd channels of one address and port, two leases of one lockspace and
key, two PS/2 mice (measured, docs/libvirt-behaviour.md).  A device named by
its live alias is found in the persistent definition by its identity there;
where that identity is shared, the guest ``<address>`` tells the twins apart,
and where nothing does, ``AmbiguousDevice`` is raised before either half is
started.  On the fake hypervisor, with addresses as libvirt writes them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import AmbiguousDevice
from aiodetach.testing import FakeDevice, FakeDomain, FakeHypervisor, Unplug

from ._journal_support import journal_settings, killed_mid_unplug

MAC = "52:54:00:5e:d0:01"


def pci(slot: int) -> dict[str, str]:
    """A guest PCI address, spelled as libvirt writes it."""
    return {
        "type": "pci",
        "domain": "0x0000",
        "bus": "0x00",
        "slot": f"0x{slot:02x}",
        "function": "0x0",
    }


def two_nics(
    fake: FakeHypervisor, *, first_slot: int | None = 5, **second: object
) -> tuple[FakeDomain, FakeDevice, FakeDevice]:
    """net0 at PCI slot 5 (``first_slot``; ``None``: no address) and net1 at
    slot 6 or as ``second`` says, both with one MAC, both in both definitions."""
    vm = fake.add_domain("vm")
    first = pci(first_slot) if first_slot is not None else None
    net0 = vm.add_interface(MAC, alias="net0", address=first)
    net1 = vm.add_interface(MAC, alias="net1", **{"address": pci(6), **second})  # type: ignore[arg-type]
    return vm, net0, net1


def nothing_sent(fake: FakeHypervisor) -> bool:
    return fake.requests == [] and fake.config_requests == []


@pytest.mark.parametrize("alias", ["net0", "net1"])
async def test_nic_sharing_a_mac_by_libvirt_alias_leaves_both_definitions(
    fake: FakeHypervisor, svc: DetachService, alias: str
) -> None:
    """The issue: ``net1`` went live only, ``persistent=False``, no error."""
    _vm, net0, net1 = two_nics(fake)
    result = await svc.detach("vm", alias=alias)
    assert (result.live, result.persistent) == (True, True)
    gone, kept = (net0, net1) if alias == "net0" else (net1, net0)
    assert (gone.live, gone.config) == (False, False)
    assert (kept.live, kept.config) == (True, True)
    ((_uuid, sent),) = fake.config_requests
    assert f'slot="0x0{6 if alias == "net1" else 5}"' in sent  # the twin at its address
    assert f"mac='{MAC}'" in result.device


@pytest.mark.parametrize("prefix", ["net", "ua-net"], ids=["libvirt-aliases", "user-aliases"])
async def test_two_nics_sharing_a_mac_each_get_their_own_config_detach(
    fake: FakeHypervisor, svc: DetachService, prefix: str
) -> None:
    """Keyed by the MAC alone, the second caller joined the first's config
    detach: told ``persistent=True`` while its NIC stayed defined (with user
    aliases, found in both definitions by alias, that was the only bug)."""
    vm = fake.add_domain("vm")
    net0 = vm.add_interface(MAC, alias=f"{prefix}0", address=pci(5))
    net1 = vm.add_interface(MAC, alias=f"{prefix}1", address=pci(6))
    results = await asyncio.gather(
        svc.detach("vm", alias=f"{prefix}0"), svc.detach("vm", alias=f"{prefix}1")
    )
    assert all(r.persistent and r.live for r in results)
    assert not any((net0.config, net1.config, net0.live, net1.live))
    assert len(fake.config_requests) == 2


async def test_a_mac_two_nics_share_is_ambiguous(fake: FakeHypervisor, svc: DetachService) -> None:
    two_nics(fake)
    with pytest.raises(AmbiguousDevice) as caught:
        await svc.detach("vm", mac=MAC.upper())
    assert caught.value.domain == "vm"
    assert f"mac={MAC!r}" in str(caught.value)
    assert nothing_sent(fake)


async def test_device_xml_with_the_guest_address_names_one_of_them(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    _vm, net0, net1 = two_nics(fake)
    xml = (
        f"<interface type='network'><mac address='{MAC}'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/></interface>"
    )
    result = await svc.detach("vm", xml=xml)
    assert (result.live, result.persistent) == (True, True)
    assert (net1.live, net1.config, net0.live, net0.config) == (False, False, True, True)


@pytest.mark.parametrize(
    ("first_slot", "second"),
    [
        pytest.param(None, {"address": None}, id="no-addresses"),
        pytest.param(5, {"address": pci(5)}, id="one-address-twice"),
        pytest.param(5, {"live_address": pci(7)}, id="address-differs-between-definitions"),
    ],
)
async def test_twins_nothing_tells_apart_raise_before_anything_is_sent(
    fake: FakeHypervisor, svc: DetachService, first_slot: int | None, second: dict[str, object]
) -> None:
    vm, _net0, _net1 = two_nics(fake, first_slot=first_slot, **second)
    with pytest.raises(AmbiguousDevice) as caught:
        await svc.detach("vm", alias="net1")
    assert (caught.value.domain, caught.value.alias) == ("vm", "net1")
    assert "persistent definition" in str(caught.value)
    assert nothing_sent(fake)
    assert all(d.live and d.config for d in vm.devices)


async def test_a_second_nic_with_the_mac_plugged_live_only_is_not_taken_for_the_first(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """The persistent NIC with that MAC is at net0's address: it is net0's, and
    net1 is in the persistent definition under no name (0.1 removed net0's)."""
    _vm, net0, _net1 = two_nics(fake, config=False)
    result = await svc.detach("vm", alias="net1")
    assert (result.live, result.persistent) == (True, False)
    assert fake.config_requests == []
    assert (net0.live, net0.config) == (True, True)
    result = await svc.detach("vm", alias="net0")
    assert (result.live, result.persistent) == (True, True)


# -- every other kind whose identity libvirt lets repeat ---------------------------------

FS = "<filesystem type='mount' accessmode='squash'><source dir='/srv/{}'/><target dir='tag0'/></filesystem>"
SHMEM = "<shmem name='same'><model type='ivshmem-plain'/><size unit='M'>{}</size></shmem>"
GUESTFWD = "<channel type='{}'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>"
LEASE = "<lease><lockspace>ls</lockspace><key>k</key><target path='/var/lib/{}'/></lease>"
PS2_MOUSE = "<input type='mouse' bus='ps2'/>"


def twins(fake: FakeHypervisor, first: str, second: str, *, addressed: bool) -> FakeDomain:
    vm = fake.add_domain("vm")
    vm.add_device(first, alias="dev0", address=pci(5) if addressed else None)
    vm.add_device(second, alias="dev1", address=pci(6) if addressed else None)
    return vm


async def test_shared_memory_devices_of_one_name_by_address(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = twins(fake, SHMEM.format(4), SHMEM.format(8), addressed=True)
    result = await svc.detach("vm", alias="dev1")
    assert (result.live, result.persistent) == (True, True)
    first, second = vm.devices
    assert (second.live, second.config, first.live, first.config) == (False, False, True, True)


async def test_filesystems_of_one_target_are_refused_for_the_persistent_half(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """Their addresses tell them apart, but libvirt's config detach finds a
    filesystem by its target alone and removes the first (measured)."""
    vm = twins(fake, FS.format("a"), FS.format("b"), addressed=True)
    with pytest.raises(AmbiguousDevice, match="by its target alone"):
        await svc.detach("vm", alias="dev1")
    assert nothing_sent(fake)
    result = await svc.detach("vm", alias="dev1", persistent=False)  # live alone is exact
    assert (result.live, result.persistent) == (True, False)
    assert [d.config for d in vm.devices] == [True, True]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(GUESTFWD.format("pty"), GUESTFWD.format("null"), id="guestfwd-channel"),
        pytest.param(LEASE.format("a"), LEASE.format("b"), id="lease"),
        pytest.param(PS2_MOUSE, PS2_MOUSE, id="ps2-input"),
    ],
)
async def test_twins_without_a_guest_address_are_ambiguous(
    fake: FakeHypervisor, svc: DetachService, first: str, second: str
) -> None:
    vm = twins(fake, first, second, addressed=False)
    with pytest.raises(AmbiguousDevice, match="no guest address"):
        await svc.detach("vm", alias="dev1")
    assert nothing_sent(fake)
    assert all(d.live and d.config for d in vm.devices)


async def test_a_restart_takes_up_the_unplug_of_a_nic_whose_twin_left_meanwhile(
    tmp_path: Path,
) -> None:
    """What the journal knows a device by does not depend on its twins: net0
    leaving while the process was down does not make net1 "another device"."""
    fake = FakeHypervisor()
    vm, net0, net1 = two_nics(fake, unplug=Unplug.manual())
    journal = tmp_path / "j.db"
    await killed_mid_unplug(fake, journal, journal_settings(), alias="net1")
    net0.live = net0.config = False  # detached by someone else meanwhile
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        found = [(r.alias, r.outcome) for r in svc.recovered()]
        pending = svc.pending()
    assert found == [("net1", "pending")], found
    assert pending == [(vm.uuid, "net1")]
    assert net1.live


async def test_a_config_detach_cut_off_by_the_connection_is_checked_against_its_twin(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """Whether the config detach landed is asked of the definition again: net0
    at its own address is not net1 still there (nor a reason to give up)."""
    _vm, net0, net1 = two_nics(fake)
    original = fake.detach_config
    calls = 0

    def detach_config(uuid: str, device_xml: str) -> None:
        nonlocal calls
        calls += 1
        original(uuid, device_xml)
        if calls == 1:  # it landed, and then the connection broke
            raise BackendError(ErrorCode.SYSTEM_ERROR, "Cannot write data: Broken pipe")

    fake.detach_config = detach_config  # type: ignore[method-assign]
    result = await svc.detach("vm", alias="net1")
    assert (result.live, result.persistent) == (True, True)
    assert calls == 1
    assert (net1.config, net0.config) == (False, True)


def test_the_command_line_exits_with_its_own_status() -> None:
    from aiodetach._cli import exit_code_for

    assert exit_code_for(AmbiguousDevice("x", domain="vm")) == 14
