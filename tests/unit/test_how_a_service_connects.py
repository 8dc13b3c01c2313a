"""How a service is told to reach libvirt: ``uri``, ``connect`` or ``connection``.

Checked before anything is opened (a typed :class:`InvalidRequest`), and the
URI a service reports before it connected.  What the three do against a
libvirt is in tests/testdriver/test_caller_connections.py; a reconnect that
no retry can help (a caller's connection that died) on the fake here.
"""

from __future__ import annotations

import asyncio

import libvirt
import pytest

from _probes import until
from aiodetach import DetachService, DetachSettings
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import ConnectionLost, InvalidRequest
from aiodetach.testing import FakeHypervisor, Unplug


def _factory() -> libvirt.virConnect:
    raise AssertionError("never called: the service is never opened here")


class _NotAConnection:
    pass


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"uri": "test:///default", "connect": _factory}, "uri and connect"),
        ({"uri": "test:///default", "connection": "conn"}, None),
        ({"connect": _factory, "backend": "fake"}, "backend"),
    ],
)
def test_two_ways_to_connect_are_refused(kwargs: dict[str, object], names: str | None) -> None:
    if kwargs.get("backend") == "fake":
        kwargs["backend"] = FakeHypervisor()
    with pytest.raises(InvalidRequest) as info:
        DetachService(**kwargs)  # type: ignore[arg-type]
    if names is not None:
        assert names in str(info.value)


def test_a_connection_and_a_factory_together_are_refused() -> None:
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(InvalidRequest, match="connect and connection"):
            DetachService(connect=_factory, connection=conn)
        with pytest.raises(InvalidRequest, match="uri and connection"):
            DetachService("test:///default", connection=conn)
        with pytest.raises(InvalidRequest, match="backend"):
            DetachService(connection=conn, backend=FakeHypervisor())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uri": ""},
        {"uri": 42},
        {"connect": "test:///default"},
        {"connection": _NotAConnection()},
        {"connection": "test:///default"},
    ],
)
def test_ways_to_connect_of_the_wrong_type_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        DetachService(**kwargs)  # type: ignore[arg-type]


def test_without_a_uri_the_service_names_libvirts_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert DetachService().uri == "test:///default"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI")
    assert DetachService().uri == "libvirt's default URI"
    assert DetachService("qemu+ssh://h/system").uri == "qemu+ssh://h/system"


def test_a_factory_is_named_by_its_name_until_connected() -> None:
    def open_with_my_credentials() -> libvirt.virConnect:
        raise AssertionError("not opened here")

    uri = DetachService(connect=open_with_my_credentials).uri
    assert uri.endswith("open_with_my_credentials()")


async def test_a_reconnect_no_retry_can_help_gives_up_at_once(fake: FakeHypervisor) -> None:
    """A backend saying an open is *final* (a caller's connection that died:
    nobody but the caller can re-open it) is asked once, not retried until
    ``reconnect_timeout``; the waiting detach gets ConnectionLost saying why."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(timeout=30, reconnect_timeout=3, reconnect_backoff_max=0.05)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await until(lambda: len(fake.requests) == 1, 5, "the request")
        opens_before = fake.calls.count("open")
        fake.fail_next["open"] = BackendError(
            ErrorCode.NO_CONNECT, "the caller's connection is closed", final=True
        )
        fake.crash()  # and the daemon stays down: a retry would fail as well
        with pytest.raises(ConnectionLost) as info:
            await task
        assert "the caller's connection is closed" in str(info.value)
        assert "gone for good" in str(info.value)
        assert fake.calls.count("open") == opens_before + 1
