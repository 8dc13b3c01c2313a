"""Pure pieces: selectors, XML matching, settings, errors, the error mapping."""

from __future__ import annotations

import asyncio
import math
import pickle

import pytest
from pydantic import ValidationError

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach._errors_map import is_connection_error, is_in_progress, map_error
from aiodetach._xml import find_device, has_alias, selector_from
from aiodetach.backend import BackendError, ErrorCode, ErrorDomain
from aiodetach.errors import (
    ConnectionLost,
    DetachFailed,
    DetachRefused,
    DetachTimeout,
    DeviceNotFound,
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    InvalidRequest,
    ReadOnlyConnection,
)
from aiodetach.testing import FakeHypervisor, Unplug

LIVE = """
<domain type='qemu'><name>vm</name><devices>
  <disk type='file' device='disk'><target dev='sda' bus='scsi'/><alias name='ua-scsi1'/></disk>
  <disk type='file' device='disk'><target dev='vdb' bus='virtio'/><alias name='virtio-disk1'/></disk>
  <interface type='user'><mac address='52:54:00:12:34:56'/><alias name='net0'/></interface>
  <hostdev mode='subsystem' type='pci'><source>
    <address domain='0x0000' bus='0x06' slot='0x00' function='0x0'/></source>
    <alias name='hostdev0'/></hostdev>
  <controller type='pci' index='0' model='pci-root'><alias name='pci.0'/></controller>
</devices></domain>
"""


@pytest.mark.parametrize(
    ("kwargs", "alias"),
    [
        ({"alias": "ua-scsi1"}, "ua-scsi1"),
        ({"target": "vdb"}, "virtio-disk1"),
        ({"mac": "52:54:00:12:34:56"}, "net0"),
        ({"mac": "52:54:00:12:34:56".upper()}, "net0"),
        ({"xml": "<disk><target dev='vdb'/></disk>"}, "virtio-disk1"),
        ({"xml": "<interface><mac address='52:54:00:12:34:56'/></interface>"}, "net0"),
        (
            {
                "xml": "<hostdev><source><address domain='0' bus='6' slot='0' function='0'/>"
                "</source></hostdev>"
            },
            "hostdev0",
        ),
        ({"xml": "<controller><alias name='pci.0'/></controller>"}, "pci.0"),
    ],
)
def test_find_device(kwargs: dict[str, str], alias: str) -> None:
    sel = selector_from(**{"alias": None, "target": None, "mac": None, "xml": None, **kwargs})
    dev = find_device(LIVE, sel)
    assert dev is not None
    assert dev.alias == alias


def test_find_device_misses() -> None:
    for kwargs in ({"alias": "nope"}, {"target": "sda0"}, {"mac": "52:54:00:00:00:00"}):
        sel = selector_from(**{"alias": None, "target": None, "mac": None, "xml": None, **kwargs})
        assert find_device(LIVE, sel) is None


def test_target_only_matches_disks() -> None:
    xml = "<domain><devices><interface><target dev='vdb'/></interface></devices></domain>"
    assert find_device(xml, selector_from(alias=None, target="vdb", mac=None, xml=None)) is None


def test_device_xml_round_trips() -> None:
    dev = find_device(LIVE, selector_from(alias=None, target="sda", mac=None, xml=None))
    assert dev is not None
    assert dev.xml.startswith("<disk")
    assert "ua-scsi1" in dev.xml
    assert dev.description == "disk target='sda' alias='ua-scsi1'"


def test_has_alias() -> None:
    assert has_alias(LIVE, "net0")
    assert not has_alias(LIVE, "net1")


def test_user_input_never_reaches_markup_unescaped() -> None:
    evil = "x'/><alias name='pwn"
    with pytest.raises(InvalidRequest):
        selector_from(alias=evil, target=None, mac=None, xml=None)


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = DetachSettings()
    assert (s.attempts, s.timeout) == (8, 20.0)
    monkeypatch.setenv("AIODETACH_ATTEMPTS", "3")
    monkeypatch.setenv("AIODETACH_TIMEOUT", "1.5")
    s = DetachSettings()
    assert (s.attempts, s.timeout) == (3, 1.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempts", 0),
        ("attempts", -1),
        ("attempts", "many"),
        ("timeout", 0),
        ("timeout", -1.0),
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("reconnect_timeout", math.inf),
    ],
)
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        DetachSettings(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)


def test_settings_env_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIODETACH_TIMEOUT", "nan")
    with pytest.raises(ValidationError, match="timeout"):
        DetachSettings()


def test_result_is_frozen() -> None:
    r = DetachResult(
        domain_uuid="u",
        domain_name="n",
        alias="a",
        device="disk",
        live=True,
        persistent=False,
        attempts=1,
        elapsed=0.1,
    )
    with pytest.raises(ValidationError):
        r.attempts = 2


def test_errors_carry_context_and_pickle() -> None:
    err = DetachTimeout("gave up", domain="vm", alias="ua-d", attempts=8, timeout=20.0)
    assert "domain='vm'" in str(err)
    assert "alias='ua-d'" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, DetachTimeout)
    assert (again.domain, again.alias, again.attempts) == ("vm", "ua-d", 8)
    assert isinstance(err, TimeoutError)


@pytest.mark.parametrize(
    ("code", "origin", "message", "expected"),
    [
        (ErrorCode.NO_DOMAIN, 0, "Domain not found", DomainNotFound),
        (ErrorCode.DEVICE_MISSING, 0, "device not found: disk vdz not found", DeviceNotFound),
        (
            ErrorCode.INTERNAL_ERROR,
            10,
            "internal error: no device found with alias x",
            DeviceNotFound,
        ),
        (
            ErrorCode.OPERATION_INVALID,
            10,
            "Requested operation is not valid: domain is not running",
            DomainNotRunning,
        ),
        (ErrorCode.XML_DETAIL, 0, "XML error", InvalidRequest),
        (ErrorCode.OPERATION_DENIED, 0, "read only access prevents", ReadOnlyConnection),
        (
            ErrorCode.OPERATION_FAILED,
            10,
            "device cannot be detached: device is busy",
            DetachRefused,
        ),
        (ErrorCode.INTERNAL_ERROR, 10, "Bus 'pci.0' does not support hotplugging", DetachRefused),
        (ErrorCode.INTERNAL_ERROR, ErrorDomain.RPC, "client socket is closed", ConnectionLost),
        (ErrorCode.SYSTEM_ERROR, 0, "Failed to connect socket", ConnectionLost),
        (ErrorCode.INTERNAL_ERROR, 10, "something else", HypervisorError),
        (
            ErrorCode.OPERATION_FAILED,
            10,
            "operation failed: unplug of device was rejected by the guest",
            DetachFailed,
        ),
    ],
)
def test_error_mapping(code: int, origin: int, message: str, expected: type) -> None:
    err = map_error(BackendError(code, message, origin=origin), domain="vm", alias="a", action="x")
    assert type(err) is expected
    assert err.libvirt_code == code
    assert message in str(err)


def test_in_progress_and_connection_predicates() -> None:
    in_progress = BackendError(
        ErrorCode.INTERNAL_ERROR,
        "unable to execute QEMU command 'device_del': Device ua-disk2 is already in the "
        "process of unplug",
        origin=ErrorDomain.QEMU,
    )
    busy = BackendError(
        ErrorCode.INTERNAL_ERROR, "Hot-unplug failed: guest is busy (power indicator blinking)"
    )
    assert is_in_progress(in_progress)
    assert is_in_progress(busy)
    assert not is_connection_error(in_progress)
    assert not is_in_progress(BackendError(ErrorCode.INTERNAL_ERROR, "no device found"))


def test_parse_batch_lines() -> None:
    from aiodetach._cli import parse_batch

    text = """
    # a comment
    vm-1 alias=ua-disk1
    vm-2 target=vdb persistent=false
    {"domain": "vm-3", "mac": "52:54:00:12:34:56", "live": true}
    """
    assert parse_batch(text) == [
        {"domain": "vm-1", "alias": "ua-disk1"},
        {"domain": "vm-2", "target": "vdb", "persistent": False},
        {"domain": "vm-3", "mac": "52:54:00:12:34:56", "live": True},
    ]
    for bad in ("vm-1 alias", "vm-1 live=maybe", "{not json", "[1, 2]"):
        with pytest.raises(InvalidRequest):
            parse_batch(bad)


def test_exit_codes_are_distinct_per_class() -> None:
    from aiodetach._cli import EXIT_CODES, exit_code_for
    from aiodetach.errors import DetachFailed, DomainStopped

    codes = [code for _cls, code in EXIT_CODES]
    assert len(set(codes)) >= 10
    assert exit_code_for(DetachFailed("x")) == 6
    assert exit_code_for(DomainStopped("x")) == 5


async def test_result_descriptions_per_device_kind_and_selector() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.05))
    dom.add_interface("52:54:00:AA:BB:CC", alias="ua-n", unplug=Unplug.later(0.05))
    dom.add_hostdev("0x05", alias="ua-h", unplug=Unplug.later(0.05))
    async with DetachService(backend=fake, log=False) as svc:
        r = await asyncio.gather(
            svc.detach("vm", alias="ua-d"),
            svc.detach("vm", target="vdb"),
            svc.detach("vm", alias="ua-n"),
            svc.detach("vm", mac="52:54:00:aa:bb:cc"),
            svc.detach("vm", alias="ua-h"),
        )
    assert [x.device for x in r] == [
        "disk target='vdb' alias='ua-d'",
        "disk target='vdb' alias='ua-d'",
        "interface mac='52:54:00:aa:bb:cc' alias='ua-n'",
        "interface mac='52:54:00:aa:bb:cc' alias='ua-n'",
        "hostdev alias='ua-h'",
    ]
    assert r[1].joined
    assert r[3].joined
    assert len(fake.requests) == 3
