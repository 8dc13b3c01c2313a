"""Hooks, metrics, spans and the CLI's progress output at the edges: requests
that fail before they reach ``detach()``, hooks that raise or re-enter, a
broken logging pipeline, a close while a request sits in libvirt, and the
gauge of pending unplugs through every path (on the fake hypervisor)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from _probes import child_env
from _pty import Terminal
from aiodetach import DetachFleet, DetachOutcome, DetachResult, DetachService, DetachSettings
from aiodetach.errors import BatchAborted, DetachError, DetachTimeout
from aiodetach.instrumentation import (
    ConnectionRecord,
    DetachRecord,
    Record,
    UnplugRecord,
    otel_hook,
    prometheus_hook,
)
from aiodetach.testing import FakeHypervisor, Unplug

FAST = DetachSettings(attempts=2, timeout=0.2, reconnect_timeout=1.0, connect_timeout=1.0)
HELPER = Path(__file__).with_name("_cli_on_fake.py")

R = TypeVar("R", DetachRecord, UnplugRecord, ConnectionRecord)


class Recorder:
    """A hook keeping every record and the threads it was called on."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.threads: set[int] = set()

    def __call__(self, record: Record) -> None:
        self.records.append(record)
        self.threads.add(threading.get_ident())

    def of(self, cls: type[R]) -> list[R]:
        return [r for r in self.records if isinstance(r, cls)]

    def kinds(self, cls: type[R]) -> list[str]:
        return [r.kind for r in self.of(cls)]

    def finished(self) -> list[DetachRecord]:
        return [r for r in self.of(DetachRecord) if r.kind == "finished"]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def _raising_at(
    cls: type[Record], kind: str, exc_type: type[BaseException]
) -> Callable[[Record], None]:
    """A hook raising ``exc_type`` the first time it sees ``cls`` at ``kind``."""
    fired: list[bool] = []

    def hook(record: Record) -> None:
        if isinstance(record, cls) and record.kind == kind and not fired:
            fired.append(True)
            raise exc_type("hook bug")

    return hook


def _uncancel_self() -> None:
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()


# -- requests failing before detach() still get their records -------------------------


async def test_batch_items_with_a_missing_domain_get_started_and_finished_records(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-ok", unplug=Unplug.now())
    registry = CollectorRegistry()
    async with DetachService(
        backend=fake, settings=FAST, hooks=[rec, prometheus_hook(registry)]
    ) as svc:
        outcomes = await svc.detach_many(
            [
                {"domain": "vm", "alias": "ua-ok"},
                {"domain": "nope", "alias": "ua-x"},
                {"domain": "nope", "alias": "ua-y"},
            ]
        )
    assert [o.ok for o in outcomes] == [True, False, False]
    errors = registry.get_sample_value("aiodetach_detaches_total", {"outcome": "error"})
    assert rec.kinds(DetachRecord).count("started") == 3
    assert len(rec.finished()) == 3
    assert errors == 2.0


async def test_batch_with_a_missing_domain_and_no_per_domain_bound_is_recorded_too(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-ok", unplug=Unplug.now())
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        await svc.detach_many(
            [{"domain": "vm", "alias": "ua-ok"}, {"domain": "nope", "alias": "ua-x"}],
            per_domain=None,
        )
    assert len(rec.finished()) == 2


async def test_fleet_requests_to_an_unreachable_host_are_finished_and_counted(
    rec: Recorder,
) -> None:
    good = FakeHypervisor("fake://good")
    good.add_domain("vm").add_disk("vdb", alias="ua-ok", unplug=Unplug.now())
    bad = FakeHypervisor("fake://bad")
    bad.daemon_up = False
    fakes = {"fake://good": good, "fake://bad": bad}
    registry = CollectorRegistry()
    try:
        async with DetachFleet(
            settings=FAST,
            backend_factory=fakes.__getitem__,
            hooks=[rec, prometheus_hook(registry)],
        ) as fleet:
            outcomes = await fleet.detach_many(
                [
                    {"uri": "fake://good", "domain": "vm", "alias": "ua-ok"},
                    {"uri": "fake://bad", "domain": "vm", "alias": "ua-ok"},
                ]
            )
    finally:
        good.cancel_timers()
    assert [type(o.error).__name__ if o.error else "ok" for o in outcomes] == [
        "ok",
        "ConnectionLost",
    ]
    errors = registry.get_sample_value("aiodetach_detaches_total", {"outcome": "error"})
    assert len(rec.finished()) == 2
    assert errors == 1.0


async def test_fleet_detach_to_an_unreachable_host_gets_a_finished_record(
    rec: Recorder,
) -> None:
    bad = FakeHypervisor("fake://bad")
    bad.daemon_up = False
    async with DetachFleet(settings=FAST, backend_factory=lambda _u: bad, hooks=[rec]) as fleet:
        with pytest.raises(DetachError):
            await fleet.detach("fake://bad", "vm", alias="ua-ok")
    assert len(rec.finished()) == 1


# -- hooks raising CancelledError are isolated ----------------------------------------


async def test_cancelled_error_from_a_hook_at_unplug_started_changes_no_outcome(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    """A hook raising CancelledError (e.g. it called ``.result()`` on a cancelled
    future) is a broken hook, not a cancellation of the caller."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.never())
    registry = CollectorRegistry()
    hook = _raising_at(UnplugRecord, "started", asyncio.CancelledError)
    async with DetachService(
        backend=fake, settings=FAST, hooks=[hook, rec, prometheus_hook(registry)]
    ) as svc:
        outcome = "ok"
        try:
            await svc.detach("vm", alias="ua-disk1", persistent=False)
        except asyncio.CancelledError:
            outcome = "CancelledError"
            _uncancel_self()
        except DetachError as exc:
            outcome = type(exc).__name__
    assert outcome == "DetachTimeout"


async def test_cancelled_error_from_a_hook_at_detach_started_changes_no_outcome(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.now())
    hook = _raising_at(DetachRecord, "started", asyncio.CancelledError)
    async with DetachService(backend=fake, settings=FAST, hooks=[hook, rec]) as svc:
        result = await svc.detach("vm", alias="ua-disk1")
    assert result.live
    assert len(rec.finished()) == 1


async def test_cancelled_error_from_a_hook_at_request_sent_changes_no_outcome(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.05))
    hook = _raising_at(UnplugRecord, "request_sent", asyncio.CancelledError)
    async with DetachService(backend=fake, settings=FAST, hooks=[hook, rec]) as svc:
        result = await svc.detach("vm", alias="ua-disk1")
    assert result.attempts == 1


async def test_cancelled_error_from_a_hook_at_removed_still_confirms_the_removal(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.05))
    hook = _raising_at(UnplugRecord, "removed", asyncio.CancelledError)
    async with DetachService(backend=fake, settings=FAST, hooks=[hook, rec]) as svc:
        outcome: tuple[str, str | None]
        try:
            result = await svc.detach("vm", alias="ua-disk1")
            outcome = ("ok", result.confirmed_by)
        except asyncio.CancelledError:
            outcome = ("CancelledError", None)
            _uncancel_self()
    assert outcome == ("ok", "event")


async def test_gauge_stays_exact_when_an_earlier_hook_raises_cancelled_error(
    fake: FakeHypervisor,
) -> None:
    """A hook listed before the Prometheus hook raising CancelledError at the
    unplug's ``started`` must not leave the pending gauge off by one."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.05))
    registry = CollectorRegistry()
    hook = _raising_at(UnplugRecord, "started", asyncio.CancelledError)
    async with DetachService(
        backend=fake, settings=FAST, hooks=[hook, prometheus_hook(registry)]
    ) as svc:
        try:
            await svc.detach("vm", alias="ua-disk1", persistent=False)
        except asyncio.CancelledError:
            _uncancel_self()
        for _ in range(100):
            if not svc.pending():
                break
            await asyncio.sleep(0.02)
        gauge = registry.get_sample_value("aiodetach_pending_unplugs")
        assert (gauge, len(svc.pending())) == (0.0, 0)


# -- a broken logging pipeline --------------------------------------------------------


@contextlib.contextmanager
def _structlog_to(stream: io.StringIO) -> Iterator[None]:
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(stream))
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture
def closed_stream_logging() -> Iterator[None]:
    """structlog writing to a closed stream (a daemon whose stderr went away)."""
    stream = io.StringIO()
    stream.close()
    with _structlog_to(stream):
        yield


@pytest.mark.usefixtures("closed_stream_logging")
async def test_broken_logging_changes_neither_open_nor_the_outcome(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.05))
    svc = DetachService(backend=fake, settings=FAST, hooks=[rec])
    await svc.open()
    try:
        result = await svc.detach("vm", alias="ua-disk1")
    finally:
        await svc.aclose()
    assert result.confirmed_by == "event"
    assert rec.kinds(DetachRecord)[0] == "started"
    assert rec.kinds(DetachRecord)[-1] == "finished"


async def test_logging_breaking_while_the_service_runs_changes_no_outcome(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.never())
    stream = io.StringIO()
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        stream.close()
        with _structlog_to(stream), pytest.raises(DetachTimeout):
            await svc.detach("vm", alias="ua-disk1", persistent=False)
    assert [r.outcome for r in rec.finished()] == ["timeout"]


async def test_open_interrupted_by_a_hook_at_connected_leaves_no_connection_open(
    fake: FakeHypervisor,
) -> None:
    """KeyboardInterrupt from a hook propagates (by design); the connection
    open() had made is closed all the same."""

    def bad(record: Record) -> None:
        if record.kind == "connected":
            raise KeyboardInterrupt

    svc = DetachService(backend=fake, settings=FAST, hooks=[bad])
    with pytest.raises(KeyboardInterrupt):
        await svc.open()
    still_open = fake.connected
    await svc.aclose()
    assert not still_open


# -- cancelled or closed at every point of a detach -----------------------------------

POINTS = ["lookup", "domain_xml", "detach_config", "detach_live", "wait"]
# Closing while detach_live runs counts a request the fake never recorded
# (a request handed to libvirt is counted): that case is left out.
CANCEL_POINTS = [("cancel", p) for p in POINTS] + [
    ("close", p) for p in POINTS if p != "detach_live"
]


@pytest.mark.parametrize(("how", "point"), CANCEL_POINTS)
async def test_cancel_or_close_at_each_point_keeps_records_and_metrics_balanced(
    fake: FakeHypervisor, rec: Recorder, how: str, point: str
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.manual())
    gate, entered = threading.Event(), threading.Event()

    def before(name: str) -> None:
        if name == point:
            entered.set()
            gate.wait(5)

    fake.before_call = before
    registry = CollectorRegistry()
    settings = DetachSettings(attempts=2, timeout=0.2, reconnect_timeout=1.0)
    svc = DetachService(backend=fake, settings=settings, hooks=[rec, prometheus_hook(registry)])
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-1"))
    try:
        if point == "wait":
            while not fake.requests:
                await asyncio.sleep(0.01)
        else:
            while not entered.is_set():
                await asyncio.sleep(0.01)
        if how == "cancel":
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gate.set()
            await asyncio.sleep(0.8)  # an orphaned unplug runs out
            await svc.aclose()
        else:
            closing = asyncio.create_task(svc.aclose())
            await asyncio.sleep(0.05)
            gate.set()
            await closing
            with contextlib.suppress(DetachError):
                await task
    finally:
        gate.set()
    d = rec.kinds(DetachRecord)
    u = rec.kinds(UnplugRecord)
    assert d.count("started") == d.count("finished") == 1, d
    assert u.count("started") == u.count("ended"), u
    assert registry.get_sample_value("aiodetach_pending_unplugs") == 0
    assert registry.get_sample_value("aiodetach_requests_total") == len(fake.requests)


# -- a request inside libvirt when the service closes ---------------------------------


async def test_no_unplug_record_after_ended_when_closing_under_a_request(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.never())
    fake.call_latency = 0.5  # the request sits in its thread
    registry = CollectorRegistry()
    settings = DetachSettings(attempts=2, timeout=0.3, reconnect_timeout=1.0)
    svc = DetachService(backend=fake, settings=settings, hooks=[rec, prometheus_hook(registry)])
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-1", persistent=False))
    while fake.in_flight == 0:
        await asyncio.sleep(0.01)
    await svc.aclose()
    with contextlib.suppress(DetachError):
        await task
    assert registry.get_sample_value("aiodetach_requests_total") == len(fake.requests) == 1
    u = rec.kinds(UnplugRecord)
    assert u[-1] == "ended", u


async def test_closed_is_the_last_record_when_a_request_outlives_the_close_grace(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.never())
    fake.call_latency = 3.0  # longer than the close's 2 s grace
    settings = DetachSettings(attempts=2, timeout=0.3, reconnect_timeout=1.0)
    svc = DetachService(backend=fake, settings=settings, hooks=[rec])
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-1", persistent=False))
    while fake.in_flight == 0:
        await asyncio.sleep(0.01)
    await svc.aclose()
    with contextlib.suppress(DetachError):
        await task
    await asyncio.sleep(1.5)  # the stuck request returns meanwhile
    kinds = [r.kind for r in rec.records]
    assert kinds[-1] == "closed", kinds


# -- record fields --------------------------------------------------------------------


async def test_unplug_record_sent_does_not_count_busy_refusals(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.later(0.05, busy_first=2))
    settings = DetachSettings(attempts=2, timeout=0.4)
    async with DetachService(backend=fake, settings=settings, hooks=[rec]) as svc:
        result = await svc.detach("vm", alias="ua-1", persistent=False)
    assert result.attempts == 1
    rows = [(r.kind, r.sent) for r in rec.of(UnplugRecord)]
    # Three requests reached libvirt; only the last one (accepted) counts.
    assert [s for k, s in rows if k == "request_sent"] == [0, 0, 1], rows


# -- the CLI's bar and log lines on one stderr ----------------------------------------


SHORT = ("--attempts", "2", "--timeout", "0.3")


def _cli_cmd(*args: str) -> list[str]:
    """The ``aiodetach`` command line, run on the fake hypervisor."""
    return [sys.executable, str(HELPER), *args]


def test_the_bar_counts_a_request_whose_domain_is_missing(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("vm alias=ua-ok0 persistent=false\nnope alias=ua-ok1 persistent=false\n")
    cmd = _cli_cmd("detach-many", str(batch), "--attempts", "2", "--timeout", "0.4")
    with Terminal(cmd, env=child_env()) as term:
        code = term.wait()
    shown = term.scrolled()
    bars = [
        m.groups()
        for row in shown
        if (m := re.match(r"━+ (\d+)/(\d+) · ok (\d+) · failed (\d+)", row))
    ]
    assert code == 12, shown
    assert bars == [("2", "2", "1", "1")], shown


def test_a_missing_domain_through_a_pipe_exits_with_the_failure_code(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("vm alias=ua-ok0 persistent=false\nnope alias=ua-ok1 persistent=false\n")
    proc = subprocess.run(
        _cli_cmd("detach-many", str(batch), "--attempts", "2", "--timeout", "0.4"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 12, proc.stderr[-600:]


def test_json_progress_through_a_pipe_never_glues_a_log_line_to_the_bar(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("vm alias=ua-ok0 persistent=false\nvm alias=ua-never persistent=false\n")
    proc = subprocess.run(
        _cli_cmd("detach-many", str(batch), "--json", "--progress", *SHORT),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # What a terminal would show, line by line: the display's control sequences left out.
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stderr).replace("\r", "\n").split("\n")
    glued = [line for line in lines if "·" in line and '{"' in line]
    assert glued == [], glued[:2]
    logged = [line for line in lines if line.startswith("{")]
    assert logged, proc.stderr[-600:]
    for line in logged:
        assert isinstance(json.loads(line), dict), line


def test_verbose_log_lines_on_a_terminal_are_never_glued_to_the_bar(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("vm alias=ua-ok0 persistent=false\nvm alias=ua-never persistent=false\n")
    with Terminal(_cli_cmd("-v", "detach-many", str(batch), *SHORT), env=child_env()) as term:
        term.wait()
    shown = term.scrolled()
    assert any(re.match(r"━+ 2/2 · ok 1 · failed 1", row) for row in shown), shown  # the bar
    assert any("aiodetach.detach_sent" in row for row in shown), shown  # and -v log lines too
    glued = [row for row in shown if "·" in row and re.search(r"\d{4}-\d\d-\d\d", row)]
    assert glued == [], glued[:2]


# -- the pending gauge equals pending() -----------------------------------------------


class GaugeChecker:
    """Listed after the Prometheus hook: at every record, gauge == pending()."""

    def __init__(self, registry: CollectorRegistry, services: list[DetachService]) -> None:
        self.registry = registry
        self.services = services
        self.bad: list[tuple[str, str | None, float | None, float]] = []

    def gauge(self) -> float | None:
        return self.registry.get_sample_value("aiodetach_pending_unplugs")

    def want(self) -> float:
        return float(sum(len(s.pending()) for s in self.services))

    def __call__(self, record: Record) -> None:
        g, w = self.gauge(), self.want()
        if g != w:
            self.bad.append((type(record).__name__, record.kind, g, w))

    async def poll(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.01)):
            await asyncio.sleep(0.01)
            g, w = self.gauge(), self.want()
            if g != w:
                self.bad.append(("poll", None, g, w))


async def test_gauge_equals_pending_through_every_kind_of_unplug(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-manual", unplug=Unplug.manual())
    vm.add_disk("vdc", alias="ua-never", unplug=Unplug.never())
    vm.add_disk("vdd", alias="ua-lost", unplug=Unplug.later(0.1, emit_event=False))
    vm.add_disk("vde", alias="ua-busy", unplug=Unplug.later(0.1, busy_first=2))
    vm.add_disk("vdf", alias="ua-reject", unplug=Unplug.reject(0.05))
    fake.add_domain("vm2").add_disk("vdb", alias="ua-stop", unplug=Unplug.never())
    fake.add_domain("vm3").add_disk("vdb", alias="ua-pause", unplug=Unplug.manual())
    registry = CollectorRegistry()
    services: list[DetachService] = []
    chk = GaugeChecker(registry, services)
    settings = DetachSettings(
        attempts=2, timeout=0.3, reconnect_timeout=1.0, reconnect_backoff_max=0.1
    )
    svc = DetachService(backend=fake, settings=settings, hooks=[prometheus_hook(registry), chk])
    services.append(svc)
    await svc.open()
    targets = [
        ("vm", "ua-manual"),
        ("vm", "ua-manual"),
        ("vm", "ua-never"),
        ("vm", "ua-lost"),
        ("vm", "ua-busy"),
        ("vm", "ua-reject"),
        ("vm2", "ua-stop"),
        ("vm3", "ua-pause"),
    ]
    tasks = [
        asyncio.create_task(svc.detach(dom, alias=alias, persistent=False))
        for dom, alias in targets
    ]
    await chk.poll(0.15)
    # A caller leaves and comes back.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.05):
            await svc.detach("vm", alias="ua-never", persistent=False)
    fake.pause_domain("vm3")
    fake.stop_domain("vm2")
    await chk.poll(0.2)
    fake.crash()
    await chk.poll(0.2)
    fake.restart()
    await chk.poll(0.4)
    fake.resume_domain("vm3")
    fake.complete("vm", "ua-manual")
    await chk.poll(0.3)
    await svc.aclose()
    for t in tasks:
        with contextlib.suppress(DetachError, asyncio.CancelledError):
            await t
    assert chk.bad == []
    assert chk.gauge() == 0.0
    assert svc.pending() == []


async def test_gauge_of_two_services_on_one_registry_is_the_sum_of_their_pending() -> None:
    a, b = FakeHypervisor("fake://a"), FakeHypervisor("fake://b")
    a.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.never())
    b.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.never())
    registry = CollectorRegistry()
    settings = DetachSettings(attempts=2, timeout=0.3, reconnect_timeout=1.0)
    sa = DetachService(backend=a, settings=settings, hooks=[prometheus_hook(registry)])
    sb = DetachService(backend=b, settings=settings, hooks=[prometheus_hook(registry)])
    try:
        await sa.open()
        await sb.open()
        ta = asyncio.create_task(sa.detach("vm", alias="ua-1", persistent=False))
        tb = asyncio.create_task(sb.detach("vm", alias="ua-1", persistent=False))
        while not (a.requests and b.requests):
            await asyncio.sleep(0.01)
        assert registry.get_sample_value("aiodetach_pending_unplugs") == 2
        await sa.aclose()
        assert registry.get_sample_value("aiodetach_pending_unplugs") == 1 == len(sb.pending())
        await sb.aclose()
        for t in (ta, tb):
            with contextlib.suppress(DetachError):
                await t
        assert registry.get_sample_value("aiodetach_pending_unplugs") == 0
    finally:
        a.cancel_timers()
        b.cancel_timers()


# -- threads and re-entrant hooks -----------------------------------------------------

THREADED = DetachSettings(attempts=2, timeout=0.3, reconnect_timeout=1.0, max_threads=4)


async def test_hooks_are_only_called_on_the_loop_thread(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    vm = fake.add_domain("vm")
    kinds = [
        Unplug.now(),
        Unplug.later(0.02),
        Unplug.later(0.05, emit_event=False),
        Unplug.reject(0.01),
        Unplug.later(0.02, busy_first=1),
    ]
    for i in range(40):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=kinds[i % 5])
    fake.call_latency = 0.01
    async with DetachService(backend=fake, settings=THREADED, hooks=[rec]) as svc:
        await svc.detach_many(
            [{"domain": "vm", "alias": f"ua-{i}"} for i in range(40)],
            concurrency=40,
            per_domain=None,
        )
        fake.crash()
        await asyncio.sleep(0.05)
        fake.restart()
        await asyncio.sleep(0.3)
    assert rec.threads == {threading.get_ident()}


async def test_a_hook_closing_the_service_gives_every_caller_service_closed(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-1", unplug=Unplug.never())
    vm.add_disk("vdc", alias="ua-2", unplug=Unplug.never())
    services: list[DetachService] = []
    closing: list[asyncio.Task[None]] = []

    def closer(record: Record) -> None:
        if isinstance(record, UnplugRecord) and record.kind == "request_sent" and not closing:
            closing.append(asyncio.get_running_loop().create_task(services[0].aclose()))

    svc = DetachService(backend=fake, settings=THREADED, hooks=[closer, rec])
    services.append(svc)
    await svc.open()
    res = await asyncio.gather(
        svc.detach("vm", alias="ua-1", persistent=False),
        svc.detach("vm", alias="ua-2", persistent=False),
        return_exceptions=True,
    )
    await closing[0]
    assert [type(r).__name__ for r in res] == ["ServiceClosed", "ServiceClosed"]
    d = rec.kinds(DetachRecord)
    assert d.count("started") == d.count("finished") == 2
    u = rec.kinds(UnplugRecord)
    assert u.count("started") == u.count("ended") == 2


async def test_a_hook_may_start_detaches_and_read_pending(
    fake: FakeHypervisor, rec: Recorder
) -> None:
    """At ``ended`` of ua-1 a hook detaches ua-1 again and ua-2, and reads
    pending() at every record."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-1", unplug=Unplug.later(0.02))
    vm.add_disk("vdc", alias="ua-2", unplug=Unplug.later(0.02))
    services: list[DetachService] = []
    tasks: list[asyncio.Future[DetachResult]] = []
    seen_pending: list[list[tuple[str, str]]] = []

    def reenter(record: Record) -> None:
        if not services:
            return
        svc = services[0]
        seen_pending.append(svc.pending())
        if (
            isinstance(record, UnplugRecord)
            and record.kind == "ended"
            and record.alias == "ua-1"
            and not tasks
        ):
            tasks.append(asyncio.ensure_future(svc.detach("vm", alias="ua-1")))
            tasks.append(asyncio.ensure_future(svc.detach("vm", alias="ua-2")))

    async with DetachService(backend=fake, settings=THREADED, hooks=[reenter, rec]) as svc:
        services.append(svc)
        await svc.detach("vm", alias="ua-1")
        res = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(r).__name__ for r in res] == ["DeviceNotFound", "DetachResult"]
    assert seen_pending


async def test_a_slow_hook_changes_no_outcome(fake: FakeHypervisor, rec: Recorder) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-1", unplug=Unplug.later(0.05))

    def slow(record: Record) -> None:
        time.sleep(0.05)

    async with DetachService(backend=fake, settings=THREADED, hooks=[slow, rec]) as svc:
        result = await svc.detach("vm", alias="ua-1")
    assert result.confirmed_by == "event"
    assert result.attempts == 1


# -- the extras are optional ----------------------------------------------------------


def _without(modules: list[str], code: str) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "missing", [["prometheus_client", "opentelemetry"], ["opentelemetry.trace"]]
)
def test_everything_imports_without_the_extras(missing: list[str]) -> None:
    proc = _without(
        missing,
        "import aiodetach, aiodetach.instrumentation, aiodetach.testing, aiodetach._cli\n"
        "from aiodetach.instrumentation import *\nprint('ok')",
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_both_factories_name_their_extra_when_neither_is_installed() -> None:
    proc = _without(
        ["prometheus_client", "opentelemetry"],
        "import aiodetach.instrumentation as i\n"
        "for f, x in ((i.prometheus_hook, 'prometheus'), (i.otel_hook, 'otel')):\n"
        "    try: f()\n"
        "    except ImportError as e: print(x, 'aiodetach[%s]' % x in str(e))\n",
    )
    assert proc.stdout.split() == ["prometheus", "True", "otel", "True"], proc.stderr


def test_otel_hook_names_its_extra_when_the_api_is_partly_missing() -> None:
    proc = _without(
        ["opentelemetry.trace"],
        "import aiodetach.instrumentation as i\n"
        "try: i.otel_hook()\n"
        "except ImportError as e: print('IE', 'aiodetach[otel]' in str(e))\n",
    )
    assert proc.stdout.split() == ["IE", "True"], (proc.stdout, proc.stderr)


def test_cli_metrics_port_without_prometheus_is_a_usage_error(tmp_path: Path) -> None:
    batch = tmp_path / "b.txt"
    batch.write_text("vm alias=ua-1\n")
    proc = _without(
        ["prometheus_client"],
        "from aiodetach._cli import main\n"
        f"sys.exit(main(['detach-many', {str(batch)!r}, '--metrics-port', '0',"
        " '--uri', 'test:///default']))",
    )
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "aiodetach[prometheus]" in proc.stdout + proc.stderr


# -- OpenTelemetry spans on every path ------------------------------------------------


class OpenSpans(SpanProcessor):
    """Tracks the spans started and not yet ended."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.open.add(span.context.span_id)

    def on_end(self, span: ReadableSpan) -> None:
        self.open.discard(span.context.span_id)


@pytest.fixture
def otel() -> Iterator[tuple[TracerProvider, InMemorySpanExporter, OpenSpans]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    tracker = OpenSpans()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(tracker)
    yield provider, exporter, tracker
    provider.shutdown()


async def test_every_detach_span_ends_on_every_path(
    fake: FakeHypervisor, otel: tuple[TracerProvider, InMemorySpanExporter, OpenSpans]
) -> None:
    """Success, timeout, refusal, invalid call, missing device or domain, a
    stopped domain, cancellations, an aborted batch and a close: every span
    ends, under the caller's span, with an error status exactly on failures."""
    provider, exporter, tracker = otel
    vm = fake.add_domain("vm")
    vm.add_disk("vda", alias="ua-ok", unplug=Unplug.later(0.05))
    vm.add_disk("vdb", alias="ua-never", unplug=Unplug.never())
    vm.add_disk("vdc", alias="ua-reject", unplug=Unplug.reject(0.02))
    vm.add_disk("vdd", alias="ua-manual", unplug=Unplug.manual())
    vm.add_disk("vde", alias="ua-manual2", unplug=Unplug.manual())
    fake.add_domain("vm2").add_disk("vdb", alias="ua-stop", unplug=Unplug.never())
    tracer = provider.get_tracer("test")
    svc = DetachService(backend=fake, settings=FAST, hooks=[otel_hook(provider)])
    await svc.open()
    with tracer.start_as_current_span("parent") as parent:
        tasks = [
            asyncio.create_task(c)
            for c in (
                svc.detach("vm", alias="ua-ok"),
                svc.detach("vm", alias="ua-never", persistent=False),
                svc.detach("vm", alias="ua-reject"),
                svc.detach("vm", alias=""),  # InvalidRequest
                svc.detach("vm", alias="ua-nope"),  # DeviceNotFound
                svc.detach("nope", alias="ua-ok"),  # DomainNotFound
                svc.detach("vm2", alias="ua-stop", persistent=False),
            )
        ]
        c1 = asyncio.create_task(svc.detach("vm", alias="ua-manual", persistent=False))
        await asyncio.sleep(0)
        c1.cancel()
        c2 = asyncio.create_task(svc.detach("vm", alias="ua-manual2"))
        await asyncio.sleep(0.15)
        c2.cancel()
        fake.stop_domain("vm2")

        def boom(outcome: DetachOutcome, done: int, total: int) -> None:
            raise RuntimeError("progress bug")

        with pytest.raises(BatchAborted):
            await svc.detach_many(
                [
                    {"domain": "vm", "alias": "ua-ok"},
                    {"domain": "vm", "alias": "ua-manual"},
                    {"domain": "vm", "alias": "ua-nope"},
                ],
                on_progress=boom,
            )
        c3 = asyncio.create_task(svc.detach("vm", alias="ua-manual2"))
        await asyncio.sleep(0.05)
        await svc.aclose()
        for t in [*tasks, c1, c2, c3]:
            with contextlib.suppress(DetachError, asyncio.CancelledError):
                await t
    spans = [s for s in exporter.get_finished_spans() if s.name == "aiodetach.detach"]
    assert tracker.open == set()
    assert spans
    parent_id = parent.get_span_context().span_id
    assert all(s.parent is not None and s.parent.span_id == parent_id for s in spans)
    for s in spans:
        attributes: dict[str, Any] = dict(s.attributes or {})
        if attributes["aiodetach.outcome"] in ("failed", "timeout", "stopped", "error"):
            assert s.status.status_code is StatusCode.ERROR, attributes
            assert any(e.name == "exception" for e in s.events), attributes
        else:
            assert s.status.status_code is StatusCode.UNSET, attributes


async def test_a_fleet_detach_to_an_unreachable_host_has_a_span(
    otel: tuple[TracerProvider, InMemorySpanExporter, OpenSpans],
) -> None:
    provider, exporter, tracker = otel
    bad = FakeHypervisor("fake://bad")
    bad.daemon_up = False
    async with DetachFleet(
        settings=FAST, backend_factory=lambda _u: bad, hooks=[otel_hook(provider)]
    ) as fleet:
        with contextlib.suppress(DetachError):
            await fleet.detach("fake://bad", "vm", alias="ua-1")
    spans = [s for s in exporter.get_finished_spans() if s.name == "aiodetach.detach"]
    assert len(spans) == 1
    assert tracker.open == set()
