"""The real backend looks a domain up by UUID in every spelling libvirt reads
as a UUID, and :func:`aiodetach._rules.uuid_in` (which ``events()`` filters
with) reads exactly those, checked against libvirt's own parser on
``test:///default``."""

from __future__ import annotations

import asyncio
import re

import libvirt
import pytest

from aiodetach import install_event_loop
from aiodetach._libvirt import LibvirtBackend
from aiodetach._rules import uuid_in
from aiodetach.backend import BackendError, ErrorCode

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's domain "test"
READ_AS_UUID = [
    TEST_UUID.upper(),
    TEST_UUID.replace("-", ""),
    TEST_UUID.replace("-", "").upper(),
    "66-95-eb01f6a4830479aa97f2502e193f",
    TEST_UUID.replace("-", " "),
    f"  {TEST_UUID}  ",
]
NOT_A_UUID = [f"{{{TEST_UUID}}}", f"urn:uuid:{TEST_UUID}", TEST_UUID[:-1], TEST_UUID + "-"]


class _Sink:
    def device_removed(self, uuid: str, name: str, alias: str) -> None: ...
    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None: ...
    def domain_stopped(self, uuid: str, name: str, reason: str) -> None: ...
    def domain_resumed(self, uuid: str, name: str) -> None: ...
    def domain_rebooted(self, uuid: str, name: str) -> None: ...
    def connection_closed(self, reason: str) -> None: ...


def test_uuid_in_reads_what_libvirt_reads(test_uri: str) -> None:
    conn = libvirt.open(test_uri)
    try:
        for ref in READ_AS_UUID:
            assert conn.lookupByUUIDString(ref).UUIDString() == TEST_UUID
            assert uuid_in(ref) == TEST_UUID, ref
        for ref in NOT_A_UUID:
            with pytest.raises(libvirt.libvirtError) as info:
                conn.lookupByUUIDString(ref)
            assert info.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
            assert uuid_in(ref) is None, ref
    finally:
        conn.close()


async def test_the_backend_looks_up_every_spelling_of_a_uuid(test_uri: str) -> None:
    install_event_loop()  # the test driver's callbacks need a libvirt event loop
    backend = LibvirtBackend(test_uri, lanes=1)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    try:
        for ref in READ_AS_UUID:
            info = await asyncio.to_thread(backend.lookup, ref.strip())
            assert (info.uuid, info.name) == (TEST_UUID, "test"), ref
        with pytest.raises(BackendError) as missing:
            await asyncio.to_thread(backend.lookup, "00000000000000000000000000000000")
        assert missing.value.code == ErrorCode.NO_DOMAIN
    finally:
        await asyncio.to_thread(backend.close)


async def test_a_domain_named_like_a_uuid_is_found_by_its_name(test_uri: str) -> None:
    shaped = "0123456789abcdef0123456789abcdef"
    conn = libvirt.open(test_uri)
    xml = conn.lookupByName("test").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml).replace(
        "<name>test</name>", f"<name>{shaped}</name>"
    )
    dom = conn.defineXML(xml)
    install_event_loop()  # the test driver's callbacks need a libvirt event loop
    backend = LibvirtBackend(test_uri, lanes=1)
    try:
        await asyncio.to_thread(backend.open, _Sink(), read_only=False)
        info = await asyncio.to_thread(backend.lookup, shaped)
        assert (info.name, info.uuid) == (shaped, dom.UUIDString())
    finally:
        await asyncio.to_thread(backend.close)
        dom.undefine()
        conn.close()


async def test_a_number_is_a_running_domains_id_first_then_a_name(
    test_uri: str, test_id: str
) -> None:
    """As virsh reads it: ``detach("1", ...)`` is the domain running with ID 1;
    a number no running domain has is a name (a domain may be named "4242")."""
    install_event_loop()
    conn = libvirt.open(test_uri)
    named = conn.defineXML(
        conn.lookupByName("test")
        .XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        .replace("<name>test</name>", "<name>4242</name>")
        .replace(TEST_UUID, "6695eb01-f6a4-8304-79aa-97f2502e4242")
    )
    backend = LibvirtBackend(test_uri, lanes=1)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    try:
        by_id = await asyncio.to_thread(backend.lookup, test_id)
        assert (by_id.name, by_id.uuid) == ("test", TEST_UUID)
        by_name = await asyncio.to_thread(backend.lookup, "4242")
        assert by_name.name == "4242"
        with pytest.raises(BackendError) as info:
            await asyncio.to_thread(backend.lookup, "4243")
        assert info.value.code == ErrorCode.NO_DOMAIN
    finally:
        await asyncio.to_thread(backend.close)
        named.undefine()
        conn.close()
