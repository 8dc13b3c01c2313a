"""Concurrent detaches of one domain share its lookup and definition reads
(:mod:`aiodetach._reads`), and are never served a read older than themselves.

Also what a shared read meets: a hot-plug or a domain defined while it is in
flight, a failing or vanishing domain (each caller its own typed error), a
lost connection, a caller cancelled or timed out on it, a reconnect that
reconciles parked unplugs through it, and random interleavings of all of
these (hypothesis).  ``GateFake`` (``_gate_fake.py``) holds a read after it
took its answer."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodetach import DetachService, DetachSettings
from aiodetach._reads import SharedReads
from aiodetach.backend import BackendError, DomainInfo, ErrorCode, ErrorDomain
from aiodetach.errors import (
    ConnectionLost,
    DetachError,
    DetachTimeout,
    DomainNotFound,
)
from aiodetach.instrumentation import DetachRecord, UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug

from ._gate_fake import GateFake, holding, settle


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
    # The later caller read the definition again after it came (how many more
    # reads a correct service makes is not the promise).
    assert counting.reads["live"] >= 2


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


class _HeldXML(FakeHypervisor):
    """Holds every live-XML read until released; can fail them instead."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_with: BackendError | None = None
        self.hold = False

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        if self.hold and not inactive:
            self.entered.set()
            self.gate.wait(10)
            if self.fail_with is not None:
                self._enter("domain_xml")
                raise self.fail_with
        return super().domain_xml(uuid, inactive=inactive)


async def test_caller_cancelled_on_a_shared_read_leaves_it_to_the_others() -> None:
    fake = _HeldXML()
    dom = fake.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug.now())
    async with DetachService(backend=fake, log=False) as svc:
        fake.hold = True
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-{i}", persistent=False))
            for i in range(4)
        ]
        await asyncio.to_thread(fake.entered.wait, 5)
        await asyncio.sleep(0.02)
        tasks[0].cancel()
        tasks[2].cancel()
        await asyncio.sleep(0.02)
        fake.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert isinstance(results[2], asyncio.CancelledError)
        assert results[1].alias == "ua-1"  # type: ignore[union-attr]
        assert results[3].alias == "ua-3"  # type: ignore[union-attr]
        assert svc._conn is not None
        assert svc._conn.reads.in_flight() == 0
        # what the cancelled callers would have detached is still attached
        assert dom.live_device("ua-0") is not None
        assert dom.live_device("ua-2") is not None
        assert svc.pending() == []


async def test_failed_shared_read_each_caller_gets_its_own_typed_error() -> None:
    fake = _HeldXML()
    dom = fake.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"vd{i}", alias=f"ua-{i}")
    async with DetachService(backend=fake, log=False) as svc:
        fake.hold = True
        fake.fail_with = BackendError(ErrorCode.OPERATION_FAILED, "operation failed: boom")
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-{i}", persistent=False))
            for i in range(3)
        ]
        await asyncio.to_thread(fake.entered.wait, 5)
        await asyncio.sleep(0.02)
        fake.gate.set()
        errors = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, DetachError) for e in errors), errors
    assert [e.alias for e in errors] == ["ua-0", "ua-1", "ua-2"]  # type: ignore[union-attr]
    assert all(e.domain == "vm" for e in errors)  # type: ignore[union-attr]
    assert len({id(e) for e in errors}) == 3


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_hotplug_during_inactive_read_is_found_by_later_caller(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-first", live=False)
    async with DetachService(backend=gf) as svc:
        gf.hold["inactive"] = gate = threading.Event()
        first = asyncio.create_task(svc.detach("vm", alias="ua-first", persistent=True, live=False))
        await holding(gf, "inactive")
        dom.add_disk("sdb", alias="ua-cold", live=False)  # defined into the config now
        later = asyncio.create_task(svc.detach("vm", alias="ua-cold", persistent=True, live=False))
        await settle()
        gate.set()
        one, two = await asyncio.gather(first, later)
    assert one.persistent
    assert two.persistent
    assert len(gf.config_requests) == 2


async def test_domain_defined_during_lookup_is_found_by_later_caller(gf: GateFake) -> None:
    async with DetachService(backend=gf) as svc:
        gf.hold["lookup"] = gate = threading.Event()
        first = asyncio.create_task(svc.detach("vm-new", alias="ua-x", persistent=False))
        await holding(gf, "lookup")  # the lookup said "no such domain" and waits
        gf.add_domain("vm-new").add_disk("sdb", alias="ua-x", unplug=Unplug.now())
        later = asyncio.create_task(svc.detach("vm-new", alias="ua-x", persistent=False))
        await settle()
        gate.set()
        with pytest.raises(DomainNotFound):
            await first
        result = await later
    assert result.confirmed_by == "event"


async def test_hotplug_during_live_read_found_by_caller_naming_domain_by_uuid(
    gf: GateFake,
) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-first", unplug=Unplug.now())
    async with DetachService(backend=gf) as svc:
        gf.hold["live"] = gate = threading.Event()
        first = asyncio.create_task(svc.detach("vm", alias="ua-first", persistent=False))
        await holding(gf, "live")
        dom.add_disk("sdb", alias="ua-hot", unplug=Unplug.now())
        later = asyncio.create_task(svc.detach(dom.uuid.upper(), alias="ua-hot", persistent=False))
        await settle()
        gate.set()
        one, two = await asyncio.gather(first, later)
    assert one.live
    assert two.live


async def test_caller_timeout_on_shared_lookup_leaves_nothing(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    svc = DetachService(backend=gf)
    await svc.open()
    gf.hold["lookup"] = gate = threading.Event()
    starter = asyncio.create_task(svc.detach("vm", alias="ua-d0", persistent=False))
    await holding(gf, "lookup")

    async def impatient(i: int) -> Any:
        async with asyncio.timeout(0.05):
            return await svc.detach("vm", alias=f"ua-d{i}", persistent=False)

    quitter = asyncio.create_task(impatient(1))
    stayers = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in (2, 3)
    ]
    with pytest.raises(TimeoutError):
        await quitter
    gate.set()
    results = await asyncio.gather(starter, *stayers)
    assert all(r.confirmed_by == "event" for r in results)
    assert sorted(r.alias for r in gf.requests) == ["ua-d0", "ua-d2", "ua-d3"]
    # the quitter asks again: its device is still there, one request
    again = await svc.detach("vm", alias="ua-d1", persistent=False)
    assert again.attempts == 1
    await svc.aclose()
    assert _others() == set()


async def test_starter_of_shared_lookup_cancelled_others_answered(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    async with DetachService(backend=gf) as svc:
        gf.hold["lookup"] = gate = threading.Event()
        starter = asyncio.create_task(svc.detach("vm", alias="ua-d0", persistent=False))
        # Same loop step: joins the very lookup the starter created.
        joiner = asyncio.create_task(svc.detach("vm", alias="ua-d1", persistent=False))
        await holding(gf, "lookup")
        late = asyncio.create_task(svc.detach("vm", alias="ua-d2", persistent=False))
        await settle()
        starter.cancel()
        await settle()
        gate.set()
        one, two = await asyncio.gather(joiner, late)
        with pytest.raises(asyncio.CancelledError):
            await starter
    assert one.live
    assert two.live
    assert sorted(r.alias for r in gf.requests) == ["ua-d1", "ua-d2"]


@pytest.mark.parametrize("kind", ["lookup", "live", "inactive"])
async def test_failing_shared_read_each_caller_typed_and_named(gf: GateFake, kind: str) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    async with DetachService(backend=gf) as svc:
        gf.fail[kind] = BackendError(ErrorCode.OPERATION_FAILED, "boom")
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(svc.detach("vm", alias=f"ua-d{i}") for i in range(5)),
                return_exceptions=True,
            ),
            5,
        )
    assert all(isinstance(o, DetachError) for o in outcomes), outcomes
    assert [(o.domain, o.alias) for o in outcomes] == [("vm", f"ua-d{i}") for i in range(5)]  # type: ignore[union-attr]
    assert len({id(o) for o in outcomes}) == 5
    assert gf.requests == []


async def test_domain_vanishes_mid_read_each_caller_domain_not_found(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    async with DetachService(backend=gf) as svc:
        gf.after_answer["lookup"] = lambda: gf.domains.pop(dom.uuid)
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(svc.detach("vm", alias=f"ua-d{i}") for i in range(4)), return_exceptions=True
            ),
            5,
        )
    assert all(isinstance(o, DomainNotFound) for o in outcomes), outcomes
    assert [o.alias for o in outcomes] == [f"ua-d{i}" for i in range(4)]  # type: ignore[union-attr]
    assert len({id(o) for o in outcomes}) == 4


async def test_connection_lost_mid_shared_read_then_back(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    settings_ = DetachSettings(reconnect_timeout=5)
    async with DetachService(backend=gf, settings=settings_) as svc:
        fired: list[int] = []

        def crash_then_heal(name: str) -> None:
            if name == "domain_xml" and not fired:
                fired.append(1)
                gf.crash()
                threading.Timer(0.2, gf.restart).start()

        gf.before_call = crash_then_heal
        results = await asyncio.wait_for(
            asyncio.gather(
                *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(4))
            ),
            5,
        )
    assert all(r.live for r in results)
    assert len(gf.requests) == 4


async def test_connection_lost_for_good_mid_shared_read_each_caller_named(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    settings_ = DetachSettings(reconnect_timeout=0.3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        gf.before_call = lambda name: gf.crash() if name == "domain_xml" else None
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(4)),
                return_exceptions=True,
            ),
            5,
        )
        gf.before_call = None
    assert all(isinstance(o, ConnectionLost) for o in outcomes), outcomes
    assert [(o.domain, o.alias) for o in outcomes] == [("vm", f"ua-d{i}") for i in range(4)]  # type: ignore[union-attr]
    assert len({id(o) for o in outcomes}) == 4


async def test_name_uuid_and_uppercase_uuid_share_one_unplug(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.later(0.1))
    async with DetachService(backend=gf) as svc:
        results = await asyncio.gather(
            svc.detach("vm", alias="ua-d"),
            svc.detach(dom.uuid, alias="ua-d"),
            svc.detach(dom.uuid.upper(), alias="ua-d"),
        )
    assert len(gf.requests) == 1
    assert sum(r.joined for r in results) == 2
    assert all(r.persistent for r in results)
    assert all(r.domain_name == "vm" for r in results)


async def test_many_domains_many_devices_each_read_shared(gf: GateFake) -> None:
    for d in range(8):
        dom = gf.add_domain(f"vm{d}")
        for i in range(8):
            dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.01))
    async with DetachService(backend=gf) as svc:
        outcomes = await svc.detach_many(
            [{"domain": f"vm{d}", "alias": f"ua-d{i}"} for d in range(8) for i in range(8)],
            concurrency=64,
            per_domain=None,
        )
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert len(gf.requests) == 64
    assert gf.reads["live"] <= 2 * 8
    assert gf.reads["inactive"] <= 2 * 8


async def test_fifty_never_answering_devices_exactly_three_requests_each(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(50):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    records: list[Any] = []
    settings_ = DetachSettings(timeout=0.15, attempts=3)
    async with DetachService(backend=gf, settings=settings_, hooks=[records.append]) as svc:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(50)),
                return_exceptions=True,
            ),
            20,
        )
    assert all(isinstance(o, DetachTimeout) for o in outcomes), outcomes
    assert [(o.domain, o.alias) for o in outcomes] == [("vm", f"ua-d{i}") for i in range(50)]  # type: ignore[union-attr]
    per = Counter(r.alias for r in gf.requests)
    assert per == Counter({f"ua-d{i}": 3 for i in range(50)})
    # every re-send follows a timed-out attempt (a re-check) of its own unplug
    steps: dict[str, list[str]] = {}
    for r in records:
        if isinstance(r, UnplugRecord) and r.kind in ("request_sent", "attempt_timed_out"):
            steps.setdefault(r.alias, []).append(r.kind)
    for alias, kinds in steps.items():
        assert kinds == ["request_sent", "attempt_timed_out"] * 3, (alias, kinds)


async def test_live_only_devices_persistent_not_found_ignored_under_sharing(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(6):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", config=(i % 2 == 0), unplug=Unplug.later(0.02))
    async with DetachService(backend=gf) as svc:
        results = await asyncio.gather(*(svc.detach("vm", alias=f"ua-d{i}") for i in range(6)))
    assert [r.persistent for r in results] == [i % 2 == 0 for i in range(6)]
    assert all(r.live for r in results)
    assert len(gf.requests) == 6


async def test_libvirt_alias_found_by_target_in_persistent_under_sharing(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"vd{chr(98 + i)}", alias=f"virtio-disk{i + 1}", unplug=Unplug.later(0.02))
    async with DetachService(backend=gf) as svc:
        results = await asyncio.gather(
            *(svc.detach("vm", alias=f"virtio-disk{i + 1}") for i in range(4)),
            *(svc.detach("vm", target=f"vd{chr(98 + i)}") for i in range(4)),
        )
    assert all(r.live and r.persistent for r in results), results
    assert len(gf.requests) == 4
    assert len(gf.config_requests) == 4
    assert all(not d.config and not d.live for d in dom.devices)


async def test_parked_unplug_and_weakly_held_callers_survive_gc(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    finished: list[Any] = []

    def hook(record: Any) -> None:
        if isinstance(record, DetachRecord) and record.kind == "finished":
            finished.append(record)

    async with DetachService(backend=gf, hooks=[hook], settings=DetachSettings(timeout=5)) as svc:
        refs = []
        for i in range(5):
            task = asyncio.ensure_future(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            refs.append(weakref.ref(task))
            del task
        await settle(0.1)
        for _ in range(3):
            gc.collect()
        await settle()
        for i in range(5):
            gf.complete("vm", f"ua-d{i}")
        for _ in range(50):
            if len(finished) == 5:
                break
            await settle(0.02)
        assert svc.pending() == []
    assert len(finished) == 5
    assert all(r.outcome == "removed" for r in finished)


def _unraisable_guard() -> tuple[list[Any], Any]:
    seen: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _l, ctx: seen.append(ctx))
    return seen, loop


async def test_reconnect_reconciles_parked_unplugs_with_shared_reads(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(10):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    settings_ = DetachSettings(timeout=5, reconnect_timeout=5)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(10)
        ]
        await settle(0.1)
        gf.crash()
        for i in range(0, 10, 2):
            gf.complete("vm", f"ua-d{i}")  # while disconnected: the events are lost
        await settle(0.1)
        gf.restart()
        await settle(0.5)
        done = [t for t in tasks if t.done()]
        assert len(done) == 5
        for i in range(1, 10, 2):
            gf.complete("vm", f"ua-d{i}")
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [r.confirmed_by for r in results] == ["xml", "event"] * 5
    assert len(gf.requests) == 10


async def test_loss_noticed_by_a_shared_read_reaches_parked_callers_at_the_bound(
    gf: GateFake,
) -> None:
    """README rule 7: waiters get ConnectionLost at reconnect_timeout.  Here the
    loss is noticed by a new caller's (shared) read, not by a close callback
    (a partition closes nothing)."""
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-old", unplug=Unplug.manual())
    dom.add_disk("sdb", alias="ua-new", unplug=Unplug.now())
    settings_ = DetachSettings(timeout=4, reconnect_timeout=0.5)
    async with DetachService(backend=gf, settings=settings_) as svc:
        old = asyncio.create_task(svc.detach("vm", alias="ua-old", persistent=False))
        await settle(0.1)
        with gf._lock:  # the daemon goes away silently
            gf.daemon_up = False
            gf.connected = False
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            await svc.detach("vm", alias="ua-new", persistent=False)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(old, 2)
        assert time.monotonic() - t0 < 2


class GarbledFake(FakeHypervisor):
    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        super().domain_xml(uuid, inactive=inactive)
        return "<domain><devices><disk"


async def test_malformed_shared_definition_is_a_typed_error_per_caller() -> None:
    fake = GarbledFake()
    dom = fake.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}")
    async with DetachService(backend=fake) as svc:
        outcomes = await asyncio.gather(
            *(svc.detach("vm", alias=f"ua-d{i}") for i in range(3)), return_exceptions=True
        )
    assert all(isinstance(o, DetachError) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 3


Action = tuple[str, int]


@settings(
    max_examples=int(__import__("os").environ.get("REVIEW_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("detach"), st.integers(0, 3)),
            st.tuples(st.just("impatient"), st.integers(0, 3)),
            st.tuples(st.just("complete"), st.integers(0, 3)),
            st.tuples(st.just("reject"), st.integers(0, 3)),
            st.tuples(st.just("resume"), st.just(0)),
            st.tuples(st.just("hold"), st.integers(0, 2)),
            st.tuples(st.just("release"), st.just(0)),
            st.tuples(st.just("crash"), st.just(0)),
            st.tuples(st.just("sleep"), st.integers(0, 30)),
        ),
        max_size=25,
    )
)
def test_random_interleavings_keep_the_promises(actions: list[Action]) -> None:
    asyncio.run(_interleave(actions))


async def _interleave(actions: list[Action]) -> None:
    seen, _loop = _unraisable_guard()
    fake = GateFake()
    dom = fake.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    records: list[Any] = []
    attempts = 3
    svc = DetachService(
        backend=fake,
        settings=DetachSettings(timeout=0.1, attempts=attempts, reconnect_timeout=2),
        hooks=[records.append],
    )
    await svc.open()
    tasks: list[tuple[int, asyncio.Task[Any]]] = []
    removed_at: dict[str, float] = {}
    gates: list[threading.Event] = []

    async def impatient(i: int) -> Any:
        async with asyncio.timeout(0.03):
            return await svc.detach("vm", alias=f"ua-d{i}", persistent=False)

    for op, arg in actions:
        if op == "detach":
            tasks.append(
                (arg, asyncio.create_task(svc.detach("vm", alias=f"ua-d{arg}", persistent=False)))
            )
        elif op == "impatient":
            tasks.append((arg, asyncio.create_task(impatient(arg))))
        elif op == "complete":
            alias = f"ua-d{arg}"
            if dom.live_device(alias) is not None and alias not in removed_at:
                removed_at[alias] = time.monotonic()
            fake.complete("vm", alias)
        elif op == "reject":
            fake.reject("vm", f"ua-d{arg}")
        elif op == "resume":
            fake.resume_domain("vm")
        elif op == "hold":
            kind = ("lookup", "live", "inactive")[arg]
            fake.hold[kind] = gate = threading.Event()
            gates.append(gate)
        elif op == "release":
            for gate in gates:
                gate.set()
        elif op == "crash":
            fake.crash()
            threading.Timer(0.05, fake.restart).start()
        else:
            for _ in range(arg):
                await asyncio.sleep(0)
            await asyncio.sleep(arg / 1000)
    for gate in gates:
        gate.set()
    fake.hold.clear()
    # Let the guests answer everything still pending, then wait for every caller.
    for i in range(4):
        alias = f"ua-d{i}"
        if dom.live_device(alias) is not None and alias not in removed_at:
            removed_at[alias] = time.monotonic()
        fake.complete("vm", alias)
    _done, not_done = (
        await asyncio.wait([t for _i, t in tasks], timeout=3) if tasks else (set(), set())
    )
    await svc.aclose()
    for t in not_done:
        t.cancel()
    await asyncio.gather(*(t for _i, t in tasks), return_exceptions=True)
    fake.cancel_timers()
    assert not not_done, f"{len(not_done)} caller(s) hung"
    for i, t in tasks:
        if t.cancelled():
            continue
        exc = t.exception()
        if exc is None or (isinstance(exc, TimeoutError) and not isinstance(exc, DetachError)):
            continue
        assert isinstance(exc, DetachError), repr(exc)
        assert exc.alias == f"ua-d{i}", repr(exc)
        assert exc.domain == "vm", repr(exc)
    # No request for a device after it left, none beyond the attempts of one unplug.
    for r in fake.requests:
        left = removed_at.get(r.alias)
        assert left is None or r.at <= left + 0.001, (r, left)
    per_unplug = Counter(
        rec.unplug_id
        for rec in records
        if isinstance(rec, UnplugRecord) and rec.kind == "request_sent"
    )
    assert all(v <= attempts for v in per_unplug.values()), per_unplug
    starts = Counter(
        rec.unplug_id for rec in records if isinstance(rec, UnplugRecord) and rec.kind == "started"
    )
    ends = Counter(
        rec.unplug_id for rec in records if isinstance(rec, UnplugRecord) and rec.kind == "ended"
    )
    assert starts == ends
    assert svc.pending() == []
    assert _others() == set()
    assert seen == []


async def test_every_caller_of_a_failing_read_cancelled_nothing_unretrieved(gf: GateFake) -> None:
    seen, _loop = _unraisable_guard()
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}")
    svc = DetachService(backend=gf)
    await svc.open()
    gf.hold["live"] = gate = threading.Event()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(2)
    ]
    await holding(gf, "live")
    tasks += [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in (2, 3)
    ]
    await settle()
    gf.fail["live"] = BackendError(ErrorCode.OPERATION_FAILED, "boom")
    for t in tasks:
        t.cancel()
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await settle(0.2)
    gc.collect()
    await svc.aclose()
    assert seen == []
    assert gf.requests == []
    assert _others() == set()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=6))
def test_staggered_callers_of_one_device_all_get_both_halves(
    arrivals: list[tuple[int, bool]],
) -> None:
    """Callers of one device (by alias or by target) arriving a few loop steps
    apart share its config detach and its unplug: every one gets persistent
    and live, with one config detach and one request."""
    asyncio.run(_staggered(arrivals))


async def _staggered(arrivals: list[tuple[int, bool]]) -> None:
    fake = GateFake()
    dom = fake.add_domain("vm")
    dom.add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.02))
    async with DetachService(backend=fake) as svc:
        tasks = []
        for steps, by_alias in arrivals:
            for _ in range(steps):
                await asyncio.sleep(0)
            call = svc.detach("vm", alias="ua-d") if by_alias else svc.detach("vm", target="vdb")
            tasks.append(asyncio.create_task(call))
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    fake.cancel_timers()
    assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
    assert all(o.live and o.persistent for o in outcomes), outcomes  # type: ignore[union-attr]
    assert len(fake.config_requests) == 1
    assert len(fake.requests) == 1
