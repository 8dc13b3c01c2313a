"""Connections the caller provides, on libvirt's test driver.

``connect=`` (a factory: called for every connection the service opens, and
again on every reconnect; what it returns the service closes), ``connection=``
(the caller's own, open connection: used, never closed), ``openAuth`` with a
credentials callback (the test driver asks for a user name and password when
its node XML has an ``<auth>`` element), and ``LIBVIRT_DEFAULT_URI`` naming
the hypervisor when no URI is given.

The test driver refuses the live detach itself (``DetachRefused``): that
answer shows the call went through the connection under test.  A reconnect
is forced as in test_lanes.py: one read fails with the error libvirt's client
gives for a socket the daemon closed.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import AuthenticationFailed, ConnectionLost, DetachRefused, HypervisorError

TEST_URI = "test:///default"
_NODE_WITH_AUTH = """<node>
  <auth><user password="s3cret">agent</user></auth>
  <domain type="test">
    <name>vm</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type="file" device="disk">
        <source file="/var/lib/vm-vdb.img"/>
        <target dev="vdb" bus="virtio"/>
      </disk>
    </devices>
  </domain>
</node>
"""


def _error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, 2, "", None, None, 0, 0)
    return err


@pytest.fixture
def drop_one_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next ``XMLDesc`` fails as on a connection the daemon closed (once
    per ``arm``: append to the returned list)."""
    armed: list[int] = []
    original = libvirt.virDomain.XMLDesc

    def xmldesc(dom: libvirt.virDomain, flags: int = 0) -> str:
        if armed:
            armed.pop()
            raise _error(
                libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "client socket is closed"
            )
        return str(original(dom, flags))

    monkeypatch.setattr(libvirt.virDomain, "XMLDesc", xmldesc)
    return armed


class _Factory:
    """A ``connect=`` factory that keeps what it opened."""

    def __init__(self, uri: str = TEST_URI) -> None:
        self.uri = uri
        self.opened: list[libvirt.virConnect] = []

    def __call__(self) -> libvirt.virConnect:
        conn = libvirt.open(self.uri)
        self.opened.append(conn)
        return conn


def _closed(conn: libvirt.virConnect) -> bool:
    try:
        conn.isAlive()
    except libvirt.libvirtError:
        return True  # libvirt-python drops the pointer of a closed connection
    return False


async def test_a_factory_opens_every_lane_and_again_on_a_reconnect(
    test_uri: str, drop_one_read: list[int]
) -> None:
    factory = _Factory(test_uri)
    settings = DetachSettings(attempts=1, timeout=1, connections=2, reconnect_backoff_max=0.1)
    async with DetachService(connect=factory, settings=settings) as svc:
        assert len(factory.opened) == 2
        assert svc.uri == test_uri  # the connected URI: no uri was given
        with pytest.raises(DetachRefused):
            await svc.detach("test", target="vda")
        drop_one_read.append(1)
        with pytest.raises(DetachRefused):  # the read is asked again after the reconnect
            await svc.detach("test", target="vda")
        assert svc.reconnects == 1
        assert len(factory.opened) == 4
        assert [_closed(c) for c in factory.opened] == [True, True, False, False]
    assert all(_closed(c) for c in factory.opened)


async def test_a_callers_connection_is_used_and_left_open(
    test_uri: str, drop_one_read: list[int]
) -> None:
    conn = libvirt.open(test_uri)
    try:
        settings = DetachSettings(attempts=1, timeout=1, connections=4, reconnect_backoff_max=0.1)
        async with DetachService(connection=conn, settings=settings) as svc:
            assert svc.uri == test_uri
            with pytest.raises(DetachRefused):
                await svc.detach("test", target="vda")
            # A loss the connection itself survived: it is taken up again, not replaced.
            drop_one_read.append(1)
            with pytest.raises(DetachRefused):
                await svc.detach("test", target="vda")
            assert svc.reconnects == 1
        # The caller goes on using it after the service closed.
        assert conn.isAlive()
        assert conn.lookupByName("test").name() == "test"
    finally:
        conn.close()


async def test_a_callers_connection_that_died_is_not_reopened(
    test_uri: str, drop_one_read: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = libvirt.open(test_uri)
    opens: list[str | None] = []
    original_open = libvirt.open

    def counting_open(uri: str | None = None) -> libvirt.virConnect:
        opens.append(uri)
        return original_open(uri)

    try:
        settings = DetachSettings(attempts=1, timeout=1, reconnect_timeout=3)
        async with DetachService(connection=conn, settings=settings) as svc:
            monkeypatch.setattr(libvirt, "open", counting_open)
            asked: list[int] = []

            def dead() -> int:
                asked.append(1)
                return 0

            monkeypatch.setattr(conn, "isAlive", dead)
            drop_one_read.append(1)
            with pytest.raises(ConnectionLost) as info:
                await svc.detach("test", target="vda")
            assert test_uri in str(info.value)
            assert "never re-opens a caller's connection" in str(info.value)
            assert asked == [1]  # asked once: no retry can revive it
            assert opens == []  # and no connection of its own instead
            with pytest.raises(ConnectionLost):  # later calls too, at once
                await svc.detach("test", target="vda")
        monkeypatch.undo()
        assert conn.isAlive()
    finally:
        conn.close()


@pytest.fixture
def node_with_auth(tmp_path: Path) -> str:
    node = tmp_path / "node.xml"
    node.write_text(_NODE_WITH_AUTH)
    return f"test://{node}"


async def test_open_auth_with_a_credentials_callback(node_with_auth: str) -> None:
    asked: list[int] = []

    def credentials(creds: list[list[object]], _data: object) -> int:
        for cred in creds:
            asked.append(int(str(cred[0])))
            if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                cred[4] = "agent"
            elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                cred[4] = "s3cret"
        return 0

    def connect() -> libvirt.virConnect:
        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], credentials, None]
        return libvirt.openAuth(node_with_auth, auth, 0)

    settings = DetachSettings(attempts=1, timeout=1, connections=1)
    async with DetachService(connect=connect, settings=settings) as svc:
        assert svc.uri == node_with_auth
        with pytest.raises(DetachRefused):
            await svc.detach("vm", target="vdb")
    assert asked == [libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE]


async def test_a_wrong_password_is_a_typed_error_naming_the_uri(node_with_auth: str) -> None:
    def wrong(creds: list[list[object]], _data: object) -> int:
        for cred in creds:
            cred[4] = "agent" if cred[0] == libvirt.VIR_CRED_AUTHNAME else "guessed"
        return 0

    def connect() -> libvirt.virConnect:
        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], wrong, None]
        return libvirt.openAuth(node_with_auth, auth, 0)

    svc = DetachService(connect=connect, settings=DetachSettings(connections=1))
    with pytest.raises(ConnectionLost) as info:
        await svc.open()
    assert "connect()" in str(info.value)
    assert "authentication failed" in str(info.value)
    assert isinstance(info.value, AuthenticationFailed)


async def test_libvirt_default_uri_names_the_hypervisor_without_a_uri(
    test_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", test_uri)
    opened: list[str | None] = []
    original_open = libvirt.open

    def recording_open(uri: str | None = None) -> libvirt.virConnect:
        opened.append(uri)
        return original_open(uri)

    monkeypatch.setattr(libvirt, "open", recording_open)
    async with DetachService(settings=DetachSettings(attempts=1, timeout=1)) as svc:
        assert svc.uri == test_uri
        with pytest.raises(DetachRefused):
            await svc.detach("test", target="vda")
    assert opened
    assert set(opened) == {None}


async def test_a_factory_returning_no_connection_fails_the_open(test_uri: str) -> None:
    def not_a_connection() -> libvirt.virConnect:
        return "test:///default"  # type: ignore[return-value]

    svc = DetachService(connect=not_a_connection)
    with pytest.raises(HypervisorError) as info:
        await svc.open()
    assert "not a libvirt.virConnect" in str(info.value)
    assert "connect to " in str(info.value)


async def test_a_callers_connection_closed_before_open_is_a_typed_error(test_uri: str) -> None:
    conn = libvirt.open(test_uri)
    conn.close()
    svc = DetachService(connection=conn)
    with pytest.raises(ConnectionLost) as info:
        await svc.open()
    assert "it is closed" in str(info.value)
    assert "never re-opens a caller's connection" in str(info.value)


async def test_a_keepalive_answer_lost_by_libvirt_python_is_asked_again(
    test_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirt-python reads libvirt's per-thread error after the call; a
    finalizer in between resets it, and the failure comes without a code.
    The open asks again and gets the real answer (the test driver has no
    keepalive: fine), instead of failing the open."""
    original = libvirt.virConnect.setKeepAlive
    lost: list[int] = []

    def once_without_a_code(conn: libvirt.virConnect, interval: int, count: int) -> int:
        if not lost:
            lost.append(1)
            err = libvirt.libvirtError("virConnectSetKeepAlive() failed")
            err.err = None
            raise err
        return int(original(conn, interval, count))

    monkeypatch.setattr(libvirt.virConnect, "setKeepAlive", once_without_a_code)
    settings = DetachSettings(attempts=1, timeout=1, connections=1)
    async with DetachService(connect=_Factory(test_uri), settings=settings) as svc:
        with pytest.raises(DetachRefused):
            await svc.detach("test", target="vda")
    assert lost == [1]
