"""Bad input, table-driven, on the real system libvirtd (read-only use of it).

Each bad input must raise a typed error whose message names what was wrong,
and leave the domain exactly as it was (live and persistent XML compared).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import ErrorCode
from aiodetach.errors import (
    ConnectionLost,
    DetachError,
    DetachRefused,
    DeviceNotFound,
    DomainNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    InvalidRequest,
    ReadOnlyConnection,
)
from aiodetach_lab import domains as _lab

from .._real import live_xml

MAC = "52:54:00:aa:bb:01"
DISKS = [_lab.DiskSpec("sda", "scsi", "ua-s1"), _lab.DiskSpec("vdb", "virtio", "ua-v1")]
NICS = [_lab.NicSpec(MAC, "ua-n1")]

# (id, detach keyword arguments, domain: "running"/"off"/"transient"/name, error, words)
CASES: list[tuple[str, dict[str, Any], str, type[DetachError], tuple[str, ...]]] = [
    ("unknown-domain", {"alias": "ua-s1"}, "no-such-domain-x1", DomainNotFound, ("no-such",)),
    (
        "unknown-uuid",
        {"alias": "ua-s1"},
        "6f1e3a52-0000-4000-8000-000000000000",
        DomainNotFound,
        ("6f1e3a52",),
    ),
    ("unknown-alias", {"alias": "ua-nope"}, "running", DeviceNotFound, ("ua-nope",)),
    ("unknown-target", {"target": "vdz"}, "running", DeviceNotFound, ("vdz",)),
    (
        "unknown-mac",
        {"mac": "52:54:00:00:00:99"},
        "running",
        DeviceNotFound,
        ("52:54:00:00:00:99",),
    ),
    ("bad-mac", {"mac": "52:54:00:zz"}, "running", InvalidRequest, ("52:54:00:zz",)),
    ("not-hot-unpluggable", {"alias": "pci.0"}, "running", DetachRefused, ("pci.0",)),
    (
        "malformed-xml",
        {"xml": "<disk><target dev='vdb'>"},
        "running",
        InvalidRequest,
        ("malformed",),
    ),
    (
        "xml-with-dtd",
        {"xml": "<!DOCTYPE d [<!ENTITY e 'x'>]><disk>&e;</disk>"},
        "running",
        InvalidRequest,
        ("DTD",),
    ),
    ("xml-unidentifiable", {"xml": "<disk/>"}, "running", InvalidRequest, ("<disk>",)),
    ("empty-alias", {"alias": "  "}, "running", InvalidRequest, ("alias", "empty")),
    ("non-string-alias", {"alias": 42}, "running", InvalidRequest, ("alias", "int")),
    ("alias-control-chars", {"alias": "ua-\x00s1"}, "running", InvalidRequest, ("alias",)),
    ("alias-with-space", {"alias": "ua s1"}, "running", InvalidRequest, ("ua s1",)),
    ("no-selector", {}, "running", InvalidRequest, ("exactly one",)),
    ("two-selectors", {"alias": "ua-s1", "target": "sda"}, "running", InvalidRequest, ("got 2",)),
    ("empty-domain", {"alias": "ua-s1"}, "", InvalidRequest, ("domain",)),
    ("non-string-domain", {"alias": "ua-s1"}, "<int>", InvalidRequest, ("int",)),
    (
        "nothing-to-do",
        {"alias": "ua-s1", "live": False, "persistent": False},
        "running",
        InvalidRequest,
        ("nothing",),
    ),
    ("live-not-bool", {"alias": "ua-s1", "live": "yes"}, "running", InvalidRequest, ("live",)),
    ("live-on-shut-off", {"alias": "ua-s1", "live": True}, "off", DomainNotRunning, ("shut-off",)),
    (
        "persistent-on-transient",
        {"alias": "ua-s1", "persistent": True},
        "transient",
        DomainNotPersistent,
        ("transient",),
    ),
]


@pytest.fixture(scope="module")
def domains(libvirtd: str) -> Iterator[dict[str, _lab.LabDomain]]:
    with (
        _lab.throwaway_domain(libvirtd, disks=DISKS, nics=NICS) as running,
        _lab.throwaway_domain(libvirtd, disks=DISKS, nics=NICS, start=False) as off,
        _lab.throwaway_domain(libvirtd, disks=DISKS, nics=NICS, persistent=False) as transient,
    ):
        yield {"running": running, "off": off, "transient": transient}


def _snapshot(uri: str, dom: _lab.LabDomain) -> tuple[str, str | None]:
    live = live_xml(uri, dom.uuid)
    try:
        inactive: str | None = live_xml(uri, dom.uuid, inactive=True)
    except Exception:  # a transient domain has no persistent definition
        inactive = None
    return live, inactive


@pytest.mark.parametrize(
    ("kwargs", "where", "error", "words"),
    [pytest.param(k, w, e, words, id=i) for i, k, w, e, words in CASES],
)
async def test_bad_input_is_typed_and_harmless(
    libvirtd: str,
    domains: dict[str, _lab.LabDomain],
    kwargs: dict[str, Any],
    where: str,
    error: type[DetachError],
    words: tuple[str, ...],
) -> None:
    target: Any = where
    if where in domains:
        target = domains[where].name
    elif where == "<int>":
        target = 42
    before = {k: await asyncio.to_thread(_snapshot, libvirtd, d) for k, d in domains.items()}
    async with DetachService(libvirtd, settings=DetachSettings(attempts=1, timeout=2.0)) as svc:
        with pytest.raises(error) as info:
            await asyncio.wait_for(svc.detach(target, **kwargs), 10)
        assert svc.pending() == []
    assert type(info.value) is error, repr(info.value)
    text = str(info.value)
    for word in words:
        assert word in text, text
    after = {k: await asyncio.to_thread(_snapshot, libvirtd, d) for k, d in domains.items()}
    assert after == before


BAD_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("attempts", {"attempts": 0}),
    ("attempts", {"attempts": -3}),
    ("timeout", {"timeout": 0}),
    ("timeout", {"timeout": -1.0}),
    ("timeout", {"timeout": math.nan}),
    ("timeout", {"timeout": math.inf}),
    ("reconnect_timeout", {"reconnect_timeout": math.inf}),
    ("max_threads", {"max_threads": 0}),
    ("bogus", {"bogus": 1}),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD_SETTINGS)
def test_invalid_settings_are_refused_naming_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        DetachSettings(**kwargs)
    assert field in str(info.value)


@pytest.mark.parametrize("uri", ["", "   "])
def test_empty_uri(uri: str) -> None:
    with pytest.raises(InvalidRequest, match="uri"):
        DetachService(uri)


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("bogus:///nothing", ConnectionLost),
        ("qemu:///session?socket=/tmp/robust/no-such-dir/libvirt-sock", ConnectionLost),
    ],
)
async def test_bad_or_unreachable_uri(uri: str, error: type[DetachError]) -> None:
    svc = DetachService(uri)
    with pytest.raises(error) as info:
        await asyncio.wait_for(svc.open(), 10)
    assert uri.split("?")[0] in str(info.value)
    await svc.aclose()


async def test_read_only_connection_refuses_detach(
    libvirtd: str, domains: dict[str, _lab.LabDomain]
) -> None:
    dom = domains["running"]
    before = await asyncio.to_thread(_snapshot, libvirtd, dom)
    async with DetachService(libvirtd, read_only=True) as svc:
        with pytest.raises(ReadOnlyConnection) as info:
            await svc.detach(dom.name, alias="ua-s1")
    assert "read-only" in str(info.value)
    assert info.value.alias == "ua-s1"
    assert await asyncio.to_thread(_snapshot, libvirtd, dom) == before


class _ReadOnlyBehindOurBack(LibvirtBackend):
    """A connection libvirt made read-only (ACL/polkit) although read-write was asked."""

    def open(self, sink: Any, *, read_only: bool) -> None:
        super().open(sink, read_only=True)


async def test_libvirt_read_only_refusal_is_read_only_connection(
    libvirtd: str, domains: dict[str, _lab.LabDomain]
) -> None:
    from aiodetach import install_event_loop

    install_event_loop()
    dom = domains["running"]
    before = await asyncio.to_thread(_snapshot, libvirtd, dom)
    try:
        async with DetachService(backend=_ReadOnlyBehindOurBack(libvirtd)) as svc:
            with pytest.raises(ReadOnlyConnection):
                await svc.detach(dom.name, alias="ua-s1")
    finally:
        assert await asyncio.to_thread(_snapshot, libvirtd, dom) == before


def test_error_codes_are_libvirts() -> None:
    import libvirt

    wrong = {
        code.name: (code.value, getattr(libvirt, f"VIR_ERR_{code.name}"))
        for code in ErrorCode
        if code.value != getattr(libvirt, f"VIR_ERR_{code.name}")
    }
    assert wrong == {}
