"""The remote driver's TLS transport (``qemu+tls://``), as production agents reach hosts.

A private libvirtd listens on TLS on 127.0.0.1 with a CA, server and client
certificates this module makes itself (:mod:`aiodetach_lab.pki`); the server
certificate names 127.0.0.1, so the client verifies it as it would a
production host's (no ``no_verify``), and the daemon requires a client
certificate signed by its CA.  Clients choose their certificates with
``?pkipath=DIR``.  Detaches work through a URI and through a ``connect=``
factory; a client whose certificate does not verify gets
:class:`AuthenticationFailed` naming the URI and libvirt's reason after one
connect attempt, and a reconnect that meets such a refusal retries a bounded
number of times, with backoff.  A read-only connection watches; it cannot
detach.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid as _uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings, DeviceEvent, install_event_loop
from aiodetach.errors import AuthenticationFailed, ConnectionLost, ReadOnlyConnection
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd
from aiodetach_lab.pki import Authority, make_authority

from .._real import domains_removed, live_xml, quiet

DISKS = [
    _lab.DiskSpec("sda", "scsi", alias="ua-s0"),
    _lab.DiskSpec("sdb", "scsi", alias="ua-s1"),
    _lab.DiskSpec("sdc", "scsi", alias="ua-s2"),
]
_CHECKOUT = hashlib.sha256(str(Path(__file__).resolve().parents[3]).encode()).hexdigest()[:8]
ROOT = Path(os.environ.get("AIODETACH_TLS_LIBVIRTD", f"/tmp/robust/daemon-tls-{_CHECKOUT}"))


@dataclass(frozen=True)
class Tls:
    daemon: PrivateLibvirtd
    ca: Authority
    other_ca: Authority
    client: Path
    """pkipath of a client with a certificate of the daemon's CA."""

    def uri(self, pkipath: Path | None = None) -> str:
        return self.daemon.tls_uri(pkipath or self.client)


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    if os.geteuid() != 0:
        pytest.skip("the private libvirtd runs QEMU as uid nobody: needs root")
    shutil.rmtree(ROOT / "pki", ignore_errors=True)
    ca = make_authority(ROOT / "pki" / "ca")
    other_ca = make_authority(ROOT / "pki" / "other-ca", "a CA the daemon does not trust")
    server = ca.server(ROOT / "pki" / "server", owner=(65534, 65534))
    client = ca.client(ROOT / "pki" / "client")
    daemon = PrivateLibvirtd(ROOT / "daemon", tls=server)
    daemon.stop()  # leftovers of a crashed run
    try:
        daemon.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start a TLS libvirtd: {exc}")
    try:
        yield Tls(daemon, ca, other_ca, client)
    finally:
        daemon.stop()


@pytest.fixture
async def guest(tls: Tls) -> AsyncIterator[tuple[str, str]]:
    """An OS-less guest with SCSI disks (their unplug needs no guest OS): (name, UUID)."""
    name = f"tls-{_uuid.uuid4().hex[:6]}"
    uuid = await asyncio.to_thread(tls.daemon.define, name, DISKS)
    with domains_removed(tls.daemon.uri, [uuid]):
        yield name, uuid


class _Counted:
    """A ``connect=`` factory opening ``uri``; counts its calls."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.calls = 0

    def __call__(self) -> libvirt.virConnect:
        self.calls += 1
        return libvirt.open(self.uri)


async def test_detaches_over_tls_by_uri_and_by_factory(tls: Tls, guest: tuple[str, str]) -> None:
    name, uuid = guest
    settings = DetachSettings(attempts=2, timeout=20.0)
    async with DetachService(tls.uri(), settings=settings) as svc:
        assert svc.uri == tls.uri()
        by_uri = await svc.detach(name, alias="ua-s0")
    factory = _Counted(tls.uri())
    settings = DetachSettings(attempts=2, timeout=20.0, connections=2)
    async with DetachService(connect=factory, settings=settings) as svc:
        assert factory.calls == 2
        assert svc.uri.startswith(f"qemu+tls://127.0.0.1:{tls.daemon.tls_port}/session")
        by_factory = await svc.detach(uuid, alias="ua-s1")
    assert (by_uri.confirmed_by, by_uri.attempts) == ("event", 1)
    assert (by_factory.confirmed_by, by_factory.attempts) == ("event", 1)
    xml = await asyncio.to_thread(live_xml, tls.daemon.uri, uuid)
    assert "'ua-s0'" not in xml
    assert "'ua-s1'" not in xml
    assert "'ua-s2'" in xml


def _client_without_trust(tls: Tls, kind: str) -> Path:
    """A client pkipath that cannot connect: ``foreign`` (a certificate of
    another CA, which the server refuses), ``untrusted-server`` (the client
    trusts another CA only, so it refuses the server), ``wrong-ca`` (our
    certificate, checked against another CA by the client itself),
    ``no-cert`` (the CA certificate only)."""
    where = ROOT / "pki" / f"client-{kind}"
    shutil.rmtree(where, ignore_errors=True)
    if kind == "foreign":
        tls.other_ca.client(where)
        both = tls.other_ca.cert.read_bytes() + tls.ca.cert.read_bytes()
        (where / "cacert.pem").write_bytes(both)
        return where
    if kind == "untrusted-server":
        return tls.other_ca.client(where)
    if kind == "wrong-ca":
        return tls.ca.client(where, with_ca=tls.other_ca.cert)
    where.mkdir(parents=True)
    (where / "cacert.pem").write_bytes(tls.ca.cert.read_bytes())
    return where


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("foreign", "TLS"),
        ("untrusted-server", "Failed to verify peer's certificate"),
        ("wrong-ca", "failed validation"),
        ("no-cert", "TLS"),
    ],
)
async def test_a_client_without_a_valid_certificate_gets_a_typed_error(
    tls: Tls, kind: str, why: str
) -> None:
    uri = tls.uri(_client_without_trust(tls, kind))
    factory = _Counted(uri)
    for svc in (
        DetachService(uri, settings=DetachSettings(connections=4)),
        DetachService(connect=factory, settings=DetachSettings(connections=4)),
    ):
        with pytest.raises(AuthenticationFailed) as info:
            await svc.open()
        err = info.value
        assert isinstance(err, ConnectionLost)
        assert why in str(err)
        assert err.libvirt_code is not None
        named = uri if svc.uri == uri else "_Counted()"  # a factory is named by itself
        assert f"connect to {named} failed" in str(err)
    assert factory.calls == 1  # one attempt: open() does not retry


async def test_a_reconnect_refused_for_its_certificate_is_bounded_and_spaced(
    tls: Tls, guest: tuple[str, str]
) -> None:
    """The daemon restarts while the client's certificate was replaced by one
    it does not trust: the reconnect is refused every time, retried with
    backoff until ``reconnect_timeout``, then the detach gets ConnectionLost
    with libvirt's reason."""
    name = guest[0]
    pkipath = ROOT / "pki" / "client-rotated"
    shutil.rmtree(pkipath, ignore_errors=True)
    shutil.copytree(tls.client, pkipath)
    factory = _Counted(tls.uri(pkipath))
    settings = DetachSettings(
        attempts=1, timeout=20.0, connections=1, reconnect_timeout=8.0, reconnect_backoff_max=1.0
    )
    try:
        async with DetachService(connect=factory, settings=settings) as svc:
            assert factory.calls == 1
            foreign = _client_without_trust(tls, "foreign")
            for pem in ("clientcert.pem", "clientkey.pem"):
                shutil.copy(foreign / pem, pkipath / pem)
            await asyncio.to_thread(tls.daemon.kill)
            await asyncio.to_thread(tls.daemon.start)
            with pytest.raises(ConnectionLost) as info:
                await svc.detach(name, alias="ua-s2")
            assert "certificate" in str(info.value)
            assert svc.reconnects == 0
            # backoff 0.05 s doubling up to 1 s over 8 s: about a dozen, never a tight loop
            attempts = factory.calls - 1
            print(f"reconnect attempts refused for their certificate in 8 s: {attempts}")
            assert 2 <= attempts <= 20, attempts
    finally:
        if tls.daemon.pid is None:
            await asyncio.to_thread(tls.daemon.start)


async def test_a_read_only_connection_watches_and_cannot_detach(
    tls: Tls, guest: tuple[str, str]
) -> None:
    name, uuid = guest
    settings = DetachSettings(attempts=1, timeout=20.0)
    async with (
        DetachService(tls.uri(), read_only=True, settings=settings) as watcher,
        DetachService(tls.uri(), settings=settings) as detacher,
    ):
        seen: list[DeviceEvent] = []

        async def watch() -> None:
            async for event in watcher.events(name):
                seen.append(event)
                return

        watching = asyncio.create_task(watch())
        await asyncio.sleep(0)  # the watcher's queue is registered
        with pytest.raises(ReadOnlyConnection) as info:
            await watcher.detach(name, alias="ua-s2")
        assert tls.uri() in str(info.value)
        await detacher.detach(name, alias="ua-s2")
        await asyncio.wait_for(watching, 30)
        assert (seen[0].domain_uuid, seen[0].alias) == (uuid, "ua-s2")


async def test_a_read_only_connection_from_a_factory_is_refused_by_libvirt(
    tls: Tls, guest: tuple[str, str]
) -> None:
    """The service cannot know a factory's connection is read-only; libvirt
    refuses the detach, and the error says it is the connection's rights."""
    name, uuid = guest
    quiet()
    settings = DetachSettings(attempts=1, timeout=20.0, connections=1)

    def read_only() -> libvirt.virConnect:
        return libvirt.openReadOnly(tls.uri())

    async with DetachService(connect=read_only, settings=settings) as svc:
        with pytest.raises(ReadOnlyConnection) as info:
            await svc.detach(name, alias="ua-s1")
    assert "read only" in str(info.value) or "read-only" in str(info.value)
    assert info.value.domain == name
    xml = await asyncio.to_thread(live_xml, tls.daemon.uri, uuid)
    assert "'ua-s1'" in xml


async def test_a_callers_tls_connection_keeps_its_close_callback_and_stays_open(
    tls: Tls, guest: tuple[str, str]
) -> None:
    """The caller's connection, opened after an event implementation was
    registered (see docs/event-loops.md), with a close callback of its own:
    the service detaches through it (confirmed by the event), leaves the
    caller's close callback in place, and never closes the connection."""
    name, _ = guest
    quiet()
    install_event_loop()
    conn = await asyncio.to_thread(libvirt.open, tls.uri())
    closes: list[int] = []
    conn.registerCloseCallback(lambda _c, reason, _o: closes.append(reason), None)
    try:
        settings = DetachSettings(attempts=1, timeout=20.0, connections=4)
        async with DetachService(connection=conn, settings=settings) as svc:
            assert svc.uri == tls.uri()
            result = await svc.detach(name, alias="ua-s0")
        assert (result.confirmed_by, result.attempts) == ("event", 1)
        assert conn.isAlive()
        assert conn.lookupByName(name).name() == name
        with pytest.raises(libvirt.libvirtError, match="already registered"):
            conn.registerCloseCallback(lambda *_a: None, None)  # the caller's is still there
    finally:
        conn.unregisterCloseCallback()
        conn.close()
    assert closes == []
