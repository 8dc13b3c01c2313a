"""A domain whose calls are stuck in libvirtd holds up no other domain's calls.

Another libvirt client holding a domain's job makes every detach request for
that domain wait inside libvirtd.  Here that is a real blocked call: the
domain ``test``'s ``detachDeviceAlias`` waits on a :class:`threading.Event`
inside its lane (and then gets the test driver's own answer, "not
supported").  The healthy domain is a second one defined on the same
``test:///default`` driver; its reads can be held the same way to free the
lanes in a chosen order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest

from aiodetach import install_event_loop
from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import BackendError


class _Sink:
    def device_removed(self, uuid: str, name: str, alias: str) -> None: ...
    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None: ...
    def domain_stopped(self, uuid: str, name: str, reason: str) -> None: ...
    def domain_resumed(self, uuid: str, name: str) -> None: ...
    def domain_rebooted(self, uuid: str, name: str) -> None: ...
    def connection_closed(self, reason: str) -> None: ...


class _Held:
    """Blocks chosen calls inside libvirt-python until released, and counts
    the calls inside, per domain and per connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gates: dict[tuple[str, str], threading.Event] = {}
        self.entered = threading.Semaphore(0)
        self.inside: collections.Counter[str] = collections.Counter()
        self.most: collections.Counter[str] = collections.Counter()
        self.on_conn: collections.Counter[int] = collections.Counter()
        self.most_on_a_conn = 0

    def hold(self, method: str, uuid: str) -> threading.Event:
        """Calls of ``method`` for domain ``uuid`` wait for the event returned."""
        gate = self.gates[(method, uuid)] = threading.Event()
        return gate

    @contextlib.contextmanager
    def around(self, method: str, dom: libvirt.virDomain) -> Iterator[None]:
        uuid = dom.UUIDString()
        conn = id(dom.connect())  # type: ignore[no-untyped-call]
        with self.lock:
            self.inside[uuid] += 1
            self.most[uuid] = max(self.most[uuid], self.inside[uuid])
            self.on_conn[conn] += 1
            self.most_on_a_conn = max(self.most_on_a_conn, self.on_conn[conn])
        try:
            gate = self.gates.get((method, uuid))
            if gate is not None:
                self.entered.release()
                assert gate.wait(30), "never released"
            yield
        finally:
            with self.lock:
                self.inside[uuid] -= 1
                self.on_conn[conn] -= 1


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> _Held:
    held = _Held()
    xmldesc = libvirt.virDomain.XMLDesc
    detach_alias = libvirt.virDomain.detachDeviceAlias

    def xml(dom: libvirt.virDomain, flags: int = 0) -> str:
        with held.around("XMLDesc", dom):
            return xmldesc(dom, flags)

    def detach(dom: libvirt.virDomain, alias: str, flags: int = 0) -> int:
        with held.around("detachDeviceAlias", dom):
            return detach_alias(dom, alias, flags)

    monkeypatch.setattr(libvirt.virDomain, "XMLDesc", xml)
    monkeypatch.setattr(libvirt.virDomain, "detachDeviceAlias", detach)
    return held


@pytest.fixture
async def opened(test_uri: str) -> AsyncIterator[Callable[[int], Awaitable[LibvirtBackend]]]:
    install_event_loop()
    # A thread for every call the tests start (asyncio.to_thread's default
    # pool has cpu_count + 4: stuck calls would fill it).
    threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="stuck-domain-test")
    asyncio.get_running_loop().set_default_executor(threads)
    backends: list[LibvirtBackend] = []

    async def open_backend(lanes: int) -> LibvirtBackend:
        backend = LibvirtBackend(test_uri, lanes=lanes)
        await asyncio.to_thread(backend.open, _Sink(), read_only=False)
        backends.append(backend)
        return backend

    yield open_backend
    for backend in backends:
        await asyncio.to_thread(backend.close)


async def _parked(backend: LibvirtBackend, count: int) -> None:
    """Until ``count`` calls wait for a lane (they were started in threads)."""
    while backend._lanes_in_use.waiting() != count:
        await asyncio.sleep(0.005)


async def test_a_stuck_domains_calls_leave_a_lane_to_the_others(
    opened: Callable[[int], Awaitable[LibvirtBackend]], held: _Held, second_domain: str
) -> None:
    backend = await opened(4)
    stuck = (await asyncio.to_thread(backend.lookup, "test")).uuid
    healthy = second_domain
    release = held.hold("detachDeviceAlias", stuck)
    # Six requests for the stuck domain: three get lanes and stick, three wait.
    stuck_calls = asyncio.gather(
        *(asyncio.to_thread(backend.detach_live, stuck, f"ua-disk{i}") for i in range(6)),
        return_exceptions=True,
    )
    try:
        for _ in range(3):
            assert await asyncio.to_thread(held.entered.acquire, True, 10)
        await asyncio.wait_for(_parked(backend, 3), 10)
        # The healthy domain's calls, and lookups by name and by UUID, all go
        # through the lane left while the stuck ones stay stuck.
        upper = healthy.upper()
        reads = [asyncio.to_thread(backend.domain_xml, healthy, inactive=False) for _ in range(16)]
        lookups = [
            asyncio.to_thread(backend.lookup, ref) for ref in ("aiodetach-second", upper, "test")
        ]
        xmls, infos = await asyncio.wait_for(
            asyncio.gather(asyncio.gather(*reads), asyncio.gather(*lookups)), 10
        )
        assert all("<name>aiodetach-second</name>" in xml for xml in xmls)
        assert [info.uuid for info in infos] == [healthy, healthy, stuck]
        assert held.inside[stuck] == 3
        assert not stuck_calls.done()
    finally:
        release.set()
    outcomes = await asyncio.wait_for(stuck_calls, 10)
    # Each stuck request then got libvirt's answer (the test driver's "not supported").
    assert all(isinstance(o, BackendError) for o in outcomes), outcomes
    assert {o.code for o in outcomes if isinstance(o, BackendError)} == {libvirt.VIR_ERR_NO_SUPPORT}
    assert held.most[stuck] == 3  # never every lane
    assert held.most_on_a_conn == 1  # and never two calls on one connection


async def test_a_waiting_call_takes_whichever_lane_frees_first(
    opened: Callable[[int], Awaitable[LibvirtBackend]], held: _Held, second_domain: str
) -> None:
    backend = await opened(2)
    stuck = (await asyncio.to_thread(backend.lookup, "test")).uuid
    release_stuck = held.hold("detachDeviceAlias", stuck)
    release_read = held.hold("XMLDesc", second_domain)
    first = asyncio.ensure_future(asyncio.to_thread(backend.detach_live, stuck, "ua-disk1"))
    try:
        assert await asyncio.to_thread(held.entered.acquire, True, 10)  # on the first lane
        read = asyncio.ensure_future(
            asyncio.to_thread(backend.domain_xml, second_domain, inactive=False)
        )
        assert await asyncio.to_thread(held.entered.acquire, True, 10)  # on the second
        lookup = asyncio.ensure_future(asyncio.to_thread(backend.lookup, "aiodetach-second"))
        await asyncio.wait_for(_parked(backend, 1), 10)
        release_read.set()  # the second lane frees first: the lookup takes it
        assert "<name>aiodetach-second</name>" in await asyncio.wait_for(read, 10)
        assert (await asyncio.wait_for(lookup, 10)).uuid == second_domain
        assert not first.done()
    finally:
        release_stuck.set()
        release_read.set()
    with pytest.raises(BackendError):
        await asyncio.wait_for(first, 10)
