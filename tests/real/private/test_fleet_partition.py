"""A fleet over a real network that gets partitioned.

Eight "hosts", each a private libvirtd in a network namespace of its own,
reached only over ``qemu+tcp://10.213.B.x:16509/session`` through a veth
link (:mod:`aiodetach_lab.netns`), each running three OS-less domains with SCSI
disks; host 1 also runs a booted Linux guest (q35, native PCIe hotplug, so
its unplugs take ~6 s).  One :class:`DetachFleet` runs two batches of the
same shape, each over every host:

- **baseline**: 216 SCSI disks, plus 12 virtio-blk (PCI) disks on hosts 0 and 1
  that an OS-less guest never releases on its own (the test acts as their
  guest through the daemon's monitor), plus 2 disks of the booted guest;
- **partitioned**: the same again on fresh devices, but as soon as hosts 0
  and 1 have taken their PCI requests, their links are cut (``ip link set eth0
  down`` inside their namespaces).  Nothing is closed: only libvirt's
  keepalive can tell.  Host 0 stays cut: its requests must end in
  :class:`ConnectionLost` within keepalive + ``reconnect_timeout``.  Host 1 is
  given back while its detaches are pending: devices that left meanwhile (one
  PCI disk per domain acknowledged by the test during the cut, the booted
  guest's two disks released by the guest itself) must be reported detached
  (``confirmed_by="xml"``), the rest by their event after the reconnect, and
  none may get a second request.

Meanwhile a probe detaches one SCSI disk of a healthy host every 0.4 s
through the same fleet, so the healthy hosts are measured over the whole
partition, not only during the first seconds of the batch.

Requests are counted where they land: every ``device_del`` each daemon sends
to QEMU is in its monitor log.  The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
import structlog

from aiodetach import DetachFleet, DetachService, DetachSettings
from aiodetach._many import DetachOutcome
from aiodetach.errors import ConnectionLost
from aiodetach_lab import domains as _lab
from aiodetach_lab import guest as _guest
from aiodetach_lab.daemon import pci_slots
from aiodetach_lab.netns import NetnsHost, netns_fleet
from aiodetach_lab.requests import RequestLog, record_requests

from .._real import guest_ejects, live_xml, quiet

pytestmark = [pytest.mark.slow, pytest.mark.partition]

SCRATCH = Path(os.environ.get("AIODETACH_NETNS_SCRATCH", "/tmp/robust/netns-fleet"))

HOSTS = 8
DOMAINS = 3
SCSI_PER_SET = 9  # per domain and batch: 8 hosts x 3 domains x 9 = 216 SCSI disks
PCI_PER_SET = 2  # per domain and batch, on hosts DEAD and BACK only
PROBES = {"a": range(0, 3), "b": range(3, 10)}  # probe disks of each healthy host
PROBE_EVERY = 0.4
DEAD = 0  # cut and never given back
BACK = 1  # cut, then given back while its detaches are pending
GUEST = "h1-guest"
GUEST_DISKS = {"a": ("ua-ga0", "ua-ga1"), "b": ("ua-gb0", "ua-gb1")}

CONCURRENCY = 32
PER_DOMAIN = 4
SETTINGS = DetachSettings(
    attempts=2,
    timeout=20.0,  # longer than any unplug left pending here: none is re-sent for time
    keepalive_interval=1,
    keepalive_count=3,
    reconnect_timeout=10.0,
    reconnect_backoff_max=1.0,
)
DETECT = SETTINGS.keepalive_interval * (SETTINGS.keepalive_count + 1)
"""The keepalive's verdict on a silent connection: ~4 s."""
SLACK = 3.0
"""CPU noise on a loaded 2-core machine."""
BOUND = DETECT + SETTINGS.reconnect_timeout + SLACK
"""From link-down to ConnectionLost for every request of the cut host."""

_PROBE: contextvars.ContextVar[bool] = contextvars.ContextVar("probe", default=False)


def _healthy(i: int) -> bool:
    return i not in (DEAD, BACK)


def _scsi_target(n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "sd" + (letters[n] if n < 26 else letters[n // 26 - 1] + letters[n % 26])


def _domain(i: int, d: int) -> str:
    return f"h{i}-d{d}"


def _scsi(s: str, d: int, k: int) -> str:
    return f"ua-{s}-{d}-{k}"


def _pci(s: str, d: int, k: int) -> str:
    return f"ua-p{s}-{d}-{k}"


def _probe(k: int) -> str:
    return f"ua-q-{k}"


# ------------------------------------------------------------------ the lab


@dataclass
class Lab:
    hosts: list[NetnsHost]
    uuids: dict[tuple[int, str], str]  # (host, domain name) -> UUID
    slots: dict[tuple[int, str], int]  # (host, alias) -> PCI slot (OS-less PCI disks)
    guest_boot: float


def _domain_disks(i: int, d: int) -> list[_lab.DiskSpec]:
    scsi = [_scsi(s, d, k) for s in ("a", "b") for k in range(SCSI_PER_SET)]
    if d == 2:
        scsi += [_probe(k) for k in range(max(PROBES["b"]) + 1)]
    disks = [
        _lab.DiskSpec(_scsi_target(n), "scsi", alias=a, size_mib=1) for n, a in enumerate(scsi)
    ]
    if not _healthy(i):
        pci = [_pci(s, d, k) for s in ("a", "b") for k in range(PCI_PER_SET)]
        disks += [
            _lab.DiskSpec(f"vd{'abcdefgh'[n]}", "virtio", alias=a, size_mib=1)
            for n, a in enumerate(pci)
        ]
    return disks


def _define_guest(host: NetnsHost) -> str:
    """The booted guest on ``host``: q35, native PCIe hotplug, four virtio-blk disks."""
    quiet()
    image = _lab.stage_guest_image(_guest.build_guest_image(), host.daemon.workdir)
    parts = []
    for n, alias in enumerate(GUEST_DISKS["a"] + GUEST_DISKS["b"]):
        spec = _lab.DiskSpec(f"vd{'bcde'[n]}", "virtio", alias=alias, size_mib=1)
        path = _lab.disk_image(spec, host.daemon.workdir, GUEST)
        os.chmod(path, 0o666)  # noqa: S103 - QEMU runs as the daemon's uid
        parts.append(ET.tostring(_lab.disk_xml(spec, path), encoding="unicode"))
    xml = _guest.guest_domain_xml(
        GUEST,
        image,
        serial_log=host.daemon.workdir / f"{GUEST}.serial.log",
        machine="q35",
        native_pcie_hotplug=True,
        devices=parts,
        hotplug_ports=0,
    )
    conn = libvirt.open(host.local_uri)
    try:
        dom = conn.defineXML(xml)
        dom.create()
        return str(dom.UUIDString())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and the private libvirtds need root")
    started = time.monotonic()
    with netns_fleet(SCRATCH, HOSTS) as hosts:
        up = time.monotonic() - started
        uuids: dict[tuple[int, str], str] = {}
        jobs = [(i, d) for d in range(DOMAINS) for i in range(HOSTS)]
        with ThreadPoolExecutor(max_workers=HOSTS) as pool:
            guest_uuid = pool.submit(_define_guest, hosts[BACK])
            defined = pool.map(
                lambda job: hosts[job[0]].daemon.define(_domain(*job), _domain_disks(*job)),
                jobs,
            )
            for (i, d), uuid in zip(jobs, defined, strict=True):
                uuids[i, _domain(i, d)] = uuid
            uuids[BACK, GUEST] = guest_uuid.result()
        slots: dict[tuple[int, str], int] = {}
        for i in (DEAD, BACK):
            for d in range(DOMAINS):
                found = pci_slots(live_xml(hosts[i].local_uri, uuids[i, _domain(i, d)]))
                for s in ("a", "b"):
                    for k in range(PCI_PER_SET):
                        slots[i, _pci(s, d, k)] = found[_pci(s, d, k)]
        boot = _guest.wait_for_ready(hosts[BACK].daemon.workdir / f"{GUEST}.serial.log", 180)
        print(
            f"\nlab: {HOSTS} hosts up in {up:.1f} s, {len(uuids)} domains defined and "
            f"started, guest ready {boot:.1f} s later (set-up {time.monotonic() - started:.1f} s)"
        )
        yield Lab(hosts, uuids, slots, boot)
        teardown = time.monotonic()
    print(f"\nlab removed in {time.monotonic() - teardown:.1f} s")


# -------------------------------------------------------------- recorders


@dataclass
class Gauge:
    """Batch calls in flight (DetachService.detach), overall and per domain."""

    now: int = 0
    high: int = 0
    per_domain: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    per_domain_high: int = 0
    spans: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)

    def reset(self) -> None:
        self.high = self.per_domain_high = 0


def _gauge(monkeypatch: pytest.MonkeyPatch) -> Gauge:
    gauge = Gauge()
    original = DetachService.detach

    async def counting(self: DetachService, domain: Any, **kwargs: Any) -> Any:
        if _PROBE.get():
            return await original(self, domain, **kwargs)
        key = (self.uri, str(domain))
        gauge.now += 1
        gauge.per_domain[key] += 1
        gauge.high = max(gauge.high, gauge.now)
        gauge.per_domain_high = max(gauge.per_domain_high, gauge.per_domain[key])
        began = time.monotonic()
        try:
            return await original(self, domain, **kwargs)
        finally:
            gauge.now -= 1
            gauge.per_domain[key] -= 1
            gauge.spans[self.uri, str(domain), str(kwargs.get("alias"))] = (
                began,
                time.monotonic(),
            )

    monkeypatch.setattr(DetachService, "detach", counting)
    return gauge


@dataclass
class Logbook:
    """aiodetach's structlog events with the time they were logged."""

    entries: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def record(
        self, _logger: object, _method: str, event: MutableMapping[str, Any]
    ) -> Mapping[str, Any]:
        self.entries.append((time.monotonic(), dict(event)))
        raise structlog.DropEvent

    def first(self, event: str, uri: str, after: float) -> float | None:
        for at, entry in self.entries:
            if at >= after and entry.get("event") == event and entry.get("uri") == uri:
                return at
        return None


@contextlib.contextmanager
def _logbook() -> Iterator[Logbook]:
    book = Logbook()
    saved = structlog.get_config()
    structlog.configure(processors=[book.record])
    try:
        yield book
    finally:
        structlog.configure(**saved)


async def _until(predicate: Callable[[], bool], limit: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"timed out after {limit:g} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def _aliases(uri: str, uuid: str) -> set[str]:
    root = ET.fromstring(live_xml(uri, uuid))  # noqa: S314 - libvirtd's output
    return {a.get("name", "") for a in root.iterfind("devices/*/alias")}


# ----------------------------------------------------------------- a batch


@dataclass
class Run:
    name: str
    requests: list[dict[str, str]]
    outcomes: list[DetachOutcome]
    progress: list[tuple[float, int, int, DetachOutcome]]
    started: float
    ended: float
    mark: float  # when hosts DEAD and BACK had taken their PCI requests (the cut)
    probes: list[tuple[str, float]]  # (uri, seconds) of each probe detach
    restored: float | None = None
    ejected_during_cut: list[str] = field(default_factory=list)

    def of_host(self, host: NetnsHost) -> list[DetachOutcome]:
        return [o for o in self.outcomes if o.request.uri == host.tcp_uri]


def _requests(lab: Lab, s: str) -> list[dict[str, str]]:
    """Set ``s`` on every host; on hosts DEAD and BACK the PCI disks come first."""
    batch: list[dict[str, str]] = []
    for host in lab.hosts:
        i, uri = host.index, host.tcp_uri
        if i == BACK:
            batch += [{"uri": uri, "domain": GUEST, "alias": a} for a in GUEST_DISKS[s]]
        for d in range(DOMAINS):
            if not _healthy(i):
                batch += [
                    {"uri": uri, "domain": _domain(i, d), "alias": _pci(s, d, k)}
                    for k in range(PCI_PER_SET)
                ]
            batch += [
                {"uri": uri, "domain": _domain(i, d), "alias": _scsi(s, d, k)}
                for k in range(SCSI_PER_SET)
            ]
    return batch


async def _probe_loop(
    fleet: DetachFleet, lab: Lab, s: str, stop: asyncio.Event, out: list[tuple[str, float]]
) -> None:
    """One SCSI detach on a healthy host every PROBE_EVERY s, round robin."""
    _PROBE.set(True)
    queue = [(h, k) for k in PROBES[s] for h in lab.hosts if _healthy(h.index)]
    for host, k in queue:
        if stop.is_set():
            return
        began = time.monotonic()
        result = await fleet.detach(host.tcp_uri, _domain(host.index, 2), alias=_probe(k))
        assert result.confirmed_by == "event", result
        out.append((host.tcp_uri, time.monotonic() - began))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBE_EVERY):
                await stop.wait()


async def _eject(lab: Lab, host: NetnsHost, aliases: list[str]) -> None:
    """Act as the OS-less guests of ``host``: acknowledge these PCI unplugs
    (through the daemon's UNIX socket, which a partition does not cut)."""
    by_domain: dict[str, list[int]] = collections.defaultdict(list)
    for alias in aliases:
        d = int(alias.split("-")[2])
        by_domain[lab.uuids[host.index, _domain(host.index, d)]].append(
            lab.slots[host.index, alias]
        )
    for uuid, slots in by_domain.items():
        await asyncio.to_thread(guest_ejects, host.local_uri, uuid, slots)


async def _batch(
    fleet: DetachFleet, lab: Lab, s: str, *, partition: bool, sent: RequestLog, book: Logbook
) -> Run:
    dead, back = lab.hosts[DEAD], lab.hosts[BACK]
    requests = _requests(lab, s)
    progress: list[tuple[float, int, int, DetachOutcome]] = []
    outcomes_so_far: dict[tuple[str, str], DetachOutcome] = {}

    def on_progress(outcome: DetachOutcome, done: int, total: int) -> None:
        progress.append((time.monotonic(), done, total, outcome))
        outcomes_so_far[outcome.request.uri or "", outcome.request.alias or ""] = outcome

    stop = asyncio.Event()
    probes: list[tuple[str, float]] = []
    started = time.monotonic()
    batch = asyncio.create_task(
        fleet.detach_many(
            requests, concurrency=CONCURRENCY, per_domain=PER_DOMAIN, on_progress=on_progress
        )
    )
    probing = asyncio.create_task(_probe_loop(fleet, lab, s, stop, probes))
    try:
        pci = {
            h: [_pci(s, d, k) for d in range(DOMAINS) for k in range(PCI_PER_SET)]
            for h in (DEAD, BACK)
        }
        await _until(
            lambda: (
                all(sent.accepted(a, uri=dead.tcp_uri) for a in pci[DEAD])
                and all(
                    sent.accepted(a, uri=back.tcp_uri) for a in pci[BACK] + list(GUEST_DISKS[s])
                )
            ),
            60,
            "hosts 0 and 1 to take their PCI requests",
        )
        mark = time.monotonic()
        run = Run(f"batch {s}", requests, [], progress, started, 0.0, mark, probes)
        if not partition:
            await _eject(lab, dead, pci[DEAD])
            await _eject(lab, back, pci[BACK])
        else:
            dead.cut()
            back.cut()
            mark = run.mark = time.monotonic()
            # During the cut, the guests of host BACK answer: one PCI disk per
            # domain (the test acting as the OS-less guests) and the booted guest,
            # on its own, ~6 s after the request.
            first = [_pci(s, d, 0) for d in range(DOMAINS)]
            await asyncio.sleep(0.5)
            await _eject(lab, back, first)
            run.ejected_during_cut = first + list(GUEST_DISKS[s])
            guest_uuid = lab.uuids[BACK, GUEST]

            def guest_done() -> bool:
                return not (set(GUEST_DISKS[s]) & _aliases(back.local_uri, guest_uuid))

            await _until(
                lambda: book.first("aiodetach.connection_lost", back.tcp_uri, mark) is not None,
                DETECT + SLACK + 5,
                "the keepalive to notice host 1's partition",
            )
            deadline = time.monotonic() + 30
            while not await asyncio.to_thread(guest_done):
                assert time.monotonic() < deadline, "the booted guest did not release its disks"
                await asyncio.sleep(0.2)
            back.restore()
            run.restored = time.monotonic()
            assert run.restored - mark < DETECT + SETTINGS.reconnect_timeout - 1, (
                "host 1 was given back too late to test a reconnect: "
                f"{run.restored - mark:.1f} s after the cut"
            )
            await _until(
                lambda: book.first("aiodetach.reconnected", back.tcp_uri, mark) is not None,
                SETTINGS.reconnect_timeout + 30,
                "host 1's reconnect",
            )
            await _until(
                lambda: all((back.tcp_uri, a) in outcomes_so_far for a in run.ejected_during_cut),
                30,
                "host 1's devices that left during the cut",
            )
            await _eject(lab, back, [_pci(s, d, 1) for d in range(DOMAINS)])
        async with asyncio.timeout(BOUND + 60):
            run.outcomes = await batch
        run.ended = time.monotonic()
        stop.set()
        async with asyncio.timeout(30):
            await probing
        return run
    finally:
        stop.set()
        for task in (batch, probing):
            task.cancel()  # no-op when done; on a failed check, nothing is left running
        await asyncio.gather(batch, probing, return_exceptions=True)


# ------------------------------------------------------------------ checks


def _removed_everywhere(lab: Lab, run: Run, hosts: list[NetnsHost]) -> None:
    for host in hosts:
        wanted = {(r["domain"], r["alias"]) for r in run.requests if r["uri"] == host.tcp_uri}
        for name in {d for d, _ in wanted}:
            left = _aliases(host.local_uri, lab.uuids[host.index, name])
            still = sorted(a for d, a in wanted if d == name and a in left)
            assert not still, f"{run.name}: {host.tcp_uri} {name} still has {still}"


def _one_request_each(run: Run, hosts: list[NetnsHost], sent: RequestLog) -> list[int]:
    """Requests per device, counted at QEMU (device_del) and at the client."""
    per_device: list[int] = []
    for host in hosts:
        at_qemu = host.device_dels()
        for r in run.requests:
            if r["uri"] != host.tcp_uri:
                continue
            alias = r["alias"]
            assert at_qemu[alias] == 1, f"{run.name}: {alias} on {host.tcp_uri}: {at_qemu[alias]}"
            assert len(sent.matching(alias, uri=host.tcp_uri)) == 1, (run.name, host.tcp_uri, alias)
            per_device.append(at_qemu[alias])
    return per_device


def _progress_ok(run: Run) -> None:
    total = len(run.requests)
    assert [d for _, d, _, _ in run.progress] == list(range(1, total + 1)), run.name
    assert {t for _, _, t, _ in run.progress} == {total}, run.name


def _healthy_span(run: Run, lab: Lab) -> float:
    """Seconds from the batch's start to the last outcome of a healthy host."""
    healthy = {h.tcp_uri for h in lab.hosts if _healthy(h.index)}
    return max(at for at, _, _, o in run.progress if o.request.uri in healthy) - run.started


def _at(run: Run, outcome: DetachOutcome) -> float:
    """When ``outcome`` arrived, in seconds after the cut (the mark)."""
    return next(at for at, _, _, o in run.progress if o is outcome) - run.mark


def _latencies(run: Run, gauge: Gauge, hosts: list[NetnsHost]) -> list[float]:
    uris = {h.tcp_uri for h in hosts}
    wanted = {(r["uri"], r["domain"], r["alias"]) for r in run.requests if r["uri"] in uris}
    return [end - began for key, (began, end) in gauge.spans.items() if key in wanted]


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms / max {max(values) * 1000:.0f} ms"


async def test_partitioned_fleet(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = lab.hosts
    dead, back = hosts[DEAD], hosts[BACK]
    healthy = [h for h in hosts if _healthy(h.index)]
    sent = record_requests(monkeypatch)
    gauge = _gauge(monkeypatch)
    with _logbook() as book:
        async with DetachFleet(settings=SETTINGS) as fleet:
            async with asyncio.timeout(120):
                base = await _batch(fleet, lab, "a", partition=False, sent=sent, book=book)
            base_high, base_domain_high = gauge.high, gauge.per_domain_high
            gauge.reset()
            async with asyncio.timeout(180):
                part = await _batch(fleet, lab, "b", partition=True, sent=sent, book=book)
            closing = time.monotonic()  # host 0 is still cut
        closed = time.monotonic() - closing

    # -- the baseline: every device on every host, one request each ------------
    assert all(o.result is not None for o in base.outcomes), [o for o in base.outcomes if o.error]
    assert {(o.result.attempts, o.result.confirmed_by) for o in base.outcomes if o.result} == {
        (1, "event")
    }
    await asyncio.to_thread(_removed_everywhere, lab, base, hosts)
    _progress_ok(base)
    assert base_high <= CONCURRENCY
    assert base_domain_high <= PER_DOMAIN

    # -- partitioned: the healthy hosts did not notice -------------------------
    for o in part.outcomes:
        if o.request.uri in {h.tcp_uri for h in healthy}:
            assert o.result is not None, o
            assert (o.result.attempts, o.result.confirmed_by) == (1, "event"), o
    await asyncio.to_thread(_removed_everywhere, lab, part, [*healthy, back])
    _progress_ok(part)
    assert gauge.high <= CONCURRENCY
    assert gauge.per_domain_high <= PER_DOMAIN

    # -- host 0, cut for good: ConnectionLost within the bound -----------------
    lost_after = []
    for o in part.of_host(dead):
        if o.result is not None:  # done before the cut
            assert _at(part, o) < 0.5, o
            continue
        assert isinstance(o.error, ConnectionLost), o
        lost_after.append(_at(part, o))
    pending_dead = {_pci("b", d, k) for d in range(DOMAINS) for k in range(PCI_PER_SET)}
    assert {o.request.alias for o in part.of_host(dead) if o.error} >= pending_dead
    assert max(lost_after) <= BOUND, (max(lost_after), BOUND)
    noticed = {
        h.index: (book.first("aiodetach.connection_lost", h.tcp_uri, part.mark) or 1e9) - part.mark
        for h in (dead, back)
    }
    assert max(noticed.values()) <= DETECT + SLACK, noticed

    # -- host 1, given back while its detaches were pending --------------------
    assert part.restored is not None
    reconnected = book.first("aiodetach.reconnected", back.tcp_uri, part.mark)
    assert reconnected is not None
    for o in part.of_host(back):
        assert o.result is not None, o
        if o.request.alias in part.ejected_during_cut:
            assert o.result.confirmed_by == "xml", o  # left while the link was down
    late = [_pci("b", d, 1) for d in range(DOMAINS)]
    assert all(
        o.result.confirmed_by == "event"
        for o in part.of_host(back)
        if o.request.alias in late and o.result
    )

    # -- one request per device, counted where it lands (QEMU) -----------------
    at_qemu = [n for h in hosts for n in h.device_dels().values()]
    per_device = [
        h.device_dels()[r["alias"]]
        for run in (base, part)
        for h in hosts
        for r in run.requests
        if r["uri"] == h.tcp_uri and not (run is part and h is dead)
    ]
    assert set(per_device) == {1}, collections.Counter(per_device)
    dead_counts = [
        dead.device_dels()[r["alias"]] for r in part.requests if r["uri"] == dead.tcp_uri
    ]
    assert max(dead_counts) <= 1
    assert all(dead.device_dels()[a] == 1 for a in pending_dead)
    client = collections.Counter((r.uri, r.alias) for r in sent.requests)
    twice = {
        k: [r for r in sent.requests if (r.uri, r.alias) == k] for k, n in client.items() if n > 1
    }

    # -- the figures -----------------------------------------------------------
    devices = len(base.requests) + len(part.requests)
    healthy_a, healthy_b = _healthy_span(base, lab), _healthy_span(part, lab)
    probes_a = [t for _, t in base.probes]
    probes_b = [t for _, t in part.probes]
    lat_a, lat_b = _latencies(base, gauge, healthy), _latencies(part, gauge, healthy)
    print(
        f"""
fleet under partition: {HOSTS} hosts (private libvirtd each, own netns, qemu+tcp over veth),
  {DOMAINS * HOSTS} OS-less domains + 1 booted guest; 2 batches of {len(base.requests)} devices
  ({devices} in all) + {len(probes_a) + len(probes_b)} probe detaches, one DetachFleet
requests per device at QEMU (device_del): min {min(per_device)} max {max(per_device)} over
  {len(per_device)} devices (cut host: {collections.Counter(dead_counts)}); client calls: max
  {max(client.values())}{f" ({len(twice)} devices called twice: {twice})" if twice else ""}
concurrency: max {base_high}/{gauge.high} in flight (bound {CONCURRENCY}), per domain max
  {base_domain_high}/{gauge.per_domain_high} (bound {PER_DOMAIN}); progress {len(part.progress)}/{len(part.requests)} reports
partition noticed (keepalive {SETTINGS.keepalive_interval} s x {SETTINGS.keepalive_count}): host 0 after
  {noticed[DEAD]:.2f} s, host 1 after {noticed[BACK]:.2f} s (expected ~{DETECT} s)
host 0 (cut for good): {len(lost_after)} requests ended in ConnectionLost {min(lost_after):.2f}-{max(lost_after):.2f} s
  after link-down (bound {BOUND:g} s = {DETECT} + reconnect_timeout {SETTINGS.reconnect_timeout:g} + {SLACK:g})
host 1 (given back {part.restored - part.mark:.2f} s after link-down): reconnected
  {reconnected - part.restored:.2f} s after; {len(part.ejected_during_cut)} devices that left meanwhile reported by
  the live XML, the rest by their events
healthy hosts: batch span {healthy_a:.2f} s without partition, {healthy_b:.2f} s with;
  request latency {_ms(lat_a)} without, {_ms(lat_b)} with;
  probes {_ms(probes_a)} without, {_ms(probes_b)} with (every {PROBE_EVERY} s through the partition)
batches: {base.ended - base.started:.1f} s / {part.ended - part.started:.1f} s; fleet closed in {closed:.2f} s with host 0 still cut"""
    )
    assert at_qemu
    assert max(probes_b) < 2.0, probes_b
    assert max(lat_b) < 2.0, sorted(lat_b)[-5:]
    assert closed < 15.0
