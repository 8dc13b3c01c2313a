"""Hooks, the Prometheus hook and the OpenTelemetry hook, on the fake hypervisor."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from aiodetach import DetachFleet, DetachResult, DetachService, DetachSettings
from aiodetach.errors import (
    DetachError,
    DetachFailed,
    DetachTimeout,
    DeviceNotFound,
    DomainStopped,
    InvalidRequest,
)
from aiodetach.instrumentation import (
    ConnectionRecord,
    DetachRecord,
    Record,
    UnplugRecord,
    otel_hook,
    prometheus_hook,
)
from aiodetach.testing import FakeHypervisor, Unplug

from ._gate_fake import GateFake, settle

FAST = DetachSettings(attempts=2, timeout=0.2, reconnect_timeout=2.0)
OUTCOMES = ("removed", "failed", "timeout", "stopped", "error", "cancelled")


class Recorder:
    """A hook keeping every record (and the thread it was called on)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.threads: set[int] = set()

    def __call__(self, record: Record) -> None:
        self.records.append(record)
        self.threads.add(threading.get_ident())

    def kinds(self, cls: type[Any]) -> list[str]:
        return [r.kind for r in self.records if isinstance(r, cls)]


def _broken(record: Record) -> None:
    raise RuntimeError(f"broken hook at {record.kind}")


# -- records -------------------------------------------------------------------------


async def test_records_of_one_detach(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.05))
    rec = Recorder()
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        result = await svc.detach("vm", alias="ua-disk1")
    assert rec.threads == {threading.get_ident()}  # the loop thread, never a worker
    assert rec.kinds(DetachRecord) == [
        "started",
        "persistent_detached",
        "unplug_started",
        "finished",
    ]
    assert rec.kinds(UnplugRecord) == ["started", "request_sent", "removed", "ended"]
    assert rec.kinds(ConnectionRecord) == ["connected", "closed"]
    detach = [r for r in rec.records if isinstance(r, DetachRecord)]
    unplug = [r for r in rec.records if isinstance(r, UnplugRecord)]
    assert len({r.detach_id for r in detach}) == 1
    assert {r.unplug_id for r in unplug} == {detach[2].unplug_id}
    finished = detach[-1]
    assert (finished.result, finished.error, finished.outcome) == (result, None, "removed")
    assert (finished.domain, finished.alias, finished.uri) == ("vm", "ua-disk1", fake.uri)
    assert detach[0].elapsed <= finished.elapsed
    sent = unplug[1]
    assert (sent.attempt, sent.attempts, sent.sent, sent.callers) == (1, 2, 1, 1)
    assert unplug[2].confirmed_by == "event"
    assert unplug[3].outcome == "removed"
    times = [r.time for r in rec.records]
    assert times == sorted(times)


async def test_records_of_a_timed_out_unplug(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.never())
    rec = Recorder()
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        with pytest.raises(DetachTimeout):
            await svc.detach("vm", alias="ua-disk1", persistent=False)
    assert rec.kinds(UnplugRecord) == [
        "started",
        "request_sent",
        "attempt_timed_out",
        "request_sent",
        "attempt_timed_out",
        "timed_out",
        "ended",
    ]
    timed_out = [r for r in rec.records if isinstance(r, UnplugRecord) and r.kind != "started"]
    assert [r.attempt for r in timed_out[:4]] == [1, 1, 2, 2]
    finished = rec.records[-2]
    assert isinstance(finished, DetachRecord)
    assert finished.outcome == "timeout"
    assert isinstance(finished.error, DetachTimeout)


async def test_lost_event_busy_and_in_progress_records(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-lost", unplug=Unplug.later(0.05, emit_event=False))
    vm.add_disk("vdc", alias="ua-busy", unplug=Unplug.later(0.05, busy_first=1))
    rec = Recorder()
    settings = DetachSettings(attempts=2, timeout=0.3)
    async with DetachService(backend=fake, settings=settings, hooks=[rec]) as svc:
        lost, busy = await asyncio.gather(
            svc.detach("vm", alias="ua-lost", persistent=False),
            svc.detach("vm", alias="ua-busy", persistent=False),
        )
    assert lost.confirmed_by == "xml"
    assert busy.confirmed_by == "event"
    removed = [r for r in rec.records if isinstance(r, UnplugRecord) and r.kind == "removed"]
    assert {(r.alias, r.confirmed_by) for r in removed} == {
        ("ua-lost", "xml"),
        ("ua-busy", "event"),
    }
    backoff = [r for r in rec.records if isinstance(r, UnplugRecord) and r.kind == "busy_backoff"]
    assert len(backoff) == 1
    assert backoff[0].busy_refusals == 1
    assert backoff[0].delay == pytest.approx(0.075)


async def test_joined_callers_share_one_unplug(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.manual())
    rec = Recorder()
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        first = asyncio.create_task(svc.detach("vm", alias="ua-disk1", persistent=False))
        while not fake.requests:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(svc.detach("vm", alias="ua-disk1", persistent=False))
        await asyncio.sleep(0.05)
        fake.complete("vm", "ua-disk1")
        results = await asyncio.gather(first, second)
    assert [r.joined for r in results] == [False, True]
    starts = [r for r in rec.records if isinstance(r, DetachRecord) and r.unplug_id is not None]
    assert [r.kind for r in starts] == ["unplug_started", "unplug_joined"]
    assert starts[0].unplug_id == starts[1].unplug_id
    assert starts[0].detach_id != starts[1].detach_id
    assert rec.kinds(UnplugRecord).count("started") == 1


async def test_an_invalid_call_still_starts_and_finishes(fake: FakeHypervisor) -> None:
    fake.add_domain("vm")
    rec = Recorder()
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        with pytest.raises(InvalidRequest):
            await svc.detach("vm", alias="")
        with pytest.raises(DeviceNotFound):
            await svc.detach("vm", alias="ua-nope")
    finished = [r for r in rec.records if isinstance(r, DetachRecord) and r.kind == "finished"]
    assert [r.outcome for r in finished] == ["error", "error"]
    assert rec.kinds(DetachRecord).count("started") == 2


async def test_connection_records_on_a_daemon_restart(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.manual())
    rec = Recorder()
    async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-disk1", persistent=False))
        while not fake.requests:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        fake.crash()
        await asyncio.sleep(0.1)
        fake.complete("vm", "ua-disk1", emit=False)  # removed while the daemon was away
        fake.restart()
        result = await task
    assert result.confirmed_by == "xml"
    assert rec.kinds(ConnectionRecord) == ["connected", "lost", "reconnected", "closed"]
    reconnected = [r for r in rec.records if isinstance(r, ConnectionRecord)][2]
    assert reconnected.reconnects == 1


# -- a hook that raises --------------------------------------------------------------


def _scenario(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-ok", unplug=Unplug.later(0.02))
    vm.add_disk("vdc", alias="ua-lost", unplug=Unplug.later(0.02, emit_event=False))
    vm.add_disk("vdd", alias="ua-never", unplug=Unplug.never())
    vm.add_disk("vde", alias="ua-reject", unplug=Unplug.reject(0.02))
    vm.add_disk("vdf", alias="ua-busy", unplug=Unplug.later(0.02, busy_first=1))


async def _run_scenario(hooks: list[Callable[[Record], object]]) -> list[tuple[str, Any]]:
    fake = FakeHypervisor()
    _scenario(fake)
    out: list[tuple[str, Any]] = []
    try:
        async with DetachService(backend=fake, settings=FAST, hooks=hooks) as svc:
            outcomes = await svc.detach_many(
                [
                    {"domain": "vm", "alias": a}
                    for a in ("ua-ok", "ua-lost", "ua-never", "ua-reject", "ua-busy", "ua-nope")
                ]
            )
        for o in outcomes:
            if o.result is not None:
                r = o.result
                out.append(("ok", (r.alias, r.live, r.persistent, r.attempts, r.confirmed_by)))
            else:
                assert o.error is not None
                out.append((type(o.error).__name__, (o.error.alias, o.error.persistent_done)))
        out.append(("requests", len(fake.requests)))
    finally:
        fake.cancel_timers()
    return out


async def test_a_raising_hook_changes_no_outcome() -> None:
    plain = await _run_scenario([])
    with capture_logs() as logs:
        broken = await _run_scenario([_broken, _broken])
    assert broken == plain
    assert plain[:5] == [
        ("ok", ("ua-ok", True, True, 1, "event")),
        ("ok", ("ua-lost", True, True, 1, "xml")),
        ("DetachTimeout", ("ua-never", True)),
        ("DetachFailed", ("ua-reject", True)),
        ("ok", ("ua-busy", True, True, 1, "event")),
    ]
    failures = [e for e in logs if e["event"] == "aiodetach.hook_failed"]
    # Once per hook and step, not once per device: 6 detaches, 5 unplugs.
    seen = [(e["hook_index"], e["record"], e["kind"]) for e in failures]
    assert len(seen) == len(set(seen))
    assert (1, "DetachRecord", "finished") in seen  # hook 0 is the logging hook
    assert (2, "UnplugRecord", "request_sent") in seen
    assert {e["hook"] for e in failures} == {"_broken"}
    assert all(e["log_level"] == "warning" and e["exc_info"] for e in failures)


def test_a_hook_must_be_callable(fake: FakeHypervisor) -> None:
    with pytest.raises(TypeError, match="callable"):
        DetachService(backend=fake, hooks=[42])  # type: ignore[list-item]


# -- the logging hook ----------------------------------------------------------------


async def test_logging_is_the_default_hook_with_the_same_event_names(
    fake: FakeHypervisor,
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-never", unplug=Unplug.never())
    vm.add_disk("vdc", alias="ua-lost", unplug=Unplug.later(0.05, emit_event=False))
    rec = Recorder()
    with capture_logs() as logs:
        async with DetachService(backend=fake, settings=FAST, hooks=[rec]) as svc:
            with pytest.raises(DetachTimeout):
                await svc.detach("vm", alias="ua-never", persistent=False)
            await svc.detach("vm", alias="ua-lost")
    events = [e["event"] for e in logs]
    assert events == [
        "aiodetach.connected",
        "aiodetach.detach_sent",
        "aiodetach.attempt_timed_out",
        "aiodetach.detach_sent",
        "aiodetach.attempt_timed_out",
        "aiodetach.detach_timeout",
        "aiodetach.persistent_detached",
        "aiodetach.detach_sent",
        "aiodetach.attempt_timed_out",
        "aiodetach.removed_without_event",
        "aiodetach.detached",
        "aiodetach.closed",
    ]
    sent = logs[1]
    assert {k: sent[k] for k in ("domain", "alias", "attempt", "attempts", "log_level")} == {
        "domain": "vm",
        "alias": "ua-never",
        "attempt": 1,
        "attempts": 2,
        "log_level": "info",
    }
    assert logs[5]["log_level"] == "warning"
    assert rec.records  # the caller's hook ran too, after the logging hook


async def test_log_false_leaves_logging_out(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1")
    with capture_logs() as logs:
        async with DetachService(backend=fake, settings=FAST, log=False) as svc:
            await svc.detach("vm", alias="ua-disk1")
    assert logs == []


# -- Prometheus ----------------------------------------------------------------------


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    get = registry.get_sample_value
    out = {o: get("aiodetach_detaches_total", {"outcome": o}) or 0.0 for o in OUTCOMES}
    for name in (
        "aiodetach_requests_total",
        "aiodetach_removed_without_event_total",
        "aiodetach_pending_unplugs",
        "aiodetach_attempts_timed_out_total",
        "aiodetach_busy_refusals_total",
        "aiodetach_reconnects_total",
    ):
        out[name] = get(name) or 0.0
    return out


async def test_prometheus_metrics_after_detaches() -> None:
    registry = CollectorRegistry()
    fake = FakeHypervisor()
    _scenario(fake)
    vm2 = fake.add_domain("vm2")
    vm2.add_disk("vdb", alias="ua-stop", unplug=Unplug.manual())
    vm2.add_disk("vdc", alias="ua-cancel", unplug=Unplug.manual())
    try:
        async with DetachService(
            backend=fake, settings=FAST, hooks=[prometheus_hook(registry)]
        ) as svc:
            await _detach_all(svc)
            stopping = asyncio.create_task(svc.detach("vm2", alias="ua-stop", persistent=False))
            cancelled = asyncio.create_task(svc.detach("vm2", alias="ua-cancel", persistent=False))
            while len(fake.requests) < 9:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
            assert registry.get_sample_value("aiodetach_pending_unplugs") == 2
            cancelled.cancel()
            await asyncio.sleep(0.01)
            # The cancelled caller's unplug is remembered (an orphan), and counted.
            assert registry.get_sample_value("aiodetach_pending_unplugs") == 2 == len(svc.pending())
            fake.stop_domain("vm2")
            with pytest.raises(DomainStopped):
                await stopping
            await asyncio.sleep(0.01)
            assert registry.get_sample_value("aiodetach_pending_unplugs") == 0 == len(svc.pending())
    finally:
        fake.cancel_timers()
    got = _samples(registry)
    assert got == {
        "removed": 3.0,
        "failed": 1.0,
        "timeout": 1.0,
        "stopped": 1.0,
        "error": 1.0,  # DeviceNotFound
        "cancelled": 1.0,
        "aiodetach_requests_total": float(len(fake.requests)),
        "aiodetach_removed_without_event_total": 1.0,
        "aiodetach_pending_unplugs": 0.0,
        "aiodetach_attempts_timed_out_total": 3.0,  # ua-never twice, ua-lost once
        "aiodetach_busy_refusals_total": 1.0,
        "aiodetach_reconnects_total": 0.0,
    }
    assert len(fake.requests) == 9  # ok, lost, never x2, reject, busy x2, stop, cancel
    hist = registry.get_sample_value(
        "aiodetach_detach_duration_seconds_count", {"outcome": "removed"}
    )
    assert hist == 3.0
    text = generate_latest(registry).decode()
    assert 'aiodetach_detaches_total{outcome="removed"} 3.0' in text
    assert "ua-" not in text  # no alias labels
    assert "vm" not in text  # nor domain ones


async def _detach_all(svc: DetachService) -> None:
    for alias in ("ua-ok", "ua-lost", "ua-never", "ua-reject", "ua-busy", "ua-nope"):
        with contextlib.suppress(DetachError):
            await svc.detach("vm", alias=alias)


async def test_prometheus_gauge_exact_through_orphans_and_idle(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.never())
    registry = CollectorRegistry()
    settings = DetachSettings(attempts=3, timeout=0.6)
    gauge: list[tuple[float | None, int]] = []

    async with DetachService(
        backend=fake, settings=settings, hooks=[prometheus_hook(registry)]
    ) as svc:

        def look() -> None:
            gauge.append(
                (registry.get_sample_value("aiodetach_pending_unplugs"), len(svc.pending()))
            )

        for _ in range(2):  # a caller with a short deadline, twice: an orphan, then rejoined
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await svc.detach("vm", alias="ua-disk1", persistent=False)
            await asyncio.sleep(0)
            look()
        # Nobody comes back: its window ends, it idles one timeout, then is dropped.
        # The gauge moves in the same step as pending(): equal at any moment.
        for _ in range(300):
            await asyncio.sleep(0.01)
            look()
            if not svc.pending():
                break
    assert gauge[0] == gauge[1] == (1.0, 1)
    assert gauge[-1] == (0.0, 0)
    assert all(g == float(p) for g, p in gauge), gauge
    assert len(fake.requests) == 1  # the orphan was never re-sent for nobody


def test_prometheus_hook_is_one_per_registry() -> None:
    registry = CollectorRegistry()
    assert prometheus_hook(registry) is prometheus_hook(registry)
    assert prometheus_hook(CollectorRegistry()) is not prometheus_hook(registry)


async def test_fleet_hooks_count_every_host() -> None:
    fakes = {"fake://a": FakeHypervisor("fake://a"), "fake://b": FakeHypervisor("fake://b")}
    for fake in fakes.values():
        fake.add_domain("vm").add_disk("vdb", alias="ua-disk1")
    registry = CollectorRegistry()
    rec = Recorder()
    async with DetachFleet(
        settings=FAST, backend_factory=fakes.__getitem__, hooks=[prometheus_hook(registry), rec]
    ) as fleet:
        outcomes = await fleet.detach_many(
            [{"uri": uri, "domain": "vm", "alias": "ua-disk1"} for uri in fakes]
        )
    assert all(o.ok for o in outcomes)
    assert registry.get_sample_value("aiodetach_detaches_total", {"outcome": "removed"}) == 2
    finished = [r for r in rec.records if isinstance(r, DetachRecord) and r.kind == "finished"]
    assert {r.uri for r in finished} == set(fakes)
    assert len({r.detach_id for r in finished}) == 2


# -- OpenTelemetry -------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _events(span: ReadableSpan) -> list[str]:
    return [e.name for e in span.events]


async def test_otel_one_span_per_detach_with_every_step(
    fake: FakeHypervisor, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.3))
    async with DetachService(backend=fake, settings=FAST, hooks=[otel_hook(provider)]) as svc:
        result = await svc.detach("vm", alias="ua-disk1")
    (span,) = exporter.get_finished_spans()
    assert span.name == "aiodetach.detach"
    attrs = dict(span.attributes or {})
    assert attrs["aiodetach.domain"] == "vm"
    assert attrs["aiodetach.alias"] == "ua-disk1"
    assert attrs["aiodetach.attempts"] == result.attempts == 2
    assert attrs["aiodetach.confirmed_by"] == "event"
    assert (attrs["aiodetach.live"], attrs["aiodetach.persistent"]) == (True, True)
    assert attrs["aiodetach.outcome"] == "removed"
    assert span.status.status_code is StatusCode.UNSET
    assert _events(span) == [
        "aiodetach.persistent_detached",
        "aiodetach.unplug_started",
        "aiodetach.unplug.request_sent",
        "aiodetach.unplug.attempt_timed_out",
        "aiodetach.unplug.request_sent",
        "aiodetach.unplug.removed",
        "aiodetach.unplug.ended",
        "aiodetach.finished",
    ]
    timed_out = span.events[3]
    assert dict(timed_out.attributes or {})["aiodetach.attempt"] == 1


async def test_otel_failure_records_the_exception(
    fake: FakeHypervisor, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.reject(0.02))
    async with DetachService(backend=fake, settings=FAST, hooks=[otel_hook(provider)]) as svc:
        with pytest.raises(DetachFailed):
            await svc.detach("vm", alias="ua-disk1")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert "DetachFailed" in (span.status.description or "")
    exc = [e for e in span.events if e.name == "exception"]
    assert len(exc) == 1
    assert str(dict(exc[0].attributes or {})["exception.type"]).endswith("DetachFailed")
    attrs = dict(span.attributes or {})
    assert attrs["aiodetach.outcome"] == "failed"
    assert attrs["aiodetach.persistent"] is True  # err.persistent_done


async def test_otel_unplug_steps_go_to_every_joined_caller(
    fake: FakeHypervisor, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.manual())
    tracer = provider.get_tracer("test")
    settings = DetachSettings(attempts=3, timeout=0.2)
    async with DetachService(backend=fake, settings=settings, hooks=[otel_hook(provider)]) as svc:

        async def traced(name: str) -> DetachResult:
            with tracer.start_as_current_span(name):
                return await svc.detach("vm", alias="ua-disk1", persistent=False)

        first = asyncio.create_task(traced("first"))
        while not fake.requests:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        second = asyncio.create_task(traced("second"))
        while len(fake.requests) < 2:  # the re-send after the first window
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        fake.complete("vm", "ua-disk1")
        await asyncio.gather(first, second)
    finished = {s.name: s for s in exporter.get_finished_spans()}
    detaches = [s for s in exporter.get_finished_spans() if s.name == "aiodetach.detach"]
    assert len(detaches) == 2
    by_parent = {}
    for span in detaches:
        assert span.parent is not None
        parent = next(p for p in finished.values() if p.context.span_id == span.parent.span_id)
        by_parent[parent.name] = span
    one, two = by_parent["first"], by_parent["second"]
    assert one.context.trace_id == finished["first"].context.trace_id
    # The first caller saw the whole unplug; the second joined after the first request.
    assert _events(one).count("aiodetach.unplug.request_sent") == 2
    assert _events(two).count("aiodetach.unplug.request_sent") == 1
    assert "aiodetach.unplug_joined" in _events(two)
    for span in (one, two):
        assert "aiodetach.unplug.removed" in _events(span)
    assert dict(two.attributes or {})["aiodetach.joined"] is True


async def test_otel_cancelled_caller_is_not_an_error(
    fake: FakeHypervisor, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.never())
    async with DetachService(backend=fake, settings=FAST, hooks=[otel_hook(provider)]) as svc:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await svc.detach("vm", alias="ua-disk1", persistent=False)
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["aiodetach.outcome"] == "cancelled"
    assert span.status.status_code is StatusCode.UNSET


# -- optional dependencies -----------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "factory", "extra"),
    [
        ("prometheus_client", "prometheus_hook", "prometheus"),
        ("opentelemetry", "otel_hook", "otel"),
    ],
)
def test_extras_are_optional(module: str, factory: str, extra: str) -> None:
    code = f"""
import sys
sys.modules[{module!r}] = None  # not installed
import aiodetach, aiodetach.instrumentation as inst
from aiodetach import DetachService
try:
    inst.{factory}()
except ImportError as exc:
    print(exc)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert f"pip install 'aiodetach[{extra}]'" in proc.stdout


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
        await settle(0.01)
        for t in tasks[::4]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle(0.2)
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
