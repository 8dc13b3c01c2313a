"""The Prometheus and OpenTelemetry hooks, and the CLI's live progress and
``--metrics-port``, on a real libvirtd + QEMU (OS-less guests: a SCSI disk's
unplug completes at once, a virtio-blk one never)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from _pty import Terminal
from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachTimeout, DeviceNotFound
from aiodetach.instrumentation import otel_hook, prometheus_hook
from aiodetach_lab import domains as _lab
from aiodetach_lab.requests import RequestLog

DISKS = (
    _lab.DiskSpec("sda", "scsi", alias="ua-scsi1"),
    _lab.DiskSpec("sdb", "scsi", alias="ua-scsi2"),
    _lab.DiskSpec("vdb", "virtio", alias="ua-blk1"),
)


@pytest.fixture
def domain(libvirtd: str) -> Iterator[_lab.LabDomain]:
    with _lab.throwaway_domain(libvirtd, disks=DISKS) as dom:
        yield dom


async def test_prometheus_and_otel_hooks_on_real_detaches(
    libvirtd: str, domain: _lab.LabDomain, sent: RequestLog
) -> None:
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = DetachSettings(attempts=2, timeout=0.5)
    hooks = [prometheus_hook(registry), otel_hook(provider)]
    async with DetachService(libvirtd, settings=settings, hooks=hooks) as svc:
        await asyncio.sleep(0.5)  # let SeaBIOS find the SCSI controller
        scsi = await svc.detach(domain.name, alias="ua-scsi1")
        both = await asyncio.gather(
            svc.detach(domain.name, alias="ua-scsi2", persistent=False),
            svc.detach(domain.name, alias="ua-scsi2", persistent=False),
        )
        with pytest.raises(DetachTimeout):
            await svc.detach(domain.name, alias="ua-blk1", persistent=False)
        with pytest.raises(DeviceNotFound):
            await svc.detach(domain.name, alias="ua-nope")
        assert svc.pending() == []
    provider.shutdown()
    assert scsi.confirmed_by == "event"
    assert sorted(r.joined for r in both) == [False, True]

    get = registry.get_sample_value
    assert get("aiodetach_requests_total") == len(sent.requests) == 4  # scsi1, scsi2, blk1 x2
    assert get("aiodetach_detaches_total", {"outcome": "removed"}) == 3
    assert get("aiodetach_detaches_total", {"outcome": "timeout"}) == 1
    assert get("aiodetach_detaches_total", {"outcome": "error"}) == 1
    assert get("aiodetach_detaches_total", {"outcome": "failed"}) == 0
    assert get("aiodetach_attempts_timed_out_total") == 2
    assert get("aiodetach_removed_without_event_total") == 0
    assert get("aiodetach_pending_unplugs") == 0
    assert get("aiodetach_detach_duration_seconds_count", {"outcome": "removed"}) == 3
    assert get("aiodetach_detach_duration_seconds_bucket", {"outcome": "timeout", "le": "0.5"}) == 0
    text = generate_latest(registry).decode()
    assert domain.name not in text
    assert "ua-" not in text

    spans = exporter.get_finished_spans()
    assert len(spans) == 5
    by_alias: dict[str, list[object]] = {}
    for span in spans:
        attrs = dict(span.attributes or {})
        by_alias.setdefault(str(attrs["aiodetach.alias"]), []).append(span)
        assert attrs["aiodetach.domain"] == domain.name
    (scsi_span,) = by_alias["ua-scsi1"]
    attrs = dict(scsi_span.attributes or {})  # type: ignore[attr-defined]
    assert (attrs["aiodetach.attempts"], attrs["aiodetach.confirmed_by"]) == (1, "event")
    assert (attrs["aiodetach.live"], attrs["aiodetach.persistent"]) == (True, True)
    names = [e.name for e in scsi_span.events]  # type: ignore[attr-defined]
    assert names[-4:] == [
        "aiodetach.unplug.request_sent",
        "aiodetach.unplug.removed",
        "aiodetach.unplug.ended",
        "aiodetach.finished",
    ]
    (blk_span,) = by_alias["ua-blk1"]
    assert blk_span.status.status_code is StatusCode.ERROR  # type: ignore[attr-defined]
    assert dict(blk_span.attributes or {})["aiodetach.attempts"] == 2  # type: ignore[attr-defined]
    assert len(by_alias["ua-scsi2"]) == 2


def test_cli_detach_many_bar_and_metrics_on_real_qemu(
    libvirtd: str, domain: _lab.LabDomain, tmp_path: Path
) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(
        f"{domain.name} alias=ua-scsi1\n{domain.name} alias=ua-scsi2\n"
        f"{domain.name} alias=ua-blk1 persistent=false\n"
    )
    cmd = [sys.executable, "-m", "aiodetach", "detach-many", str(batch), "--uri", libvirtd]
    cmd += ["--attempts", "2", "--timeout", "1", "--metrics-port", "0"]
    with Terminal(cmd, columns=80) as term:
        code = term.wait(120)
    shown = term.scrolled()
    assert code == 12, shown
    assert any(
        re.fullmatch(r"serving Prometheus metrics on http://127\.0\.0\.1:\d+/metrics", row)
        for row in shown
    ), shown
    # The display's final frame, once (redrawn in place): the full bar and the counts.
    bars = [row for row in shown if re.match(r"━+ \d+/3 ", row)]
    assert len(bars) == 1, shown
    assert re.fullmatch(r"━{20} 3/3 · ok 2 · failed 1 · pending 0 · not started 0 · .*", bars[0])
    gave_up = f"[{domain.name}/ua-blk1] gave up: the device is still attached after 2 request(s)"
    assert gave_up in term.written(), shown


async def test_cli_metrics_scraped_while_detach_many_runs(
    libvirtd: str, domain: _lab.LabDomain, tmp_path: Path
) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(
        f"{domain.name} alias=ua-scsi1\n{domain.name} alias=ua-blk1 persistent=false\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiodetach",
        "detach-many",
        str(batch),
        "--uri",
        libvirtd,
        "--attempts",
        "2",
        "--timeout",
        "3",
        "--metrics-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "the command ended before serving metrics"
            found = re.search(r"serving Prometheus metrics on (http://\S+)", line)
            url = found.group(1) if found else None
        body = ""
        for _ in range(100):  # the SCSI disk goes at once; ua-blk1 stays pending
            body = await asyncio.to_thread(_get, url)
            if 'aiodetach_detaches_total{outcome="removed"} 1.0' in body:
                break
            await asyncio.sleep(0.05)
        assert 'aiodetach_detaches_total{outcome="removed"} 1.0' in body, body
        assert "aiodetach_pending_unplugs 1.0" in body
        assert "aiodetach_requests_total 2.0" in body
        await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 12


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own localhost URL
        return str(resp.read().decode())


def test_cli_never_parses_log_names() -> None:
    """The CLI's progress texts come from records: no log event name in its source."""
    source = Path(__file__).resolve().parents[3] / "src" / "aiodetach" / "_cli.py"
    assert "aiodetach.detach_sent" not in source.read_text()
    proc = subprocess.run(
        [sys.executable, "-c", "import aiodetach._progress as p; print(p.__doc__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "hook records" in proc.stdout
