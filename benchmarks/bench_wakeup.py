"""Wake-up latency: event callback → the awaiting ``detach()`` caller resumed.

In-process part (no libvirt): 1,000 detaches are pending on one loop, on
:class:`aiodetach.testing.FakeHypervisor` (a fake).  Their DEVICE_REMOVED
events are then delivered one per loop callback, 0.5 ms apart (as libvirtaio
runs each libvirt callback on the loop), in shuffled order.  Latency = from
just before ``sink.device_removed(...)`` in the callback to just after
``await svc.detach(...)`` returned in the caller — so it includes everything
the library does after the event (the unplug's task finishing, the shielded
wait, building the result, logging).  The reference is the bare minimum: a
task awaiting a plain Future resolved by the same kind of callback.  Run on
the default asyncio loop and on uvloop when it is installed.

Real part (optional, needs libvirtd): SCSI disk detaches on an OS-less QEMU
domain; the timestamp is taken inside libvirt's DEVICE_REMOVED callback (a
:class:`LibvirtBackend` subclass wraps the service's sink), the caller stamps
when its ``detach()`` returns.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from _common import (
    URI,
    Row,
    configure_logging,
    eprint,
    finish,
    fmt_ratio,
    fmt_s,
    met,
    parse_args,
    percentile,
    skipped,
)
from aiodetach import DetachService, DetachSettings
from aiodetach._libvirt import LibvirtBackend
from aiodetach.backend import EventSink
from aiodetach.instrumentation import prometheus_hook
from aiodetach.testing import FakeHypervisor, GuestUnplug
from bench_dispatch import wait_all_sent

SPACING = 0.0005
TARGET = 1e-3


def loop_factories() -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]]:
    out: list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]] = [
        ("asyncio", asyncio.new_event_loop)
    ]
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        out.append(("uvloop", None))
    else:
        out.append(("uvloop", uvloop.new_event_loop))
    return out


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, Any]) -> Any:
    # Each run starts with the previous runs' garbage collected, so a full
    # collection of what they left cannot land in (and only in) the next run.
    gc.collect()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def _deliver_spaced(keys: list[Any], fire: Callable[[Any], None]) -> None:
    """Fire one event per loop callback, SPACING apart."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.01
    for i, key in enumerate(keys):
        loop.call_at(start + i * SPACING, fire, key)


async def fake_latencies(n: int, burst: bool, *, prometheus: bool = False) -> list[float]:
    fake = FakeHypervisor()
    keys: list[tuple[str, str, str]] = []
    for d in range(n // 10):
        dom = fake.add_domain(f"vm-{d:04d}")
        for k in range(10):
            dom.add_disk(f"vd{chr(ord('b') + k)}", alias=f"ua-disk{k}", unplug=GuestUnplug.manual())
            keys.append((dom.uuid, dom.name, f"ua-disk{k}"))
    sent_at: dict[tuple[str, str], float] = {}
    lat: list[float] = []
    settings = DetachSettings(attempts=1, timeout=3600.0)
    hooks = [prometheus_hook(CollectorRegistry())] if prometheus else []
    async with DetachService(backend=fake, settings=settings, hooks=hooks) as svc:

        async def caller(uuid: str, alias: str) -> None:
            await svc.detach(uuid, alias=alias, live=True, persistent=False)
            lat.append(time.perf_counter() - sent_at[(uuid, alias)])

        sink = fake.sink
        assert sink is not None

        def fire(key: tuple[str, str, str]) -> None:
            sent_at[(key[0], key[2])] = time.perf_counter()
            sink.device_removed(*key)

        tasks = [asyncio.ensure_future(caller(u, a)) for u, _n, a in keys]
        await wait_all_sent(fake, n)
        assert len(svc.pending()) == n
        order = list(keys)
        random.Random(7).shuffle(order)
        if burst:
            for key in order:
                fire(key)
        else:
            await _deliver_spaced(order, fire)
        await asyncio.gather(*tasks)
    return lat


async def bare_latencies(n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in range(n)]
    sent_at: dict[int, float] = {}
    lat: list[float] = []

    async def waiter(i: int, fut: asyncio.Future[bool]) -> None:
        await fut
        lat.append(time.perf_counter() - sent_at[i])

    def fire(i: int) -> None:
        sent_at[i] = time.perf_counter()
        futs[i].set_result(True)

    tasks = [asyncio.ensure_future(waiter(i, f)) for i, f in enumerate(futs)]
    order = list(range(n))
    random.Random(7).shuffle(order)
    await _deliver_spaced(order, fire)
    await asyncio.gather(*tasks)
    return lat


# ---------------------------------------------------------------- real path
async def real_latencies(disks: int, rounds: int) -> list[float]:
    import libvirt

    from aiodetach_lab.bench import bench_domain, reattach, scsi_disks

    specs = scsi_disks(disks)
    stamps: dict[str, float] = {}
    lat: list[float] = []

    class Stamping:
        """The service's sink, stamped inside libvirt's callback."""

        def __init__(self, sink: EventSink) -> None:
            self._sink = sink

        def device_removed(self, uuid: str, name: str, alias: str) -> None:
            stamps[alias] = time.perf_counter()
            self._sink.device_removed(uuid, name, alias)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sink, name)

    class StampingBackend(LibvirtBackend):
        def open(self, sink: EventSink, *, read_only: bool) -> None:
            super().open(Stamping(sink), read_only=read_only)

    with bench_domain(specs, "wakeup") as lab:
        conn = libvirt.open(URI)
        try:
            dom = conn.lookupByUUIDString(lab.uuid)
            settings = DetachSettings(attempts=1, timeout=10.0)
            backend = StampingBackend(URI)
            async with DetachService(URI, settings=settings, backend=backend) as svc:
                await asyncio.sleep(0.5)  # let SeaBIOS find the controller
                for _ in range(rounds):
                    for spec in specs:
                        assert spec.alias is not None
                        await svc.detach(lab.uuid, alias=spec.alias, live=True, persistent=False)
                        lat.append(time.perf_counter() - stamps.pop(spec.alias))
                    for spec in specs:
                        await asyncio.to_thread(reattach, dom, lab, spec)
        finally:
            conn.close()
    return lat


def _p(values: list[float]) -> str:
    return f"p50 {fmt_s(percentile(values, 50))} / p99 {fmt_s(percentile(values, 99))}"


def main() -> None:
    args = parse_args(__doc__ or "")
    configure_logging(args.structlog_default)
    n = 200 if args.quick else 1000
    reps = 1 if args.quick else 3
    rows: list[Row] = []
    details: list[str] = [
        f"{n} detaches pending; events {SPACING * 1e3:g} ms apart, one per loop callback; "
        f"{reps} run(s) pooled per loop."
    ]
    for loop_name, factory in loop_factories():
        label = f"wake-up, {n} pending, {loop_name}"
        if factory is None:
            rows.append(skipped(label, "uvloop not installed", "p99 < 1 ms"))
            continue
        ours: list[float] = []
        bare: list[float] = []
        prom: list[float] = []
        for _ in range(reps):
            bare += run_on(factory, bare_latencies(n))
            ours += run_on(factory, fake_latencies(n, burst=False))
            prom += run_on(factory, fake_latencies(n, burst=False, prometheus=True))
        burst = run_on(factory, fake_latencies(n, burst=True))
        eprint(f"  wakeup {loop_name}: aiodetach {_p(ours)}, bare {_p(bare)}")
        p99 = percentile(ours, 99)
        rows.append(
            Row(
                label,
                _p(ours),
                f"bare Future: {_p(bare)}",
                fmt_ratio(p99 / percentile(bare, 99)) + " (p99)",
                "p99 < 1 ms",
                met(p99 < TARGET),
            )
        )
        eprint(f"  wakeup {loop_name}, Prometheus hook: {_p(prom)}")
        rows.append(
            Row(
                label + ", Prometheus hook",
                _p(prom),
                f"no extra hook: {_p(ours)}",
                fmt_ratio(percentile(prom, 99) / p99) + " (p99)",
                "p99 < 1 ms",
                met(percentile(prom, 99) < TARGET),
            )
        )
        details.append(
            f"- {loop_name}: max aiodetach {fmt_s(max(ours))}, max bare {fmt_s(max(bare))}; "
            f"all {n} events in one burst (queueing, not latency): {_p(burst)}, "
            f"last caller resumed after {fmt_s(max(burst))}"
        )

    from aiodetach_lab.bench import unavailable

    why = unavailable()
    label = "wake-up, real libvirtd + QEMU (SCSI)"
    if why is not None:
        rows.append(skipped(label, why, "p99 < 1 ms"))
    else:
        disks, rounds = (3, 1) if args.quick else (8, 3)
        real = run_on(asyncio.new_event_loop, real_latencies(disks, rounds))
        eprint(f"  wakeup real: {_p(real)}")
        rows.append(
            Row(
                label,
                _p(real) + f" (n={len(real)})",
                "—",
                "—",
                "p99 < 1 ms",
                met(percentile(real, 99) < TARGET),
                "libvirt callback → caller resumed",
            )
        )
        details.append(
            f"- real: {len(real)} SCSI detaches, one at a time, re-attached between rounds; "
            f"max {fmt_s(max(real))}"
        )
    finish("Wake-up latency", rows, args, "\n".join(details))


if __name__ == "__main__":
    main()
