"""Adversarial review probes of shared reads (``_reads``) and parked unplugs
(no task per pending unplug, a plain future per caller), through the public
API only: DetachService, detach/detach_many/detach_iter, DetachFleet and the
FakeHypervisor."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodetach import DetachFleet, DetachService, DetachSettings
from aiodetach.backend import BackendError, DomainInfo, ErrorCode
from aiodetach.errors import (
    ConnectionLost,
    DetachError,
    DetachFailed,
    DetachTimeout,
    DomainNotFound,
    ServiceClosed,
)
from aiodetach.instrumentation import DetachRecord, UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug

_R = TypeVar("_R")


class GateFake(FakeHypervisor):
    """Counts reads per kind; can hold the next read of a kind *after* it took
    its answer (so what it returns is older than the moment it is released),
    or fail reads of a kind."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.hold: dict[str, threading.Event] = {}
        self.holding: dict[str, threading.Event] = {
            k: threading.Event() for k in ("lookup", "live", "inactive")
        }
        self.fail: dict[str, BackendError] = {}
        self.after_answer: dict[str, Any] = {}  # kind -> callable run after the answer is taken

    def _gate(self, kind: str) -> None:
        fn = self.after_answer.pop(kind, None)
        if fn is not None:
            fn()
        gate = self.hold.pop(kind, None)
        if gate is not None:
            self.holding[kind].set()
            gate.wait(10)

    def lookup(self, ref: str) -> DomainInfo:
        self.reads["lookup"] += 1
        failure = self.fail.get("lookup")
        if failure is not None:
            self._enter("lookup")
            raise failure
        try:
            info = super().lookup(ref)
        except BackendError:
            self._gate("lookup")
            raise
        self._gate("lookup")
        return info

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        kind = "inactive" if inactive else "live"
        self.reads[kind] += 1
        failure = self.fail.get(kind)
        if failure is not None:
            self._enter("domain_xml")
            raise failure
        xml = super().domain_xml(uuid, inactive=inactive)
        self._gate(kind)
        return xml


async def _holding(fake: GateFake, kind: str) -> None:
    await asyncio.to_thread(fake.holding[kind].wait, 10)
    fake.holding[kind].clear()


async def _held(
    fake: GateFake, kind: str, call: Coroutine[Any, Any, _R]
) -> tuple[asyncio.Task[_R], threading.Event]:
    """Start ``call`` with its next read of ``kind`` held once that read took
    its answer; return its task once held, and the gate that releases it."""
    fake.hold[kind] = gate = threading.Event()
    task = asyncio.create_task(call)
    await _holding(fake, kind)
    return task, gate


async def _settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


# -- 1. hot-plug while a shared read is in flight ---------------------------------------------


async def test_hotplug_during_inactive_read_is_found_by_later_caller(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-first", live=False)
    async with DetachService(backend=gf) as svc:
        gf.hold["inactive"] = gate = threading.Event()
        first = asyncio.create_task(svc.detach("vm", alias="ua-first", persistent=True, live=False))
        await _holding(gf, "inactive")
        dom.add_disk("sdb", alias="ua-cold", live=False)  # defined into the config now
        later = asyncio.create_task(svc.detach("vm", alias="ua-cold", persistent=True, live=False))
        await _settle()
        gate.set()
        one, two = await asyncio.gather(first, later)
    assert one.persistent
    assert two.persistent
    assert len(gf.config_requests) == 2


async def test_domain_defined_during_lookup_is_found_by_later_caller(gf: GateFake) -> None:
    async with DetachService(backend=gf) as svc:
        gf.hold["lookup"] = gate = threading.Event()
        first = asyncio.create_task(svc.detach("vm-new", alias="ua-x", persistent=False))
        await _holding(gf, "lookup")  # the lookup said "no such domain" and waits
        gf.add_domain("vm-new").add_disk("sdb", alias="ua-x", unplug=Unplug.now())
        later = asyncio.create_task(svc.detach("vm-new", alias="ua-x", persistent=False))
        await _settle()
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
        await _holding(gf, "live")
        dom.add_disk("sdb", alias="ua-hot", unplug=Unplug.now())
        later = asyncio.create_task(svc.detach(dom.uuid.upper(), alias="ua-hot", persistent=False))
        await _settle()
        gate.set()
        one, two = await asyncio.gather(first, later)
    assert one.live
    assert two.live


# -- 2. cancellation while waiting on shared reads ----------------------------------------------


async def test_caller_timeout_on_shared_lookup_leaves_nothing(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(4):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    svc = DetachService(backend=gf)
    await svc.open()
    gf.hold["lookup"] = gate = threading.Event()
    starter = asyncio.create_task(svc.detach("vm", alias="ua-d0", persistent=False))
    await _holding(gf, "lookup")

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


async def test_retry_after_own_deadline_joins_the_unplug_no_second_request(
    gf: GateFake,
) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    for i in range(5):
        dom.add_disk(f"sx{i}", alias=f"ua-x{i}", unplug=Unplug.manual())
    settings_ = DetachSettings(timeout=5, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        others = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-x{i}", persistent=False))
            for i in range(5)
        ]
        for _ in range(3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await svc.detach("vm", alias="ua-d", persistent=False)
        assert "ua-d" in [a for _u, a in svc.pending()]
        retry = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await _settle()
        gf.complete("vm", "ua-d")
        result = await retry
        for i in range(5):
            gf.complete("vm", f"ua-x{i}")
        await asyncio.gather(*others)
    assert result.joined
    assert [r.alias for r in gf.requests].count("ua-d") == 1


async def test_starter_of_shared_lookup_cancelled_others_answered(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.now())
    async with DetachService(backend=gf) as svc:
        gf.hold["lookup"] = gate = threading.Event()
        starter = asyncio.create_task(svc.detach("vm", alias="ua-d0", persistent=False))
        # Same loop step: joins the very lookup the starter created.
        joiner = asyncio.create_task(svc.detach("vm", alias="ua-d1", persistent=False))
        await _holding(gf, "lookup")
        late = asyncio.create_task(svc.detach("vm", alias="ua-d2", persistent=False))
        await _settle()
        starter.cancel()
        await _settle()
        gate.set()
        one, two = await asyncio.gather(joiner, late)
        with pytest.raises(asyncio.CancelledError):
            await starter
    assert one.live
    assert two.live
    assert sorted(r.alias for r in gf.requests) == ["ua-d1", "ua-d2"]


# -- 3. shared reads failing -------------------------------------------------------------------


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


# -- 4. two names of one domain, many domains ---------------------------------------------------


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


# -- 5. events vs shared re-checks ----------------------------------------------------------------


async def test_device_removed_during_shared_recheck_not_lost_no_resend(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(10):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    settings_ = DetachSettings(timeout=0.2, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(10)
        ]
        await _settle(0.05)  # every caller past its own reads: the next live read is a re-check
        gf.hold["live"] = gate = threading.Event()
        await _holding(gf, "live")
        # The re-check read took its answer (every device there); the guest lets go now.
        for i in range(10):
            gf.complete("vm", f"ua-d{i}")
        await _settle()
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(r.confirmed_by == "event" for r in results)
    assert len(gf.requests) == 10


async def test_removal_failed_reaches_every_joiner_no_retry(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    settings_ = DetachSettings(timeout=0.3, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False)) for _ in range(6)
        ]
        await _settle()
        gf.reject("vm", "ua-d")
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await _settle(0.5)
    assert all(isinstance(o, DetachFailed) for o in outcomes), outcomes
    assert all(o.alias == "ua-d" and o.domain == "vm" for o in outcomes)  # type: ignore[union-attr]
    assert len(gf.requests) == 1


async def test_removal_failed_during_shared_recheck_no_resend(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    settings_ = DetachSettings(timeout=0.2, attempts=3)
    async with DetachService(backend=gf, settings=settings_) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(5)
        ]
        await _settle(0.05)
        gf.hold["live"] = gate = threading.Event()
        await _holding(gf, "live")
        for i in range(5):
            gf.reject("vm", f"ua-d{i}")
        await _settle()
        gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(o, DetachFailed) for o in outcomes), outcomes
    assert len(gf.requests) == 5


# -- 6. attempts / timeouts with 50 devices re-checking together ------------------------------------


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


# -- 7. persistent + live with shared inactive reads --------------------------------------------------


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


# -- 8. garbage collection while parked ----------------------------------------------------------------


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
        await _settle(0.1)
        for _ in range(3):
            gc.collect()
        await _settle()
        for i in range(5):
            gf.complete("vm", f"ua-d{i}")
        for _ in range(50):
            if len(finished) == 5:
                break
            await _settle(0.02)
        assert svc.pending() == []
    assert len(finished) == 5
    assert all(r.outcome == "removed" for r in finished)


# -- 9. aclose at every await point --------------------------------------------------------------------


def _unraisable_guard() -> tuple[list[Any], Any]:
    seen: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _l, ctx: seen.append(ctx))
    return seen, loop


async def test_aclose_while_an_unplug_re_parks_gives_servicedclosed_promptly(
    gf: GateFake,
) -> None:
    """A parked unplug woken (here: a RESUMED event) re-parks in its new driver
    task's first step; aclose() in the same loop iteration must still end it."""
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    svc = DetachService(backend=gf, settings=DetachSettings(timeout=30))
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    await _settle(0.1)  # request answered, parked
    gf.resume_domain("vm")  # wakes it: _resume is scheduled
    await asyncio.sleep(0)  # _resume ran: a new driver task is scheduled, we run after it
    started = time.monotonic()
    await svc.aclose()
    try:
        with pytest.raises(ServiceClosed) as info:
            await asyncio.wait_for(caller, 2)
    finally:
        if not caller.done():
            caller.cancel()
    assert time.monotonic() - started < 2
    assert (info.value.domain, info.value.alias) == ("vm", "ua-d")
    assert svc.pending() == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 60), st.integers(1, 12))
def test_aclose_at_any_step_of_a_mass_detach(steps: int, n: int) -> None:
    asyncio.run(_close_at(steps, n))


async def _close_at(steps: int, n: int) -> None:
    seen, _loop = _unraisable_guard()
    fake = GateFake()
    dom = fake.add_domain("vm")
    plans = [Unplug.never(), Unplug.manual(), Unplug.later(0.001), Unplug.now()]
    for i in range(n):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=plans[i % len(plans)])
    records: list[Any] = []
    svc = DetachService(
        backend=fake, settings=DetachSettings(timeout=30, attempts=3), hooks=[records.append]
    )
    await svc.open()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}")))
        if i % 3 == 0:
            await asyncio.sleep(0)
    for _ in range(steps):
        await asyncio.sleep(0)
    t0 = time.monotonic()
    await asyncio.wait_for(svc.aclose(), 5)
    _done, not_done = await asyncio.wait(tasks, timeout=1.0)
    for t in not_done:
        t.cancel()
    await asyncio.gather(*not_done, return_exceptions=True)
    fake.cancel_timers()
    assert not not_done, f"{len(not_done)} caller(s) still waiting 1 s after aclose() returned"
    assert time.monotonic() - t0 < 3
    for i, t in enumerate(tasks):
        exc = t.exception()
        if exc is None:
            continue
        assert isinstance(exc, ServiceClosed), repr(exc)
        assert (exc.domain, exc.alias) == ("vm", f"ua-d{i}")
    assert _others() == set()
    assert seen == []
    started = Counter(
        r.unplug_id for r in records if isinstance(r, UnplugRecord) and r.kind == "started"
    )
    ended = Counter(
        r.unplug_id for r in records if isinstance(r, UnplugRecord) and r.kind == "ended"
    )
    assert started == ended
    assert all(v == 1 for v in started.values())
    calls_started = Counter(
        r.detach_id for r in records if isinstance(r, DetachRecord) and r.kind == "started"
    )
    calls_finished = Counter(
        r.detach_id for r in records if isinstance(r, DetachRecord) and r.kind == "finished"
    )
    assert calls_started == calls_finished


# -- 10. hooks and journal see each unplug once under sharing ----------------------------------------


async def test_hooks_pair_every_unplug_once_with_joiners_and_cancellations(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(10):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.05))
    records: list[Any] = []
    async with DetachService(backend=gf, hooks=[records.append]) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i % 10}", persistent=False))
            for i in range(30)
        ]
        await _settle(0.01)
        for t in tasks[::4]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _settle(0.2)
    starts = Counter(
        r.alias for r in records if isinstance(r, UnplugRecord) and r.kind == "started"
    )
    ends = Counter(r.alias for r in records if isinstance(r, UnplugRecord) and r.kind == "ended")
    assert starts == ends
    assert all(v == 1 for v in starts.values()), starts
    assert len(gf.requests) == sum(starts.values())
    calls = [r for r in records if isinstance(r, DetachRecord)]
    assert Counter(r.detach_id for r in calls if r.kind == "started") == Counter(
        r.detach_id for r in calls if r.kind == "finished"
    )
    per_call = Counter(r.detach_id for r in calls if r.kind in ("unplug_started", "unplug_joined"))
    assert all(v == 1 for v in per_call.values()), per_call
    assert sum(1 for r in calls if r.kind == "unplug_started") == 10


async def test_journal_one_row_per_unplug_under_sharing(gf: GateFake, tmp_path: Path) -> None:
    dom = gf.add_domain("vm")
    for i in range(8):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.02))
    path = tmp_path / "j.db"
    async with DetachService(backend=gf, journal=path) as svc:
        await asyncio.gather(*(svc.detach("vm", alias=f"ua-d{i % 8}") for i in range(24)))
    db = sqlite3.connect(path)
    try:
        cols = [c[1] for c in db.execute("PRAGMA table_info(unplugs)")]
        rows = db.execute("SELECT * FROM unplugs").fetchall()
    finally:
        db.close()
    assert len(rows) == 8
    outcome = cols.index("outcome")
    assert {r[outcome] for r in rows} == {"removed"}


# -- 11. fleet and batches ---------------------------------------------------------------------------


async def test_fleet_batch_shares_reads_and_each_outcome_named() -> None:
    fakes = {}
    for host in ("a", "b"):
        fk = GateFake()
        fk._uri = f"fake://{host}/system"
        dom = fk.add_domain("vm")
        for i in range(5):
            dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.01))
        fakes[fk.uri] = fk
    async with DetachFleet(backend_factory=lambda uri: fakes[uri]) as fleet:
        outcomes = await fleet.detach_many(
            [{"uri": uri, "domain": "vm", "alias": f"ua-d{i}"} for uri in fakes for i in range(5)]
        )
    assert all(o.error is None for o in outcomes)
    for fk in fakes.values():
        assert len(fk.requests) == 5


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 8), st.integers(0, 8), st.integers(1, 6))
def test_aclose_around_a_resumed_event_of_parked_unplugs(
    resume_at: int, close_after: int, n: int
) -> None:
    """Parked unplugs woken by RESUMED (a domain resumed, e.g. after a
    migration's pause) while aclose() comes a few loop steps later: every
    caller must get ServiceClosed promptly."""
    asyncio.run(_resume_then_close(resume_at, close_after, n))


async def _resume_then_close(resume_at: int, close_after: int, n: int) -> None:
    fake = GateFake()
    dom = fake.add_domain("vm")
    for i in range(n):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=30))
    await svc.open()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(n)
    ]
    await _settle(0.05)
    for _ in range(resume_at):
        await asyncio.sleep(0)
    fake.resume_domain("vm")
    for _ in range(close_after):
        await asyncio.sleep(0)
    await svc.aclose()
    _done, not_done = await asyncio.wait(tasks, timeout=1.0)
    for t in not_done:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    fake.cancel_timers()
    assert not not_done, f"{len(not_done)} of {n} caller(s) still waiting 1 s after aclose()"
    assert all(isinstance(t.exception(), ServiceClosed) for t in tasks)


# -- 12. reconnects with parked unplugs and shared re-reads ----------------------------------------------


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
        await _settle(0.1)
        gf.crash()
        for i in range(0, 10, 2):
            gf.complete("vm", f"ua-d{i}")  # while disconnected: the events are lost
        await _settle(0.1)
        gf.restart()
        await _settle(0.5)
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
        await _settle(0.1)
        with gf._lock:  # the daemon goes away silently
            gf.daemon_up = False
            gf.connected = False
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            await svc.detach("vm", alias="ua-new", persistent=False)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(old, 2)
        assert time.monotonic() - t0 < 2


# -- 13. a malformed definition from a backend ---------------------------------------------------------


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


# -- 14. batches stopped early while reads are shared ----------------------------------------------------


async def test_detach_iter_closed_early_while_reads_in_flight(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(12):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.later(0.02))
    async with DetachService(backend=gf) as svc:
        gf.hold["live"] = gate = threading.Event()
        it = svc.detach_iter(
            [{"domain": "vm", "alias": f"ua-d{i}"} for i in range(12)], per_domain=None
        )
        first = asyncio.create_task(it.__anext__())
        await _holding(gf, "live")
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        closer = asyncio.create_task(it.aclose())  # cancels and awaits what runs
        await _settle()
        gate.set()
        await closer
        await _settle(0.2)
        assert svc.pending() == []
        again = await svc.detach("vm", alias="ua-d5")
        assert again.live
    assert _others() == set()
    assert Counter(r.alias for r in gf.requests)["ua-d5"] == 1


async def test_batch_aborted_while_unplugs_park_then_retry_joins(gf: GateFake) -> None:
    """A retry after BatchAborted joins every unplug whose request reached
    libvirt; one whose caller was cancelled before sending was abandoned, and
    its retry sends the one and only request.  Either way: one request each."""
    dom = gf.add_domain("vm")
    for i in range(6):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    dom.add_disk("sdz", alias="ua-z", unplug=Unplug.now())
    from aiodetach.errors import BatchAborted

    def boom(outcome: Any, done: int, total: int) -> None:
        raise RuntimeError("stop")

    async with DetachService(backend=gf, settings=DetachSettings(timeout=5)) as svc:
        reqs = [{"domain": "vm", "alias": "ua-z"}] + [
            {"domain": "vm", "alias": f"ua-d{i}"} for i in range(6)
        ]
        with pytest.raises(BatchAborted):
            await svc.detach_many(reqs, per_domain=None, on_progress=boom)
        sent_before = {r.alias for r in gf.requests}
        await _settle()
        pending = {a for _u, a in svc.pending()}
        assert pending == sent_before - {"ua-z"}  # the unsent ones were abandoned
        retry = {
            a: asyncio.create_task(svc.detach("vm", alias=a, persistent=False))
            for a in (f"ua-d{i}" for i in range(6))
        }
        await _settle()
        for i in range(6):
            gf.complete("vm", f"ua-d{i}")
        results = await asyncio.wait_for(asyncio.gather(*retry.values()), 5)
    assert {r.alias for r in results if r.joined} == pending
    per = Counter(r.alias for r in gf.requests)
    assert all(v == 1 for v in per.values()), per


# -- 15. outcomes of shared re-checks ---------------------------------------------------------------------


async def test_persistent_done_reaches_every_joiner_of_a_failed_unplug(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.reject(0.05))
    async with DetachService(backend=gf) as svc:
        outcomes = await asyncio.gather(
            *(svc.detach("vm", alias="ua-d") for _ in range(4)), return_exceptions=True
        )
    assert all(isinstance(o, DetachFailed) for o in outcomes), outcomes
    assert all(o.persistent_done for o in outcomes)  # type: ignore[union-attr]
    assert len(gf.requests) == 1
    assert len(gf.config_requests) == 1


async def test_domain_stopped_silently_seen_by_shared_recheck(gf: GateFake) -> None:
    from aiodetach.backend import DomainState
    from aiodetach.errors import DomainStopped

    dom = gf.add_domain("vm", persistent=False)
    for i in range(8):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    async with DetachService(backend=gf, settings=DetachSettings(timeout=0.2, attempts=3)) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}")) for i in range(8)]
        await _settle(0.05)
        with gf._lock:  # stopped, its STOPPED event lost
            dom.state = DomainState.SHUTOFF
            for d in dom.devices:
                d.live = False
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
    assert [o.alias for o in outcomes] == [f"ua-d{i}" for i in range(8)]  # type: ignore[union-attr]
    assert len(gf.requests) == 8


async def test_pause_during_shared_recheck_uses_no_attempt(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(6):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    async with DetachService(backend=gf, settings=DetachSettings(timeout=0.2, attempts=1)) as svc:
        tasks = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(6)
        ]
        await _settle(0.05)
        gf.pause_domain("vm")
        await _settle(0.5)  # windows over while paused: no attempt used, nothing re-sent
        assert not any(t.done() for t in tasks)
        gf.resume_domain("vm")
        await _settle(0.05)
        for i in range(6):
            gf.complete("vm", f"ua-d{i}")
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(r.confirmed_by == "event" for r in results)
    assert len(gf.requests) == 6


# -- 16. random interleavings of guests, events, callers and the daemon --------------------------------------

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


# -- 17. journal take-up: a parked recovered unplug joined by many callers ---------------------------------


async def test_recovered_parked_unplugs_joined_by_many_callers(
    gf: GateFake, tmp_path: Path
) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.manual())
    path = tmp_path / "j.db"
    settings_ = DetachSettings(timeout=5, attempts=3)
    async with DetachService(backend=gf, settings=settings_, journal=path) as first:
        tasks = [
            asyncio.create_task(first.detach("vm", alias=f"ua-d{i}", persistent=False))
            for i in range(5)
        ]
        await _settle(0.1)
    for t in tasks:
        with pytest.raises(ServiceClosed):
            await t
    records: list[Any] = []
    async with DetachService(
        backend=gf, settings=settings_, journal=path, hooks=[records.append]
    ) as svc:
        assert sorted(r.outcome for r in svc.recovered()) == ["pending"] * 5
        callers = [
            asyncio.create_task(svc.detach("vm", alias=f"ua-d{i % 5}", persistent=False))
            for i in range(15)
        ]
        await _settle(0.05)
        for i in range(5):
            gf.complete("vm", f"ua-d{i}")
        results = await asyncio.wait_for(asyncio.gather(*callers), 5)
    assert all(r.resumed and r.joined for r in results)
    assert Counter(r.alias for r in gf.requests) == Counter({f"ua-d{i}": 1 for i in range(5)})
    starts = Counter(
        r.alias for r in records if isinstance(r, UnplugRecord) and r.kind == "started"
    )
    ends = Counter(r.alias for r in records if isinstance(r, UnplugRecord) and r.kind == "ended")
    assert starts == ends == Counter({f"ua-d{i}": 1 for i in range(5)})


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
    await _holding(gf, "live")
    tasks += [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in (2, 3)
    ]
    await _settle()
    gf.fail["live"] = BackendError(ErrorCode.OPERATION_FAILED, "boom")
    for t in tasks:
        t.cancel()
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _settle(0.2)
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


async def test_aclose_while_shared_reads_held_own_cancellation_wins(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(3):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}")
    svc = DetachService(backend=gf)
    await svc.open()
    gf.hold["live"] = gate = threading.Event()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(3)
    ]
    await _holding(gf, "live")
    tasks[0].cancel()
    closing = asyncio.create_task(svc.aclose())
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.5)
    gate.set()
    await asyncio.wait_for(closing, 5)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    for i in (1, 2):
        assert isinstance(outcomes[i], ServiceClosed), outcomes
        assert (outcomes[i].domain, outcomes[i].alias) == ("vm", f"ua-d{i}")  # type: ignore[union-attr]
    assert gf.requests == []
    assert _others() == set()


async def test_aclose_while_shared_recheck_read_is_stuck(gf: GateFake) -> None:
    dom = gf.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"sd{i}", alias=f"ua-d{i}", unplug=Unplug.never())
    svc = DetachService(backend=gf, settings=DetachSettings(timeout=0.2, attempts=3))
    await svc.open()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias=f"ua-d{i}", persistent=False)) for i in range(5)
    ]
    await _settle(0.05)
    gf.hold["live"] = gate = threading.Event()
    await _holding(gf, "live")  # the re-check's read is stuck in its thread
    t0 = time.monotonic()
    closing = asyncio.create_task(svc.aclose())
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
    assert all(isinstance(o, ServiceClosed) for o in outcomes), outcomes
    assert [(o.domain, o.alias) for o in outcomes] == [("vm", f"ua-d{i}") for i in range(5)]  # type: ignore[union-attr]
    await asyncio.wait_for(closing, 5)
    assert time.monotonic() - t0 < 3
    gate.set()
    assert len(gf.requests) == 5


async def test_aclose_started_when_a_request_is_answered_ends_the_caller_promptly(
    gf: GateFake,
) -> None:
    """The first park after a request: aclose() begun from a hook on
    ``request_sent`` (e.g. an agent that shuts down once a request is out)
    lands its close step in the iteration after the driver parked."""
    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    closers: list[asyncio.Task[None]] = []
    svc: DetachService

    def hook(record: Any) -> None:
        if isinstance(record, UnplugRecord) and record.kind == "request_sent" and not closers:
            closers.append(asyncio.ensure_future(svc.aclose()))

    svc = DetachService(backend=gf, settings=DetachSettings(timeout=30), hooks=[hook])
    await svc.open()
    caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    for _ in range(100):
        if closers:
            break
        await asyncio.sleep(0.01)
    await asyncio.wait_for(closers[0], 5)
    try:
        with pytest.raises(ServiceClosed):
            await asyncio.wait_for(caller, 2)
    finally:
        caller.cancel()
    assert _others() == set()


async def test_open_then_aclose_with_a_recovered_parked_unplug_ends_it_at_close(
    gf: GateFake, tmp_path: Path
) -> None:
    """``async with DetachService(journal=...)`` that takes up a pending unplug
    and exits at once: the taken-up unplug parks in its driver's first step,
    in the same loop iteration as the close's first step."""
    from aiodetach.instrumentation import ConnectionRecord

    dom = gf.add_domain("vm")
    dom.add_disk("sda", alias="ua-d", unplug=Unplug.manual())
    path = tmp_path / "j.db"
    settings_ = DetachSettings(timeout=0.5, attempts=3)
    async with DetachService(backend=gf, settings=settings_, journal=path) as first:
        caller = asyncio.create_task(first.detach("vm", alias="ua-d", persistent=False))
        await _settle(0.05)
    with pytest.raises(ServiceClosed):
        await caller
    records: list[Any] = []
    svc = DetachService(backend=gf, settings=settings_, journal=path, hooks=[records.append])
    await svc.open()
    assert [r.outcome for r in svc.recovered()] == ["pending"]
    await svc.aclose()
    closed_at = next(
        i for i, r in enumerate(records) if isinstance(r, ConnectionRecord) and r.kind == "closed"
    )
    await _settle(1.5)  # the window, then one timeout of lingering
    ends = [i for i, r in enumerate(records) if isinstance(r, UnplugRecord) and r.kind == "ended"]
    assert len(ends) == 1
    assert ends[0] < closed_at, "the taken-up unplug ended after the service had closed"
    assert _others() == set()
