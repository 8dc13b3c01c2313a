"""Dispatch: 10,000 pending detaches across 1,000 domains, 10,000 events.

What is timed
    The *dispatch path*: a loop on the event-loop thread that delivers all
    10,000 DEVICE_REMOVED notifications, one ``sink.device_removed(uuid, name,
    alias)`` call each on the event sink the service registered (``fake.sink``:
    what :mod:`aiodetach._libvirt` calls from libvirt's callback; with
    libvirtaio the callback runs on the loop thread).  When that loop ends
    every waiter's Future is resolved — aiodetach
    resolves it synchronously inside the call — so "delivering all events
    until all 10,000 futures are resolved" and "the dispatch path" are the
    same interval here.  The wake-ups it schedules (each waiting task resumes
    on the next loop iterations) are not in it; the time until all 10,000
    ``detach()`` calls have returned is reported separately, for information.

Compared with
    * a waiter *list* scanned linearly per event under a ``threading.Lock``
      (the design nova's ``AsyncDeviceEventsHandler`` uses: every waiter's
      ``matches(event)`` is asked, matching ones are removed and notified),
    * the bare limit: one dict lookup + ``Future.set_result``.
    Each baseline's futures are awaited by one task each, like aiodetach's
    outcome futures, so ``set_result`` schedules one wake-up in every design.
    Events are delivered in one shuffled order, the same for all designs.

The real :class:`aiodetach.DetachService` runs on
:class:`aiodetach.testing.FakeHypervisor` (a fake: no libvirt involved); every
detach is really sent and really waiting when the events arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import pstats
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from _common import (
    Row,
    configure_logging,
    eprint,
    finish,
    fmt_ratio,
    fmt_s,
    median,
    met,
    parse_args,
    skipped,
)
from aiodetach import DetachResult, DetachService, DetachSettings, DeviceEvent
from aiodetach.testing import FakeHypervisor, GuestUnplug

Event = tuple[str, str, str]  # (uuid, domain name, alias)


@dataclass
class Sizes:
    domains: int
    per_domain: int
    rounds: int
    linear_rounds: int

    @property
    def total(self) -> int:
        return self.domains * self.per_domain


def build_fake(sizes: Sizes) -> tuple[FakeHypervisor, list[Event]]:
    fake = FakeHypervisor()
    events: list[Event] = []
    for d in range(sizes.domains):
        dom = fake.add_domain(f"vm-{d:04d}")
        for k in range(sizes.per_domain):
            alias = f"ua-disk{k}"
            dom.add_disk(f"vd{chr(ord('b') + k)}", alias=alias, unplug=GuestUnplug.manual())
            events.append((dom.uuid, dom.name, alias))
    return fake, events


async def wait_all_sent(fake: FakeHypervisor, expected: int) -> None:
    """Until every detach was sent and its task is parked waiting for the event."""
    while True:
        if len(fake.requests) >= expected and not fake.in_flight:
            break
        await asyncio.sleep(0.01)
    # Let the executor results reach their tasks, which then park in asyncio.wait().
    await asyncio.sleep(0.05)
    for _ in range(10):
        await asyncio.sleep(0)


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect, then freeze what exists: the timed loop's collections only scan
    objects it creates (not the 10,000 parked tasks and the fake), in every design."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def round_aiodetach(
    svc: DetachService, fake: FakeHypervisor, events: list[Event], order: list[Event]
) -> tuple[float, float]:
    """Returns (dispatch seconds, dispatch-to-all-detach()-returned seconds)."""
    already = len(fake.requests)
    tasks = [
        asyncio.ensure_future(svc.detach(uuid, alias=alias, live=True, persistent=False))
        for uuid, _name, alias in events
    ]
    await wait_all_sent(fake, already + len(events))
    assert len(svc.pending()) == len(events), (len(svc.pending()), len(events))
    sink = fake.sink  # what libvirt calls: the service's event intake
    assert sink is not None
    deliver = sink.device_removed
    with quiet_gc():
        t0 = time.perf_counter()
        for uuid, name, alias in order:
            deliver(uuid, name, alias)
        t1 = time.perf_counter()
    results: list[DetachResult] = await asyncio.gather(*tasks)
    t2 = time.perf_counter()
    assert all(r.confirmed_by == "event" and r.attempts == 1 for r in results)
    assert svc.pending() == []
    return t1 - t0, t2 - t0


async def _park(fut: asyncio.Future[bool]) -> bool:
    return await fut


async def round_bare(events: list[Event], order: list[Event]) -> float:
    loop = asyncio.get_running_loop()
    waiters: dict[tuple[str, str], asyncio.Future[bool]] = {}
    for uuid, _name, alias in events:
        waiters[(uuid, alias)] = loop.create_future()
    tasks = [asyncio.ensure_future(_park(f)) for f in waiters.values()]
    await asyncio.sleep(0)
    with quiet_gc():
        t0 = time.perf_counter()
        for uuid, _name, alias in order:
            waiters[(uuid, alias)].set_result(True)
        t1 = time.perf_counter()
    await asyncio.gather(*tasks)
    return t1 - t0


class _ListWaiter:
    """One waiter of the list design: asked ``matches()`` for every event."""

    __slots__ = ("alias", "event_types", "future", "uuid")

    def __init__(self, uuid: str, alias: str, future: asyncio.Future[bool]) -> None:
        self.uuid = uuid
        self.alias = alias
        self.event_types = ("device-removed", "device-removal-failed")
        self.future = future

    def matches(self, uuid: str, alias: str, kind: str) -> bool:
        return self.uuid == uuid and self.alias == alias and kind in self.event_types


class _ListDispatcher:
    """Waiters in a list under a lock; each event scans the whole list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[_ListWaiter] = []

    def add(self, waiter: _ListWaiter) -> None:
        with self._lock:
            self._waiters.append(waiter)

    def notify(self, uuid: str, alias: str, kind: str) -> None:
        with self._lock:
            hits = [w for w in self._waiters if w.matches(uuid, alias, kind)]
            for w in hits:
                self._waiters.remove(w)
        for w in hits:
            w.future.set_result(True)


async def round_linear(events: list[Event], order: list[Event]) -> float:
    loop = asyncio.get_running_loop()
    dispatcher = _ListDispatcher()
    futures = []
    for uuid, _name, alias in events:
        fut: asyncio.Future[bool] = loop.create_future()
        dispatcher.add(_ListWaiter(uuid, alias, fut))
        futures.append(fut)
    tasks = [asyncio.ensure_future(_park(f)) for f in futures]
    await asyncio.sleep(0)
    with quiet_gc():
        t0 = time.perf_counter()
        for uuid, _name, alias in order:
            dispatcher.notify(uuid, alias, "device-removed")
        t1 = time.perf_counter()
    await asyncio.gather(*tasks)
    return t1 - t0


def _per_call(fn: Callable[[], object], n: int) -> float:
    """Median seconds per call of ``fn`` over 5 batches of ``n`` calls."""
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return median(samples)


def breakdown(n: int) -> list[tuple[str, float]]:
    """Seconds per event of each step of the event intake's dispatch, measured alone."""
    log = structlog.get_logger("aiodetach")
    unplugs: dict[tuple[str, str], object] = {(f"u{i}", "ua-disk1"): object() for i in range(n)}
    loop_thread = threading.get_ident()
    watchers: set[asyncio.Queue[DeviceEvent]] = set()
    loop = asyncio.new_event_loop()
    try:
        futs = [loop.create_future() for _ in range(5 * n)]
        for f in futs:
            f.add_done_callback(lambda _f: None)
        it = iter(futs)

        def set_one() -> None:
            f = next(it)
            if not f.done():
                f.set_result(True)

        steps: list[tuple[str, Callable[[], object]]] = [
            ("thread check (`_to_loop`)", lambda: threading.get_ident() == loop_thread),
            ("dict lookup of the waiter", lambda: unplugs.get(("u7", "ua-disk1"))),
            (
                "`_log.debug(...)` with 4 fields (filtered out)",
                lambda: log.debug(
                    "aiodetach.event",
                    kind="device-removed",
                    domain="vm-0001",
                    alias="ua-disk1",
                    waited=True,
                ),
            ),
            ("`Future.done()` + `set_result` (1 callback)", set_one),
            (
                "`DeviceEvent(...)` (no watcher)",
                lambda: DeviceEvent("device-removed", "u7", "vm-0001", "ua-disk1"),
            ),
            ("`_publish` loop over 0 watchers", lambda: [q.put_nowait for q in watchers]),
        ]
        return [(name, _per_call(fn, n)) for name, fn in steps]
    finally:
        loop.close()


async def profile_dispatch(svc: DetachService, fake: FakeHypervisor, events: list[Event]) -> str:
    """cProfile of one dispatch loop (profiler overhead inflates all; read the shares)."""
    tasks = [
        asyncio.ensure_future(svc.detach(uuid, alias=alias, live=True, persistent=False))
        for uuid, _name, alias in events
    ]
    await wait_all_sent(fake, len(fake.requests) + len(events))
    sink = fake.sink
    assert sink is not None
    prof = cProfile.Profile()
    with quiet_gc():
        prof.enable()
        for uuid, name, alias in events:
            sink.device_removed(uuid, name, alias)
        prof.disable()
    await asyncio.gather(*tasks)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(8)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start : start + 9])


async def measure(sizes: Sizes, *, with_baselines: bool) -> dict[str, Any]:
    fake, events = build_fake(sizes)
    order = list(events)
    random.Random(1234).shuffle(order)
    settings = DetachSettings(attempts=1, timeout=3600.0)
    out: dict[str, Any] = {
        "aiodetach": [],
        "drain": [],
        "bare": [],
        "linear": [],
        "prom": [],
        "prom_drain": [],
    }
    async with DetachService(backend=fake, settings=settings) as svc:
        for r in range(sizes.rounds):
            if with_baselines:
                out["bare"].append(await round_bare(events, order))
            dispatch, drain = await round_aiodetach(svc, fake, events, order)
            out["aiodetach"].append(dispatch)
            out["drain"].append(drain)
            if with_baselines and r < sizes.linear_rounds:
                out["linear"].append(await round_linear(events, order))
            eprint(
                f"  dispatch round {r + 1}/{sizes.rounds}: aiodetach {fmt_s(dispatch)}"
                + (f", bare {fmt_s(out['bare'][-1])}" if with_baselines else "")
                + (
                    f", linear {fmt_s(out['linear'][-1])}"
                    if with_baselines and r < sizes.linear_rounds
                    else ""
                )
            )
        if with_baselines:
            out["profile"] = await profile_dispatch(svc, fake, events[:2000])
    hook = prometheus() if with_baselines else None
    if hook is not None:
        # The same, with the Prometheus hook installed: hooks fire on the
        # unplugs' state changes (after the dispatch), never in the lookup.
        async with DetachService(backend=fake, settings=settings, hooks=[hook]) as svc:
            for r in range(sizes.rounds):
                out["bare"].append(await round_bare(events, order))
                dispatch, drain = await round_aiodetach(svc, fake, events, order)
                out["prom"].append(dispatch)
                out["prom_drain"].append(drain)
                eprint(
                    f"  dispatch round {r + 1}/{sizes.rounds}, Prometheus hook: "
                    f"aiodetach {fmt_s(dispatch)}, bare {fmt_s(out['bare'][-1])}"
                )
    return out


def prometheus() -> Any:
    """The Prometheus hook on a registry of its own (None without prometheus-client)."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None
    from aiodetach.instrumentation import prometheus_hook

    return prometheus_hook(CollectorRegistry())


def default_logging_child(sizes: Sizes, quick: bool) -> float | None:
    """aiodetach's dispatch time with structlog left at its defaults (own process)."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            __import__("tempfile").NamedTemporaryFile("r", suffix=".json", delete=True)
        )
        cmd = [sys.executable, str(Path(__file__)), "--structlog-default", "--child", tmp.name]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300, check=False
        )
        if proc.returncode != 0:
            eprint(proc.stderr.decode(errors="replace")[-2000:])
            return None
        data = json.loads(Path(tmp.name).read_text())
        return float(data["aiodetach"])


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)


def main() -> None:
    args = parse_args(__doc__ or "", extra=_extra)
    configure_logging(args.structlog_default)
    sizes = (
        Sizes(domains=200, per_domain=10, rounds=3, linear_rounds=2)
        if args.quick
        else Sizes(domains=1000, per_domain=10, rounds=5, linear_rounds=2)
    )
    if args.child:
        child = Sizes(sizes.domains, sizes.per_domain, rounds=1, linear_rounds=0)
        out = asyncio.run(measure(child, with_baselines=False))
        Path(args.child).write_text(json.dumps({"aiodetach": median(out["aiodetach"])}))
        return
    n = sizes.total
    eprint(f"dispatch: {n} pending detaches on {sizes.domains} domains")
    out = asyncio.run(measure(sizes, with_baselines=True))
    ours, bare, linear = median(out["aiodetach"]), median(out["bare"]), median(out["linear"])
    drain = median(out["drain"])
    eprint("dispatch: structlog-defaults run (child process)")
    unconfigured = default_logging_child(sizes, args.quick)
    steps = breakdown(n)

    per = f"/{n} events"
    rows = [
        Row(
            f"dispatch vs linear scan ({n} pending, {sizes.domains} domains)",
            f"{fmt_s(ours)}{per}",
            f"linear list + lock: {fmt_s(linear)}",
            fmt_ratio(linear / ours) + " faster",
            "≥ 100x faster",
            met(linear / ours >= 100),
        ),
        Row(
            "dispatch vs bare limit",
            f"{fmt_s(ours)} ({fmt_s(ours / n)}/event)",
            f"dict lookup + set_result: {fmt_s(bare)} ({fmt_s(bare / n)}/event)",
            fmt_ratio(ours / bare),
            "≤ 3x the bare limit",
            met(ours / bare <= 3),
        ),
    ]
    if unconfigured is not None:
        rows.append(
            Row(
                "dispatch, structlog unconfigured",
                f"{fmt_s(unconfigured)}{per}",
                f"bare: {fmt_s(bare)}",
                fmt_ratio(unconfigured / bare),
                "≤ 3x the bare limit",
                met(unconfigured / bare <= 3),
                "info: structlog's defaults print every debug line",
            )
        )
    label = "dispatch with the Prometheus hook vs bare limit"
    if out["prom"]:
        prom = median(out["prom"])
        rows.append(
            Row(
                label,
                f"{fmt_s(prom)} ({fmt_s(prom / n)}/event)",
                f"bare: {fmt_s(bare)}; no extra hook: {fmt_s(ours)}",
                fmt_ratio(prom / bare),
                "≤ 3x the bare limit",
                met(prom / bare <= 3),
            )
        )
    else:
        rows.append(skipped(label, "prometheus-client not installed", "≤ 3x the bare limit"))
    lines = [
        f"Medians of {sizes.rounds} rounds (linear scan: {len(out['linear'])}); "
        "events delivered on the loop thread in one shuffled order.",
        f"- aiodetach dispatch rounds: {', '.join(fmt_s(x) for x in out['aiodetach'])}",
        f"- bare limit rounds: {', '.join(fmt_s(x) for x in out['bare'])}",
        f"- linear scan rounds: {', '.join(fmt_s(x) for x in out['linear'])}",
        f"- for information: first event delivered → all {n} `detach()` calls returned: "
        f"{fmt_s(drain)} (includes each caller's result building and logging)",
        f"- with the Prometheus hook: dispatch rounds "
        f"{', '.join(fmt_s(x) for x in out['prom'])}; first event → all returned: "
        f"{fmt_s(median(out['prom_drain'])) if out['prom_drain'] else '—'} "
        "(the hook runs there: each unplug's removed/ended and each caller's finished record)",
        "",
        "Cost of each step of the dispatch path, measured alone (per event):",
        "",
    ]
    lines += [f"- {name}: {fmt_s(sec)}" for name, sec in steps]
    lines += [
        "",
        "cProfile of a dispatch loop (2,000 of the events; profiler overhead inflates "
        "every line; top by own time):",
        "",
        "```",
    ]
    lines += [str(out.get("profile", "")), "```"]
    finish("Dispatch", rows, args, "\n".join(lines))


if __name__ == "__main__":
    main()
