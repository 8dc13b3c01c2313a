"""Concurrent detaches of one domain share its lookup and definition reads
(:mod:`aiodetach._reads`), and are never served a read older than themselves."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodetach import DetachService, DetachSettings
from aiodetach._reads import SharedReads
from aiodetach.backend import BackendError, DomainInfo, ErrorCode, ErrorDomain
from aiodetach.errors import DetachError, DetachTimeout
from aiodetach.testing import FakeHypervisor, Unplug


class CountingFake(FakeHypervisor):
    """Counts reads per kind, and can hold one read *after* it took its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.hold_xml: threading.Event | None = None  # set: the next XML read waits for it
        self.holding = threading.Event()  # an XML read has its answer and waits
        self.fail_xml: BackendError | None = None

    def lookup(self, ref: str) -> DomainInfo:
        self.reads["lookup"] += 1
        return super().lookup(ref)

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        self.reads["inactive" if inactive else "live"] += 1
        if self.fail_xml is not None:
            self._enter("domain_xml")
            raise self.fail_xml
        xml = super().domain_xml(uuid, inactive=inactive)
        gate, self.hold_xml = self.hold_xml, None
        if gate is not None:
            self.holding.set()
            gate.wait(5)
        return xml


@pytest.fixture
def counting() -> CountingFake:
    return CountingFake()


async def _settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


async def test_fifty_detaches_of_one_domain_share_two_reads_of_each(
    counting: CountingFake,
) -> None:
    dom = counting.add_domain("vm")
    for i in range(50):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.02))
    async with DetachService(backend=counting, settings=DetachSettings(timeout=5)) as svc:
        results = await asyncio.gather(*(svc.detach("vm", alias=f"ua-d{i}") for i in range(50)))
    assert all(r.live and r.persistent for r in results)
    assert counting.reads["lookup"] <= 2
    assert counting.reads["live"] <= 2
    assert counting.reads["inactive"] <= 2
    assert len(counting.requests) == 50


async def test_a_device_plugged_while_a_read_runs_is_found_by_a_later_caller(
    counting: CountingFake,
) -> None:
    dom = counting.add_domain("vm")
    dom.add_disk("sda", alias="ua-first", unplug=Unplug.now())
    async with DetachService(backend=counting) as svc:
        counting.hold_xml = gate = threading.Event()
        first = asyncio.create_task(svc.detach("vm", alias="ua-first", persistent=False))
        await asyncio.to_thread(counting.holding.wait, 5)  # its read has its answer
        dom.add_disk("sdb", alias="ua-hot", unplug=Unplug.now())  # hot-plugged now
        later = asyncio.create_task(svc.detach("vm", alias="ua-hot", persistent=False))
        await _settle()
        gate.set()
        one, two = await asyncio.gather(first, later)
    assert one.confirmed_by == two.confirmed_by == "event"
    assert counting.reads["live"] == 2  # the later caller's read started after it came


async def test_a_cancelled_joiner_cancels_the_shared_read_for_nobody(
    counting: CountingFake,
) -> None:
    dom = counting.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    async with DetachService(backend=counting) as svc:
        counting.hold_xml = gate = threading.Event()
        starter = asyncio.create_task(svc.detach("vm", alias="ua-d0", persistent=False))
        await asyncio.to_thread(counting.holding.wait, 5)
        # Both join the read queued behind the held one.
        leaver = asyncio.create_task(svc.detach("vm", alias="ua-d1", persistent=False))
        stayer = asyncio.create_task(svc.detach("vm", alias="ua-d2", persistent=False))
        await _settle()
        starter.cancel()  # the only caller of the read in flight
        leaver.cancel()  # one of two callers of the queued read
        await _settle()
        gate.set()
        result = await stayer
        for task in (starter, leaver):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert svc.pending() == []
        assert svc._conn is not None
        assert svc._conn.reads.in_flight() == 0
    assert result.confirmed_by == "event"
    assert [r.alias for r in counting.requests] == ["ua-d2"]


async def test_a_failing_shared_read_names_each_callers_own_device(
    counting: CountingFake,
) -> None:
    dom = counting.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    async with DetachService(backend=counting) as svc:
        counting.fail_xml = BackendError(ErrorCode.OPERATION_FAILED, "cannot format the XML")
        outcomes = await asyncio.gather(
            *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(4)),
            return_exceptions=True,
        )
    assert counting.reads["live"] <= 2
    errors = [o for o in outcomes if isinstance(o, DetachError)]
    assert len(errors) == 4
    assert len({type(e) for e in errors}) == 1
    assert [(e.domain, e.alias) for e in errors] == [("vm", f"ua-d{i}") for i in range(4)]
    assert len({id(e) for e in errors}) == 4  # each caller its own error object
    assert counting.requests == []


async def test_a_connection_lost_mid_read_is_ridden_out_for_every_joiner(
    counting: CountingFake,
) -> None:
    """The shared read fails with a connection error: as with a read of one's
    own, the connection is re-opened and the read asked again, for all."""
    dom = counting.add_domain("vm")
    for i in range(10):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    settings = DetachSettings(reconnect_backoff_max=0.05)
    async with DetachService(backend=counting, settings=settings) as svc:
        counting.fail_next["domain_xml"] = BackendError(
            ErrorCode.INTERNAL_ERROR,
            "internal error: client socket is closed",
            origin=ErrorDomain.RPC,
        )
        results = await asyncio.gather(
            *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(10))
        )
        assert svc.reconnects == 1
    assert all(r.confirmed_by == "event" for r in results)
    assert len(counting.requests) == 10
    assert counting.reads["live"] <= 3  # the failed one, and the one asked again (shared)


async def test_post_timeout_rechecks_of_one_domain_are_shared(counting: CountingFake) -> None:
    dom = counting.add_domain("vm")
    for i in range(20):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    settings = DetachSettings(attempts=2, timeout=0.2)
    async with DetachService(backend=counting, settings=settings) as svc:
        outcomes = await asyncio.gather(
            *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(20)),
            return_exceptions=True,
        )
    assert all(isinstance(o, DetachTimeout) for o in outcomes)
    assert len(counting.requests) == 40
    # Two re-checks each (state + live XML) for 20 devices: 40 of each unshared.
    # The windows end as their requests were answered, spread over worker
    # threads, so the re-checks come in a few waves rather than one.
    assert counting.reads["lookup"] <= 1 + 20
    assert counting.reads["live"] <= 1 + 20


# -- the rule itself, on every interleaving hypothesis finds ---------------------------------

Op = tuple[str, int]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("arrive"), st.integers(0, 1)),
            st.tuples(st.just("cancel"), st.integers(0, 20)),
            st.tuples(st.just("finish"), st.integers(0, 1)),
            st.tuples(st.just("fail"), st.integers(0, 1)),
            st.tuples(st.just("step"), st.just(0)),
        ),
        max_size=40,
    )
)
def test_join_the_next_read(ops: list[Op]) -> None:
    """Every caller gets a read that started after it arrived; at most one read
    per key runs, at most one waits; cancelling callers never ends a read for
    the others; a failed read fails each of its callers."""
    asyncio.run(_model(ops))


async def _model(ops: list[Op]) -> None:
    reads = SharedReads()
    clock = 0  # logical time: bumped at every arrival and every read start
    running: dict[int, list[tuple[int, asyncio.Future[int]]]] = {0: [], 1: []}
    callers: list[tuple[int, int, asyncio.Task[int]]] = []  # (key, arrived, task)

    def start(key: int) -> Callable[[], Coroutine[Any, Any, int]]:
        async def read() -> int:
            nonlocal clock
            clock += 1
            started = clock
            assert not running[key], "two reads of one key at once"
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            running[key].append((started, done))
            try:
                await done
            finally:
                running[key].clear()
            return started

        return read

    async def step() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    for op, arg in ops:
        if op == "arrive":
            clock += 1
            task = asyncio.create_task(_awaiting(reads.read(arg, start(arg))))
            callers.append((arg, clock, task))
        elif op == "cancel" and callers:
            callers[arg % len(callers)][2].cancel()
        elif op in ("finish", "fail") and running[arg]:
            started, done = running[arg][0]
            if not done.done():
                if op == "finish":
                    done.set_result(0)
                else:
                    done.set_exception(BackendError(ErrorCode.OPERATION_FAILED, f"read {started}"))
        await step()
        assert reads.in_flight() <= 4  # two keys, each one running and one queued
    # Let every read end.
    for _ in range(10):
        for key in (0, 1):
            for _started, done in list(running[key]):
                if not done.done():
                    done.set_result(0)
        await step()
    for _key, arrived, task in callers:
        if task.cancelled():
            continue
        exc = task.exception()
        if exc is not None:
            assert isinstance(exc, BackendError)
            started = int(exc.message.split()[1])
        else:
            started = task.result()
        assert started > arrived, "served a read that started before the caller arrived"
    assert reads.in_flight() == 0


async def _awaiting(future: asyncio.Future[int]) -> int:
    """A caller: a task awaiting its own future from ``SharedReads.read``."""
    return await future
