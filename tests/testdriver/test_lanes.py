"""Connection lanes of :class:`LibvirtBackend` on libvirt's test driver.

Every call takes a connection ("lane") of its own for its whole duration, so
several calls run at once while no connection ever has two in flight (what
libvirt 9.0's client does not survive in a network partition, see
docs/libvirt-behaviour.md).  The test driver shares its state between the
connections of one process, so every lane sees the same ``test`` domain.

Calls are made slow (or held) by wrapping ``virDomain.XMLDesc``, which runs
inside the lane; ``_conn_of(dom)`` tells on which connection it runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings, install_event_loop
from aiodetach._errors_map import is_connection_error
from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import BackendError, ErrorCode, ErrorDomain
from aiodetach.errors import DetachRefused


class _Sink:
    def device_removed(self, uuid: str, name: str, alias: str) -> None: ...
    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None: ...
    def domain_stopped(self, uuid: str, name: str, reason: str) -> None: ...
    def domain_resumed(self, uuid: str, name: str) -> None: ...
    def domain_rebooted(self, uuid: str, name: str) -> None: ...
    def connection_closed(self, reason: str) -> None: ...


class _Opened:
    """Every libvirt connection opened, and every one the backend closed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.opened: list[libvirt.virConnect] = []
        self.closed: list[libvirt.virConnect] = []
        original_open = libvirt.open
        original_close = LibvirtBackend._close_conn

        def opening(uri: str) -> libvirt.virConnect:
            if fail_at is not None and len(self.opened) == fail_at:
                raise _libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, 0, "Connection refused")
            conn = original_open(uri)
            self.opened.append(conn)
            return conn

        def closing(conn: libvirt.virConnect, ids: list[int]) -> None:
            self.closed.append(conn)
            original_close(conn, ids)

        monkeypatch.setattr(libvirt, "open", opening)
        monkeypatch.setattr(LibvirtBackend, "_close_conn", staticmethod(closing))


def _libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, 2, "", None, None, 0, 0)
    return err


def _conn_of(dom: libvirt.virDomain) -> libvirt.virConnect:
    """The connection ``dom`` makes its calls on."""
    conn: libvirt.virConnect = dom.connect()  # type: ignore[no-untyped-call]
    return conn


class _Overlap:
    """Calls inside ``XMLDesc`` now and at most, in all and per connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: collections.Counter[int] = collections.Counter()
        self.most = 0
        self.most_per_conn: collections.Counter[int] = collections.Counter()

    def enter(self, conn: libvirt.virConnect) -> None:
        with self.lock:
            self.now[id(conn)] += 1
            self.most = max(self.most, sum(self.now.values()))
            self.most_per_conn[id(conn)] = max(self.most_per_conn[id(conn)], self.now[id(conn)])

    def leave(self, conn: libvirt.virConnect) -> None:
        with self.lock:
            self.now[id(conn)] -= 1


def _wrap_xmldesc(
    monkeypatch: pytest.MonkeyPatch, around: Callable[[libvirt.virDomain], Iterator[None]]
) -> None:
    original = libvirt.virDomain.XMLDesc

    def xmldesc(dom: libvirt.virDomain, flags: int = 0) -> str:
        gen = around(dom)
        next(gen)
        try:
            return original(dom, flags)
        finally:
            next(gen, None)

    monkeypatch.setattr(libvirt.virDomain, "XMLDesc", xmldesc)


@pytest.fixture
async def events(test_uri: str) -> str:
    install_event_loop()  # the test driver's events need a libvirt event loop
    return test_uri


async def test_every_lane_is_opened_and_closed(
    events: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _Opened(monkeypatch)
    backend = LibvirtBackend(events, lanes=3)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    assert len(seen.opened) == 3
    assert [lane.conn for lane in backend._lanes] == seen.opened
    assert backend._connection() is seen.opened[0]  # the callbacks' connection
    assert all(conn.isAlive() for conn in seen.opened)
    await asyncio.to_thread(backend.close)
    assert seen.closed == seen.opened
    assert all(lane.conn is None for lane in backend._lanes)
    with pytest.raises(BackendError) as info:
        await asyncio.to_thread(backend.lookup, "test")
    assert is_connection_error(info.value)


async def test_one_lane_is_one_connection(events: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _Opened(monkeypatch)
    backend = LibvirtBackend(events, lanes=1)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    try:
        info = await asyncio.to_thread(backend.lookup, "test")
        assert "<domain" in await asyncio.to_thread(backend.domain_xml, info.uuid, inactive=False)
    finally:
        await asyncio.to_thread(backend.close)
    assert len(seen.opened) == 1
    assert seen.closed == seen.opened


def test_lanes_out_of_range_are_refused() -> None:
    for lanes in (0, 17):
        with pytest.raises(ValueError, match="lanes"):
            LibvirtBackend("test:///default", lanes=lanes)


async def test_calls_overlap_across_lanes_never_on_one(
    events: str, second_domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlap = _Overlap()

    def slow(dom: libvirt.virDomain) -> Iterator[None]:
        overlap.enter(_conn_of(dom))
        time.sleep(0.05)
        yield
        overlap.leave(_conn_of(dom))

    lanes = 4
    backend = LibvirtBackend(events, lanes=lanes)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    try:
        uuids = [(await asyncio.to_thread(backend.lookup, "test")).uuid, second_domain]
        _wrap_xmldesc(monkeypatch, slow)
        # More callers than lanes, each in a thread of its own, about two
        # domains (one domain alone never gets every lane).
        xmls = await asyncio.gather(
            *(
                asyncio.to_thread(backend.domain_xml, uuids[i % 2], inactive=False)
                for i in range(12)
            )
        )
    finally:
        await asyncio.to_thread(backend.close)
    assert all("<domain" in xml for xml in xmls)
    assert overlap.most == lanes
    assert len(overlap.most_per_conn) == lanes
    assert set(overlap.most_per_conn.values()) == {1}


async def test_close_waits_for_the_calls_in_flight(
    events: str, second_domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _Opened(monkeypatch)
    release = threading.Event()
    inside = threading.Semaphore(0)
    order: list[str] = []

    def held(dom: libvirt.virDomain) -> Iterator[None]:
        inside.release()
        release.wait(10)
        yield
        order.append(f"returned on {seen.opened.index(_conn_of(dom))}")

    backend = LibvirtBackend(events, lanes=2)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    uuid = (await asyncio.to_thread(backend.lookup, "test")).uuid
    _wrap_xmldesc(monkeypatch, held)
    calls = [
        asyncio.to_thread(backend.domain_xml, one, inactive=False) for one in (uuid, second_domain)
    ]
    running = asyncio.gather(*calls)
    for _ in range(2):
        assert await asyncio.to_thread(inside.acquire, True, 5)
    original_close = LibvirtBackend._close_conn

    def closing(conn: libvirt.virConnect, ids: list[int]) -> None:
        order.append(f"closed {seen.opened.index(conn)}")
        original_close(conn, ids)

    monkeypatch.setattr(LibvirtBackend, "_close_conn", staticmethod(closing))
    closed = asyncio.ensure_future(asyncio.to_thread(backend.close))
    await asyncio.sleep(0.2)
    assert not closed.done()
    assert order == []
    release.set()
    await asyncio.wait_for(closed, 5)
    await running
    assert order.index("closed 0") > order.index("returned on 0")
    assert order.index("closed 1") > order.index("returned on 1")


@pytest.mark.parametrize("fail_at", [1, 2])
async def test_a_lane_that_fails_to_open_leaves_nothing_open(
    events: str, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    seen = _Opened(monkeypatch, fail_at=fail_at)
    backend = LibvirtBackend(events, lanes=3)
    with pytest.raises(BackendError) as info:
        await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    assert info.value.code == libvirt.VIR_ERR_SYSTEM_ERROR
    assert len(seen.opened) == fail_at
    assert sorted(map(id, seen.closed)) == sorted(map(id, seen.opened))
    assert all(lane.conn is None for lane in backend._lanes)
    # And the backend opens again afterwards (what a reconnect does).
    monkeypatch.undo()
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    try:
        assert all(lane.conn is not None for lane in backend._lanes)
    finally:
        await asyncio.to_thread(backend.close)


async def test_a_lane_that_fails_to_set_keepalive_leaves_nothing_open(
    events: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _Opened(monkeypatch)
    calls = 0

    def keepalive(conn: libvirt.virConnect, interval: int, count: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first extra lane's
            raise _libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, 0, "cannot send data")
        raise _libvirt_error(libvirt.VIR_ERR_NO_SUPPORT, 0, "no keepalive")

    monkeypatch.setattr(libvirt.virConnect, "setKeepAlive", keepalive)
    backend = LibvirtBackend(events, lanes=3)
    with pytest.raises(BackendError):
        await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    assert calls == 2  # every lane sets keepalive as the first does
    assert len(seen.opened) == 2
    assert sorted(map(id, seen.closed)) == sorted(map(id, seen.opened))


async def test_a_lanes_connection_error_surfaces_as_the_first_ones(
    events: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LibvirtBackend(events, lanes=2)
    await asyncio.to_thread(backend.open, _Sink(), read_only=False)
    first, second = (lane.conn for lane in backend._lanes)
    failed_on: list[libvirt.virConnect] = []

    def dead(dom: libvirt.virDomain) -> Iterator[None]:
        failed_on.append(_conn_of(dom))
        raise _libvirt_error(
            libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "client socket is closed"
        )
        yield

    try:
        uuid = (await asyncio.to_thread(backend.lookup, "test")).uuid
        _wrap_xmldesc(monkeypatch, dead)
        errors: list[BackendError] = []
        for busy in (contextlib.nullcontext(), backend._lanes_in_use.take(None)):
            with busy:  # then the first lane is taken: the call gets the second
                with pytest.raises(BackendError) as info:
                    await asyncio.to_thread(backend.domain_xml, uuid, inactive=False)
                errors.append(info.value)
    finally:
        await asyncio.to_thread(backend.close)
    assert failed_on == [first, second]
    on_first, on_second = errors
    assert (on_second.code, on_second.origin, on_second.message) == (
        on_first.code,
        on_first.origin,
        on_first.message,
    )
    assert (on_second.code, on_second.origin) == (ErrorCode.INTERNAL_ERROR, ErrorDomain.RPC)
    assert is_connection_error(on_second)


async def test_a_lanes_connection_error_reconnects_the_whole_backend(
    test_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _Opened(monkeypatch)
    failures = 1

    def dies_once(dom: libvirt.virDomain) -> Iterator[None]:
        nonlocal failures
        if failures:
            failures -= 1
            raise _libvirt_error(
                libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "client socket is closed"
            )
        yield

    _wrap_xmldesc(monkeypatch, dies_once)
    settings = DetachSettings(attempts=1, timeout=1, connections=3, reconnect_backoff_max=0.1)
    async with DetachService(test_uri, settings=settings) as svc:
        backend = svc._backend
        assert isinstance(backend, LibvirtBackend)
        assert backend.lanes == 3
        # The read fails, the service reconnects and reads again; the test
        # driver then refuses the detach itself.
        with pytest.raises(DetachRefused):
            await svc.detach("test", target="vda")
        assert svc.reconnects == 1
        assert len(seen.opened) == 6
        assert [lane.conn for lane in backend._lanes] == seen.opened[3:]
        assert seen.closed == seen.opened[:3]
    assert seen.closed == seen.opened


def test_the_service_gives_its_backend_the_connections_setting() -> None:
    for n in (1, 5):
        svc = DetachService("test:///default", settings=DetachSettings(connections=n))
        backend = svc._backend
        assert isinstance(backend, LibvirtBackend)
        assert backend.lanes == n
