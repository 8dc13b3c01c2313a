"""The blocking facade (``BlockingDetachService``) from many threads at once,
on the fake: the same results, errors and joins as ``DetachService``; a
caller's own timeout; close with calls pending; calls from an event loop's
thread refused; a facade left open at interpreter exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from aiodetach import BlockingDetachService, DetachResult, DetachSettings, DeviceEvent
from aiodetach.errors import (
    CalledFromEventLoop,
    DetachError,
    DetachTimeout,
    DeviceNotFound,
    InvalidRequest,
    ServiceClosed,
)
from aiodetach.instrumentation import DetachRecord, Record, UnplugRecord
from aiodetach.testing import FakeHypervisor, GuestUnplug

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0  # bounds waits for conditions against a hang only: never reached when green


class Steps:
    """A hook counting (kind, alias) of every record; waits are on conditions."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str | None]] = Counter()
        self.cond = threading.Condition()

    def __call__(self, record: Record) -> None:
        if isinstance(record, (UnplugRecord, DetachRecord)):
            with self.cond:
                self.counts[(record.kind, record.alias)] += 1
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[Counter[tuple[str, str | None]]], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.counts), WAIT)


def _joined(alias: str, n: int) -> Callable[[Counter[tuple[str, str | None]]], bool]:
    return lambda c: c[("unplug_started", alias)] + c[("unplug_joined", alias)] >= n


def _sent(alias: str, n: int = 1) -> Callable[[Counter[tuple[str, str | None]]], bool]:
    return lambda c: c[("request_sent", alias)] >= n


def _blocking_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aiodetach-blocking"]


@pytest.fixture
def steps() -> Steps:
    return Steps()


@pytest.fixture
def open_facade(
    fake: FakeHypervisor, steps: Steps
) -> Iterator[Callable[..., BlockingDetachService]]:
    made: list[BlockingDetachService] = []

    def make(settings: DetachSettings | None = None) -> BlockingDetachService:
        svc = BlockingDetachService(
            backend=fake,
            hooks=[steps],
            settings=settings or DetachSettings(attempts=2, timeout=30.0),
        )
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def test_many_threads_many_devices_and_eight_threads_on_one(
    fake: FakeHypervisor, steps: Steps, open_facade: Callable[..., BlockingDetachService]
) -> None:
    vm = fake.add_domain("vm")
    for i in range(32):
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=GuestUnplug.later(0.01))
    vm.add_disk("vdz", alias="ua-shared", unplug=GuestUnplug.manual())
    svc = open_facade()
    start = threading.Barrier(40)

    def detach(alias: str) -> DetachResult:
        start.wait(WAIT)
        return svc.detach("vm", alias=alias)

    with ThreadPoolExecutor(max_workers=40) as pool:
        own = [pool.submit(detach, f"ua-d{i}") for i in range(32)]
        shared = [pool.submit(detach, "ua-shared") for _ in range(8)]
        # All eight are on the one unplug, its request out, before the guest lets go.
        steps.wait_for(_joined("ua-shared", 8))
        steps.wait_for(_sent("ua-shared"))
        fake.complete("vm", "ua-shared")
        results = [f.result(WAIT) for f in own]
        joint = [f.result(WAIT) for f in shared]

    assert [r.alias for r in results] == [f"ua-d{i}" for i in range(32)]
    assert all(r.confirmed_by == "event" and r.attempts == 1 for r in results + joint)
    assert {r.alias for r in joint} == {"ua-shared"}
    assert sorted(r.joined for r in joint) == [False] + [True] * 7
    sent = Counter(req.alias for req in fake.requests)
    assert sent == Counter({f"ua-d{i}": 1 for i in range(32)} | {"ua-shared": 1})
    assert svc.pending() == []


def test_errors_are_the_services_own_raised_in_the_callers_thread(
    fake: FakeHypervisor, open_facade: Callable[..., BlockingDetachService]
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())
    svc = open_facade()
    caught: Future[BaseException] = Future()

    def call() -> None:
        try:
            svc.detach("vm", alias="ua-nope")
        except BaseException as exc:  # handed to the test's thread
            caught.set_result(exc)

    worker = threading.Thread(target=call, name="caller")
    worker.start()
    worker.join(WAIT)
    exc = caught.result(WAIT)
    assert type(exc) is DeviceNotFound
    assert (exc.domain, exc.alias) == ("vm", "ua-nope")
    frames = traceback.extract_tb(exc.__traceback__)
    # It starts where the caller called, and goes on into the service's frames.
    assert (frames[0].name, frames[0].line) == ("call", 'svc.detach("vm", alias="ua-nope")')
    assert any(f.name == "detach" and f.filename.endswith("_service.py") for f in frames)
    with pytest.raises(InvalidRequest) as invalid:
        svc.detach("vm")  # no device named
    assert invalid.value.domain is None or invalid.value.domain == "vm"
    assert fake.requests == []


def test_constructor_takes_the_services_arguments_and_raises_its_errors(
    fake: FakeHypervisor,
) -> None:
    before = len(_blocking_threads())
    with pytest.raises(InvalidRequest):
        BlockingDetachService("")  # the service's own check, raised here
    with pytest.raises(InvalidRequest):
        BlockingDetachService(backend=fake, journal=42)  # type: ignore[arg-type]
    assert len(_blocking_threads()) == before  # nothing left running
    settings = DetachSettings(attempts=3, timeout=7.0)
    with BlockingDetachService(backend=fake, settings=settings, log=False) as svc:
        assert svc.settings is settings
        assert svc.uri == fake.uri
        assert not svc.closed
    assert svc.closed
    assert len(_blocking_threads()) == before


def test_a_callers_timeout_leaves_the_unplug_to_its_rules(
    fake: FakeHypervisor, steps: Steps, open_facade: Callable[..., BlockingDetachService]
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.manual())
    svc = open_facade()
    with ThreadPoolExecutor(max_workers=1) as pool:
        patient = pool.submit(svc.detach, "vm", alias="ua-disk1")
        steps.wait_for(_sent("ua-disk1"))
        with pytest.raises(TimeoutError) as gave_up:
            svc.detach("vm", alias="ua-disk1", timeout=0.05)
        assert not isinstance(gave_up.value, DetachError)  # not the guest's DetachTimeout
        # Its leaving cancelled nothing and sent nothing: the unplug goes on.
        assert svc.pending() == [(fake.domain("vm").uuid, "ua-disk1")]
        fake.complete("vm", "ua-disk1")
        result = patient.result(WAIT)
    assert result.attempts == 1
    assert len(fake.requests) == 1


def test_the_guests_timeout_is_not_taken_for_the_callers(
    fake: FakeHypervisor, open_facade: Callable[..., BlockingDetachService]
) -> None:
    # DetachTimeout is a TimeoutError too: it must reach the caller as itself.
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.never())
    svc = open_facade(DetachSettings(attempts=1, timeout=0.05))
    for timeout in (None, WAIT):
        with pytest.raises(DetachTimeout) as stayed:
            svc.detach("vm", alias="ua-disk1", timeout=timeout)
        assert (stayed.value.alias, stayed.value.attempts) == ("ua-disk1", 1)
    for bad in (-1, float("nan"), float("inf"), "5", True):
        with pytest.raises(InvalidRequest, match="timeout"):
            svc.detach("vm", alias="ua-disk1", timeout=bad)  # type: ignore[arg-type]


def test_a_lone_caller_that_gives_up_never_causes_a_second_request(
    fake: FakeHypervisor, steps: Steps, open_facade: Callable[..., BlockingDetachService]
) -> None:
    # As a cancelled awaiting caller: a request it had out is remembered for
    # its window, so asking again joins it instead of sending another.
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.manual())
    svc = open_facade()
    with pytest.raises(TimeoutError):
        svc.detach("vm", alias="ua-disk1", timeout=0.2)
    sent_before = steps.counts[("request_sent", "ua-disk1")]
    with ThreadPoolExecutor(max_workers=1) as pool:
        again = pool.submit(svc.detach, "vm", alias="ua-disk1")
        steps.wait_for(_joined("ua-disk1", 2 if sent_before else 1))
        steps.wait_for(_sent("ua-disk1"))
        fake.complete("vm", "ua-disk1")
        result = again.result(WAIT)
    assert result.attempts == 1
    if sent_before:  # (on a slow machine the caller may give up before it went out)
        assert result.joined
    assert len(fake.requests) == 1


def test_close_while_calls_are_pending_in_other_threads(
    fake: FakeHypervisor, steps: Steps, open_facade: Callable[..., BlockingDetachService]
) -> None:
    vm = fake.add_domain("vm")
    for i in range(8):
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=GuestUnplug.never())
    before = len(_blocking_threads())
    svc = open_facade()

    def detach(alias: str) -> BaseException | DetachResult:
        try:
            return svc.detach("vm", alias=alias)
        except BaseException as exc:  # the test looks at it
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        calls = [pool.submit(detach, f"ua-d{i}") for i in range(8)]
        for i in range(8):
            steps.wait_for(_sent(f"ua-d{i}"))
        svc.close()
        ended = [f.result(WAIT) for f in calls]
    assert all(type(e) is ServiceClosed for e in ended), ended
    assert len(_blocking_threads()) == before  # the loop thread ended with close()
    with pytest.raises(ServiceClosed):
        svc.detach("vm", alias="ua-d0")
    with pytest.raises(ServiceClosed):
        svc.pending()
    svc.close()  # idempotent
    assert len(fake.requests) == 8


def test_blocking_calls_from_an_event_loop_thread_are_refused(
    fake: FakeHypervisor, open_facade: Callable[..., BlockingDetachService]
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())
    svc = open_facade()

    async def from_a_loop() -> None:
        with pytest.raises(CalledFromEventLoop, match=r"use aiodetach\.DetachService"):
            svc.detach("vm", alias="ua-disk1")
        with pytest.raises(CalledFromEventLoop):
            BlockingDetachService(backend=fake)
        with pytest.raises(CalledFromEventLoop):
            svc.close()

    asyncio.run(from_a_loop())
    assert fake.requests == []
    assert svc.detach("vm", alias="ua-disk1").attempts == 1  # the facade is unharmed


def test_a_hook_calling_the_facade_from_its_own_loop_is_refused(
    fake: FakeHypervisor,
) -> None:
    # The facade's own thread runs its loop: a blocking call there would deadlock.
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())
    refused: list[BaseException] = []
    holder: list[BlockingDetachService] = []

    def hook(record: Record) -> None:
        if isinstance(record, DetachRecord) and record.kind == "started" and holder:
            try:
                holder[0].pending()
            except CalledFromEventLoop as exc:
                refused.append(exc)

    with BlockingDetachService(backend=fake, hooks=[hook]) as svc:
        holder.append(svc)
        assert svc.detach("vm", alias="ua-disk1").attempts == 1
    assert len(refused) == 1


def test_detach_many_and_events_block_too(
    fake: FakeHypervisor, steps: Steps, open_facade: Callable[..., BlockingDetachService]
) -> None:
    vm = fake.add_domain("vm")
    for i in range(4):
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=GuestUnplug.later(0.01))
    svc = open_facade()
    seen: list[DeviceEvent] = []
    arrived = threading.Condition()

    def watch() -> None:
        for event in svc.events("vm"):
            with arrived:
                seen.append(event)
                arrived.notify_all()

    watcher = threading.Thread(target=watch)
    watcher.start()
    # The stream watches from its first next(), in the watcher's thread: knock
    # (an event for a device nobody detaches) until it answers.
    with arrived:
        while not seen:
            fake.emit_removed("vm", "ua-knock")
            arrived.wait(0.05)
    progress: list[int] = []
    outcomes = svc.detach_many(
        [{"domain": "vm", "alias": f"ua-d{i}"} for i in range(4)],
        on_progress=lambda _o, done, _total: progress.append(done),
    )
    assert [o.result.alias for o in outcomes if o.result is not None] == [
        f"ua-d{i}" for i in range(4)
    ]
    assert sorted(progress) == [1, 2, 3, 4]
    with arrived:
        assert arrived.wait_for(
            lambda: {f"ua-d{i}" for i in range(4)} <= {e.alias for e in seen}, WAIT
        )
    svc.close()  # the stream ends with the service, quietly
    watcher.join(WAIT)
    assert not watcher.is_alive()
    with pytest.raises(ServiceClosed):
        next(iter(svc.events()))


EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, threading
    from aiodetach import BlockingDetachService
    from aiodetach.instrumentation import UnplugRecord
    from aiodetach.testing import FakeHypervisor, GuestUnplug

    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.never())
    sent = threading.Event()

    def hook(record):
        if isinstance(record, UnplugRecord) and record.kind == "request_sent":
            sent.set()

    svc = BlockingDetachService(backend=fake, hooks=[hook], log=False)

    def worker():  # a non-daemon thread, blocked in a detach at exit
        try:
            svc.detach("vm", alias="ua-disk1")
        except Exception as exc:
            print("worker:", type(exc).__name__, exc.domain, exc.alias, flush=True)

    threading.Thread(target=worker).start()
    sent.wait(60)

    @atexit.register  # runs after every thread was joined
    def report():
        alive = [t.name for t in threading.enumerate() if t.name == "aiodetach-blocking"]
        print("loop threads left:", alive, "closed:", svc.closed, flush=True)

    print("main: leaving with the facade open", flush=True)
    """
)


def test_interpreter_exit_with_the_facade_open_closes_it() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", EXIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard: exit takes well under a second when green
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "main: leaving with the facade open",
        "worker: ServiceClosed vm ua-disk1",
        "loop threads left: [] closed: True",
    ], done.stderr
