"""Edges of parked unplugs on one shared timer (``aiodetach._deadlines``:
windows on time, journal take-ups out of order, pauses, restarts, close, what
is released when), of shared reads with a plain future per caller, and of
errors shared by joined callers (each owns its copy), through the public API
(DetachService + FakeHypervisor; review probes).  gc-based checks look for
``aiodetach._unplug.Unplug`` instances left alive."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach._unplug import Unplug as _LiveUnplug
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import DetachError, DetachTimeout, ServiceClosed
from aiodetach.instrumentation import UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug


def _times(fake: FakeHypervisor) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in fake.requests:
        out[r.alias].append(r.at)
    return out


def _live_unplugs() -> list[_LiveUnplug]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, _LiveUnplug)]


async def _until(cond: Any, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never came"
        await asyncio.sleep(0.005)


def _vm_with_disks(n: int, unplug: Callable[[int], Unplug]) -> FakeHypervisor:
    """A fake with domain "vm" holding disks vd0… (aliases ua-0…), ``unplug(i)`` each."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    for i in range(n):
        dom.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=unplug(i))
    return fake


# -- windows end on time with many parked, some woken early ------------------------------------


async def test_staggered_parked_windows_resend_exactly_after_timeout() -> None:
    n = 24
    fake = _vm_with_disks(n, lambda i: Unplug.never() if i % 2 == 0 else Unplug.manual())
    timeout = 0.3
    settings = DetachSettings(timeout=timeout, attempts=2)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")))
            await asyncio.sleep(0.005)
        await _until(lambda: len(fake.requests) == n)
        await asyncio.sleep(0.01)
        for i in range(1, n, 2):  # woken early: their queue entries go stale
            fake.complete("vm", f"ua-{i}")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert svc.pending() == []
    times = _times(fake)
    for i in range(n):
        alias = f"ua-{i}"
        if i % 2:
            assert results[i].confirmed_by == "event", results[i]  # type: ignore[union-attr]
            assert len(times[alias]) == 1
        else:
            err = results[i]
            assert isinstance(err, DetachTimeout), err
            assert err.attempts == 2
            assert err.alias == alias
            assert err.domain == "vm"
            first, second = times[alias]
            gap = second - first
            assert timeout - 0.01 <= gap <= timeout + 0.12, (alias, gap)


async def test_journal_take_ups_out_of_order_end_at_their_own_window(tmp_path: Path) -> None:
    """Windows taken up from the journal out of deadline order (one re-sent
    before the other was first sent): neither is re-sent before its window
    ends, both soon after."""
    journal = tmp_path / "j.db"
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vda", alias="ua-a", unplug=Unplug.never())
    dom.add_disk("vdb", alias="ua-b", unplug=Unplug.never())
    settings = DetachSettings(timeout=0.6, attempts=4, journal_sync="normal")
    async with DetachService(backend=fake, settings=settings, journal=journal, log=False) as svc:
        a = asyncio.create_task(svc.detach("vm", alias="ua-a"))
        await _until(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.45)
        b = asyncio.create_task(svc.detach("vm", alias="ua-b"))
        await _until(lambda: len(_times(fake)["ua-a"]) == 2)  # a re-sent after b's first
        await asyncio.sleep(0.05)
    await asyncio.gather(a, b, return_exceptions=True)
    sent = _times(fake)
    a_end = sent["ua-a"][-1] + 0.6
    b_end = sent["ua-b"][-1] + 0.6
    assert a_end > b_end  # a's row comes first in the journal, its window ends last
    async with DetachService(backend=fake, settings=settings, journal=journal, log=False) as svc:
        assert sorted(k[1] for k in svc.pending()) == ["ua-a", "ua-b"]
        a = asyncio.create_task(svc.detach("vm", alias="ua-a"))
        b = asyncio.create_task(svc.detach("vm", alias="ua-b"))
        await _until(lambda: len(_times(fake)["ua-a"]) == 3 and len(_times(fake)["ua-b"]) == 2)
        sent = _times(fake)
        assert a_end - 0.01 <= sent["ua-a"][2] <= a_end + 0.15
        assert b_end - 0.01 <= sent["ua-b"][1] <= b_end + 0.15
        for dev in ("ua-a", "ua-b"):
            fake.complete("vm", dev)
        ra, rb = await asyncio.gather(a, b)
        assert ra.resumed
        assert rb.resumed


# -- paused domain: no clock while paused, a full timeout after -------------------------------


async def test_paused_while_parked_then_full_timeout_after_resume() -> None:
    fake = _vm_with_disks(6, lambda _i: Unplug.manual())
    settings = DetachSettings(timeout=0.25, attempts=2)
    steps: list[tuple[float, str, str]] = []

    def hook(rec: Any) -> None:
        if isinstance(rec, UnplugRecord):
            steps.append((time.monotonic(), rec.alias, rec.kind))

    async with DetachService(backend=fake, settings=settings, hooks=[hook], log=False) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(6)]
        await _until(lambda: len(fake.requests) == 6)
        fake.pause_domain("vm")
        await asyncio.sleep(0.6)  # windows over while paused: no re-send, no attempt used
        assert len(fake.requests) == 6
        resumed_at = time.monotonic()
        fake.resume_domain("vm")
        await asyncio.sleep(0.15)  # well inside the full timeout given after RESUMED
        assert len(fake.requests) == 6
        fake.complete("vm", "ua-0")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0].confirmed_by == "event"  # type: ignore[union-attr]
    times = _times(fake)
    for i in range(1, 6):
        err = results[i]
        assert isinstance(err, DetachTimeout), err
        assert len(times[f"ua-{i}"]) == 2
        # the re-send comes a full timeout after the guest runs again
        assert times[f"ua-{i}"][1] >= resumed_at + 0.25 - 0.01


# -- connection lost / restart while parked ---------------------------------------------------


async def test_crash_while_many_parked_wakes_them_without_resend() -> None:
    n = 20
    fake = _vm_with_disks(n, lambda _i: Unplug.manual())
    settings = DetachSettings(timeout=0.8, attempts=2, reconnect_timeout=5)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(n)]
        await _until(lambda: len(fake.requests) == n)
        first = {r.alias: r.at for r in fake.requests}
        fake.crash()
        await asyncio.sleep(0.1)
        # removed while the connection was down: the event is lost for good
        for i in range(0, n, 2):
            fake.complete("vm", f"ua-{i}", emit=False)
        fake.restart()
        done = await asyncio.wait_for(
            asyncio.gather(*[tasks[i] for i in range(0, n, 2)]), timeout=0.6
        )
        assert all(r.confirmed_by == "xml" for r in done)
        assert len(fake.requests) == n  # nobody re-sent inside its window
        await _until(lambda: len(fake.requests) == n + n // 2, limit=3)
        for r in fake.requests[n:]:
            assert r.at - first[r.alias] >= 0.8 - 0.01
        for i in range(1, n, 2):
            fake.complete("vm", f"ua-{i}")
        await asyncio.gather(*tasks)
        assert svc.pending() == []


# -- aclose while many parked -----------------------------------------------------------------


async def test_aclose_with_many_parked_ends_everything_promptly_and_keeps_nothing() -> None:
    n = 300
    fake = _vm_with_disks(n, lambda _i: Unplug.never())
    svc = DetachService(backend=fake, settings=DetachSettings(timeout=30, attempts=2), log=False)
    await svc.open()
    tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(n)]
    await _until(lambda: len(fake.requests) == n)
    await asyncio.sleep(0.05)
    # Some callers leave (the unplug stays, parked for nobody); some wake early.
    for t in tasks[:50]:
        t.cancel()
    t0 = time.monotonic()
    await asyncio.wait_for(svc.aclose(), 2)
    await svc.aclose()  # idempotent
    assert time.monotonic() - t0 < 1.0
    seen: list[tuple[str, str | None, str | None]] = []
    for t in tasks:
        try:
            await t
        except asyncio.CancelledError:
            seen.append(("cancelled", None, None))
        except ServiceClosed as exc:
            seen.append(("closed", exc.domain, exc.alias))
    assert all(s[0] == "cancelled" for s in seen[:50])
    for kind, domain, alias in seen[50:]:
        assert kind == "closed"
        assert domain == "vm"
        assert alias is not None
    assert svc.pending() == []
    del tasks, t
    assert _live_unplugs() == []


# -- nothing kept once everything ended -------------------------------------------------------


async def test_ended_unplug_not_kept_by_a_stale_queue_entry_once_nothing_is_parked() -> None:
    """B is woken early (its entry goes stale, 1 of 2: not compacted yet);
    A's entry comes up and A ends on its timeout.  Nothing is parked any
    more, so the queue keeps nothing (compacted when what is left after a
    firing is mostly stale), rather than B until its old deadline."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vda", alias="ua-a", unplug=Unplug.never())
    dom.add_disk("vdb", alias="ua-b", unplug=Unplug.manual())
    settings = DetachSettings(timeout=0.5, attempts=1)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        a = asyncio.create_task(svc.detach("vm", alias="ua-a"))
        await _until(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.35)
        b = asyncio.create_task(svc.detach("vm", alias="ua-b"))
        await _until(lambda: len(fake.requests) == 2)
        await asyncio.sleep(0.02)
        fake.complete("vm", "ua-b")
        assert (await b).confirmed_by == "event"
        with pytest.raises(DetachTimeout):
            await a
        assert svc.pending() == []
        await asyncio.sleep(0.02)
        del a, b
        left = _live_unplugs()
        assert left == [], [(u.key, u.phase) for u in left]


async def test_many_woken_early_leave_nothing_behind() -> None:
    n = 200
    fake = _vm_with_disks(n, lambda _i: Unplug.manual())
    async with DetachService(
        backend=fake, settings=DetachSettings(timeout=30, attempts=1), log=False
    ) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(n)]
        await _until(lambda: len(fake.requests) == n)
        await asyncio.sleep(0.02)
        for i in reversed(range(n)):
            fake.complete("vm", f"ua-{i}")
        await asyncio.gather(*tasks)
        assert svc.pending() == []
        del tasks
        await asyncio.sleep(0.02)
        assert _live_unplugs() == []


# -- shared reads: a cancelled caller, a failed read ------------------------------------------


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


async def test_callers_joined_to_one_unplug_do_not_share_one_exception_object() -> None:
    """Two callers of one device whose unplug times out: each should get an
    exception object of its own (a note or attribute one caller adds, or its
    traceback, must not show up in the other's)."""
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(timeout=0.1, attempts=1)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        one = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        two = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        e1, e2 = await asyncio.gather(one, two, return_exceptions=True)
    assert isinstance(e1, DetachTimeout)
    assert isinstance(e2, DetachTimeout)
    assert len(fake.requests) == 1
    e1.add_note("seen by caller one")
    assert "seen by caller one" not in getattr(e2, "__notes__", [])
    assert e1 is not e2


async def test_a_callers_traceback_is_not_replaced_by_another_callers() -> None:
    """Two different callers of one unplug that fails: the traceback caller
    one holds should go through caller one's code, not caller two's."""
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.reject())
    async with DetachService(backend=fake, log=False) as svc:

        async def caller_one() -> BaseException:
            try:
                await svc.detach("vm", alias="ua-d", persistent=False)
            except DetachError as exc:
                return exc
            raise AssertionError("no error")

        async def caller_two() -> BaseException:
            try:
                await svc.detach("vm", alias="ua-d", persistent=False)
            except DetachError as exc:
                return exc
            raise AssertionError("no error")

        e1, _e2 = await asyncio.gather(caller_one(), caller_two())
    names = [f.name for f in traceback.extract_tb(e1.__traceback__)]
    assert "caller_one" in names, names


async def test_errors_are_typed_and_name_domain_and_alias() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vda", alias="ua-r", unplug=Unplug.reject())
    dom.add_disk("vdb", alias="ua-t", unplug=Unplug.never())
    dom.add_disk("vdc", alias="ua-s", unplug=Unplug.manual())
    settings = DetachSettings(timeout=0.1, attempts=2)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = {
            a: asyncio.create_task(svc.detach("vm", alias=a)) for a in ("ua-r", "ua-t", "ua-s")
        }
        await _until(lambda: len(fake.requests) >= 3)
        fake.stop_domain("vm")
        out = {a: await asyncio.gather(t, return_exceptions=True) for a, t in tasks.items()}
    for alias, (err,) in out.items():
        assert isinstance(err, DetachError), err
        assert err.domain == "vm", err
        assert err.alias == alias, err


# -- busy back-off, callers leaving and coming back, mass compaction ---------------------------


async def test_busy_refusals_use_no_attempt_and_then_park() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    for i in range(5):
        dom.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug(behaviour="manual", busy_first=2))
    settings = DetachSettings(timeout=0.4, attempts=1)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=f"ua-{i}")) for i in range(5)]
        await _until(lambda: len(fake.requests) == 15)
        await asyncio.sleep(0.05)
        assert len(svc.pending()) == 5
        for i in range(5):
            fake.complete("vm", f"ua-{i}")
        results = await asyncio.gather(*tasks)
    assert [r.attempts for r in results] == [1] * 5
    assert fake.busy_refusals == 10


async def test_caller_leaves_while_parked_and_returns_after_the_window() -> None:
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    timeout = 0.3
    settings = DetachSettings(timeout=timeout, attempts=2)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        await _until(lambda: len(fake.requests) == 1)
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.1)
        assert len(svc.pending()) == 1
        assert len(fake.requests) == 1
        await asyncio.sleep(0.2)  # window over, lingering for nobody
        assert len(fake.requests) == 1
        back = time.monotonic()
        with pytest.raises(DetachTimeout) as info:
            await svc.detach("vm", alias="ua-d")
        assert info.value.attempts == 2
        del info  # (its traceback keeps the call's frame, and the unplug, alive)
        assert len(fake.requests) == 2
        assert fake.requests[1].at - back < 0.1  # re-checked and re-sent at once
        assert time.monotonic() - fake.requests[1].at >= timeout - 0.01
        assert svc.pending() == []
        # the same again, nobody coming back: dropped after window + timeout
        fake.domain("vm").add_disk("vdc", alias="ua-e", unplug=Unplug.never())
        lone = asyncio.create_task(svc.detach("vm", alias="ua-e"))
        await _until(lambda: len(fake.requests) == 3)
        lone.cancel()
        await asyncio.gather(lone, return_exceptions=True)
        del lone
        await asyncio.sleep(2 * timeout + 0.1)
        assert svc.pending() == []
        assert len(fake.requests) == 3
        left = _live_unplugs()
        assert left == [], [(u.key[1], u.phase) for u in left]


async def test_mass_wake_compacts_and_keeps_stale_entries_within_the_documented_bound() -> None:
    """Pins the documented bound: ended unplugs kept by stale entries are
    fewer than the parked ones (the queue stays within twice the parked)."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    n_never, n_done = 60, 180
    for i in range(n_never):
        dom.add_disk(f"vn{i}", alias=f"ua-n{i}", unplug=Unplug.never())
    for i in range(n_done):
        dom.add_disk(f"vm{i}", alias=f"ua-m{i}", unplug=Unplug.manual())
    async with DetachService(
        backend=fake, settings=DetachSettings(timeout=30, attempts=1), log=False
    ) as svc:
        stuck = [asyncio.create_task(svc.detach("vm", alias=f"ua-n{i}")) for i in range(n_never)]
        done = [asyncio.create_task(svc.detach("vm", alias=f"ua-m{i}")) for i in range(n_done)]
        await _until(lambda: len(fake.requests) == n_never + n_done)
        await asyncio.sleep(0.02)
        for i in range(n_done):
            fake.complete("vm", f"ua-m{i}")
        await asyncio.gather(*done)
        del done
        await asyncio.sleep(0.02)
        alive = {u.key[1] for u in _live_unplugs()}
        assert {f"ua-n{i}" for i in range(n_never)} <= alive
        ended_kept = len(alive) - n_never
        assert ended_kept <= n_never, ended_kept  # 59 of 180 here, until their old deadline
        assert svc._unplugs is not None
        assert len(svc._unplugs.deadlines) <= 2 * n_never
        for t in stuck:
            t.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)


async def test_result_descriptions_per_device_kind_and_selector() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.05))
    dom.add_interface("52:54:00:AA:BB:CC", alias="ua-n", unplug=Unplug.later(0.05))
    dom.add_hostdev("0x05", alias="ua-h", unplug=Unplug.later(0.05))
    async with DetachService(backend=fake, log=False) as svc:
        r = await asyncio.gather(
            svc.detach("vm", alias="ua-d"),
            svc.detach("vm", target="vdb"),
            svc.detach("vm", alias="ua-n"),
            svc.detach("vm", mac="52:54:00:aa:bb:cc"),
            svc.detach("vm", alias="ua-h"),
        )
    assert [x.device for x in r] == [
        "disk target='vdb' alias='ua-d'",
        "disk target='vdb' alias='ua-d'",
        "interface mac='52:54:00:aa:bb:cc' alias='ua-n'",
        "interface mac='52:54:00:aa:bb:cc' alias='ua-n'",
        "hostdev alias='ua-h'",
    ]
    assert r[1].joined
    assert r[3].joined
    assert len(fake.requests) == 3
