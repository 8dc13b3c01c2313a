"""Embedding promises of the blocking facade attacked through the public API,
on the fake: what may be read from an event loop's thread (the facade's own,
in a hook, or a caller's), and what ends when the facade closes."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiodetach import BlockingDetachService, DetachResult, DetachSettings, DeviceEvent
from aiodetach.instrumentation import DetachRecord, Record
from aiodetach.testing import FakeHypervisor, GuestUnplug

WAIT = 60.0  # bounds waits for conditions against a hang only: never reached when green
ROOT = Path(__file__).resolve().parents[2]


def test_what_does_not_block_is_answered_from_an_event_loop_thread(
    fake: FakeHypervisor,
) -> None:
    """``uri``, ``settings`` and ``recovered()`` block nothing: an asyncio
    program holding a facade for its threads (or a hook labelling a metric)
    reads them on a loop's thread without `CalledFromEventLoop`."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())
    seen_in_hook: list[str] = []
    holder: list[BlockingDetachService] = []

    def hook(record: Record) -> None:
        if isinstance(record, DetachRecord) and record.kind == "started" and holder:
            seen_in_hook.append(holder[0].uri)

    settings = DetachSettings(attempts=3, timeout=5)
    with BlockingDetachService(backend=fake, hooks=[hook], settings=settings) as svc:
        holder.append(svc)

        async def from_a_loop() -> tuple[str, DetachSettings, int, bool]:
            return svc.uri, svc.settings, len(svc.recovered()), svc.closed

        assert asyncio.run(from_a_loop()) == (fake.uri, settings, 0, False)
        assert svc.detach("vm", alias="ua-disk1").attempts == 1
    assert seen_in_hook == [fake.uri]


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Garbage is collected only where the test says (``gc.collect()``)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_automatic_gc")
def test_an_events_iterator_finalized_on_the_facades_own_thread_does_not_deadlock_it(
    fake: FakeHypervisor,
) -> None:
    """An ``events()`` iterator a thread left unclosed in a reference cycle is
    finalized by the garbage collector in whatever thread it runs, the
    facade's loop thread included (here: a hook that allocates enough to
    trigger it).  Its close must not wait there for that very loop."""
    vm = fake.add_domain("vm")
    for i in range(20):
        vm.add_disk(f"vd{i}", alias=f"ua-d{i}", unplug=GuestUnplug.now())
    vm.add_disk("vdz", alias="ua-collect", unplug=GuestUnplug.now())

    def hook(record: Record) -> None:
        if (
            isinstance(record, DetachRecord)
            and record.kind == "started"
            and record.alias == "ua-collect"
        ):
            gc.collect()  # on the facade's loop thread

    svc = BlockingDetachService(backend=fake, hooks=[hook], log=False)
    try:
        seen: list[DeviceEvent] = []
        watching = threading.Event()

        def watch() -> None:
            stream = svc.events("vm")
            watching.set()
            seen.append(next(stream))
            cycle: list[object] = [stream]
            cycle.append(cycle)  # left unclosed: only the collector frees it

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert watching.wait(WAIT)
        for i in range(20):  # until the stream (watching from its first next()) saw one
            svc.detach("vm", alias=f"ua-d{i}")
            watcher.join(0.05)
            if not watcher.is_alive():
                break
        watcher.join(WAIT)
        assert seen
        assert seen[0].kind == "device-removed"

        done: list[DetachResult] = []
        caller = threading.Thread(
            target=lambda: done.append(svc.detach("vm", alias="ua-collect")), daemon=True
        )
        caller.start()
        caller.join(WAIT)
        assert done, "the facade's loop is deadlocked"
        assert done[0].attempts == 1
    finally:
        svc.close(timeout=WAIT)


DROPPED_SCRIPT = textwrap.dedent(
    """
    import gc
    from aiodetach import BlockingDetachService
    from aiodetach.instrumentation import ConnectionRecord
    from aiodetach.testing import FakeHypervisor, GuestUnplug

    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())

    def hook(record):
        if isinstance(record, ConnectionRecord):
            print("connection", record.kind, flush=True)

    # Used once and dropped, never closed (nor referenced any more).
    svc = BlockingDetachService(backend=fake, hooks=[hook], log=False)
    print("attempts", svc.detach("vm", alias="ua-disk1").attempts, flush=True)
    del svc
    gc.collect()
    print("main: leaving", flush=True)
    """
)


def test_a_facade_dropped_without_close_is_closed_at_interpreter_exit() -> None:
    """A facade its caller dropped unclosed still runs its service (its
    connections, its journal) on the loop thread: the exit hook closes it
    as it closes one still referenced."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", DROPPED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard: exit takes well under a second when green
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "connection connected",
        "attempts 1",
        "main: leaving",
        "connection closed",
    ], done.stderr


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_a_hook_raising_keyboardinterrupt_reaches_its_caller_and_the_facade_goes_on(
    fake: FakeHypervisor, raised: type[BaseException]
) -> None:
    """`KeyboardInterrupt` and `SystemExit` from a hook go through, as asyncio
    lets them (instrumentation.md): to the awaiting caller of a
    `DetachService`.  Through the facade they ended its loop thread: the
    calling thread waited for ever, later calls raised ``RuntimeError``."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())
    vm.add_disk("vdc", alias="ua-disk2", unplug=GuestUnplug.now())

    def hook(record: Record) -> None:
        if (
            isinstance(record, DetachRecord)
            and record.kind == "started"
            and record.alias == "ua-disk1"
        ):
            raise raised("a hook's own")

    svc = BlockingDetachService(backend=fake, hooks=[hook], log=False)
    try:
        outcome: list[BaseException | DetachResult] = []

        def call() -> None:
            try:
                outcome.append(svc.detach("vm", alias="ua-disk1"))
            except BaseException as exc:  # the test looks at it
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(WAIT)
        assert not caller.is_alive(), "the caller waits for ever"
        assert type(outcome[0]) is raised
        assert svc.detach("vm", alias="ua-disk2").attempts == 1  # the facade goes on
    finally:
        svc.close(timeout=WAIT)
