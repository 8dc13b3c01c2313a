"""Memory: 10,000 pending detaches (1,000 domains x 10 disks).

The real :class:`aiodetach.DetachService` on
:class:`aiodetach.testing.FakeHypervisor` (a fake) whose guests never answer
(``GuestUnplug.manual()``): every detach is sent and parked waiting for its event.

* RSS above baseline: the process's resident memory once all 10,000 are
  parked, minus its resident memory with the service open and the fake built
  (so the fake's domains are not counted; its per-request log is).
* tracemalloc: traced memory while they are parked, and the peak from the
  first ``detach()`` call to that moment, in a second, separate round (tracing
  inflates RSS, so the RSS round runs first, untraced).  The peak is split by
  source file, so the fake's own bookkeeping can be told apart.

The comparison is the bare minimum for the same number of waiters: a dict of
10,000 Futures, each awaited by one task.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import defaultdict

from _common import (
    Row,
    configure_logging,
    eprint,
    finish,
    fmt_mib,
    fmt_ratio,
    met,
    parse_args,
    rss_bytes,
)
from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor
from bench_dispatch import Event, Sizes, build_fake, wait_all_sent

TARGET = 20 * 2**20


def _bucket(filename: str) -> str:
    for key, label in (
        ("aiodetach/testing", "FakeHypervisor (the fake's bookkeeping)"),
        ("aiodetach/", "aiodetach"),
        ("asyncio/", "asyncio (tasks, futures, handles)"),
        ("concurrent/", "thread pool"),
        ("xml/", "xml.etree"),
        ("structlog", "structlog"),
    ):
        if key in filename:
            return label
    return "other"


async def _start(
    svc: DetachService, fake: FakeHypervisor, events: list[Event]
) -> list[asyncio.Task[object]]:
    already = len(fake.requests)
    tasks: list[asyncio.Task[object]] = [
        asyncio.ensure_future(svc.detach(uuid, alias=alias, live=True, persistent=False))
        for uuid, _name, alias in events
    ]
    await wait_all_sent(fake, already + len(events))
    assert len(svc.pending()) == len(events)
    return tasks


async def _finish(
    fake: FakeHypervisor, svc: DetachService, events: list[Event], tasks: list[asyncio.Task[object]]
) -> None:
    sink = fake.sink
    assert sink is not None
    for uuid, name, alias in events:
        sink.device_removed(uuid, name, alias)
    await asyncio.gather(*tasks)
    assert svc.pending() == []


async def measure(sizes: Sizes) -> dict[str, object]:
    fake, events = build_fake(sizes)
    settings = DetachSettings(attempts=1, timeout=3600.0)
    out: dict[str, object] = {}
    async with DetachService(backend=fake, settings=settings) as svc:
        # Warm-up round: worker threads started, code paths imported and cached.
        warm = events[: len(events) // 10]
        await _finish(fake, svc, warm, await _start(svc, fake, warm))
        gc.collect()
        base = rss_bytes()
        tasks = await _start(svc, fake, events)
        gc.collect()
        out["rss"] = rss_bytes() - base
        await _finish(fake, svc, events, tasks)

        gc.collect()
        tracemalloc.start()
        t0, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        tasks = await _start(svc, fake, events)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        await _finish(fake, svc, events, tasks)
        out["traced"] = current - t0
        out["peak"] = peak - t0
        by: dict[str, int] = defaultdict(int)
        for stat in snap.statistics("filename"):
            by[_bucket(stat.traceback[0].filename)] += stat.size
        out["by_file"] = dict(by)
        out["top"] = [
            f"{stat.size / len(events):6.0f} B/detach  "
            f"{stat.traceback[0].filename.split('/python3.11/')[-1].split('/src/')[-1]}"
            f":{stat.traceback[0].lineno}"
            for stat in snap.statistics("lineno")[:15]
        ]
    return out


async def measure_bare(n: int) -> int:
    async def park(fut: asyncio.Future[bool]) -> bool:
        return await fut

    loop = asyncio.get_running_loop()
    gc.collect()
    tracemalloc.start()
    t0, _ = tracemalloc.get_traced_memory()
    waiters = {(f"uuid-{i // 10:032d}", f"ua-disk{i % 10}"): loop.create_future() for i in range(n)}
    tasks = [asyncio.ensure_future(park(f)) for f in waiters.values()]
    await asyncio.sleep(0)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for f in waiters.values():
        f.set_result(True)
    await asyncio.gather(*tasks)
    return current - t0


def main() -> None:
    args = parse_args(__doc__ or "")
    configure_logging(args.structlog_default)
    sizes = Sizes(domains=200 if args.quick else 1000, per_domain=10, rounds=1, linear_rounds=0)
    n = sizes.total
    eprint(f"memory: {n} pending detaches")
    out = asyncio.run(measure(sizes))
    bare = asyncio.run(measure_bare(n))
    rss, peak, traced = int(str(out["rss"])), int(str(out["peak"])), int(str(out["traced"]))
    by_file = out["by_file"]
    assert isinstance(by_file, dict)
    fake_share = int(by_file.get("FakeHypervisor (the fake's bookkeeping)", 0))
    # The measure is what is *held* while they wait (tracemalloc, all
    # parked); the ramp's peak and the RSS it leaves are reported beside it.
    # --quick parks fewer detaches: judge the target on the 10,000 projection.
    held = traced * 10_000 / n
    target = "< 20 MiB held" if n == 10_000 else "< 20 MiB held at 10,000 (projected linearly)"
    rows = [
        Row(
            f"memory, {n} pending detaches",
            f"tracemalloc peak {fmt_mib(peak)} (held {fmt_mib(traced)}), RSS +{fmt_mib(rss)}",
            f"bare dict of Futures + 1 task each: {fmt_mib(bare)}",
            fmt_ratio(traced / bare) + " (held)",
            target,
            met(held < TARGET),
        )
    ]
    lines = [
        f"Per pending detach: {traced / n / 1024:.2f} KiB held "
        f"(bare waiter: {bare / n / 1024:.2f} KiB); of the held memory, "
        f"{fmt_mib(fake_share)} is the fake's own request log.",
        "",
        "Held memory by source file (tracemalloc, at the moment all are parked):",
        "",
    ]
    lines += [
        f"- {k}: {fmt_mib(float(v))}"
        for k, v in sorted(by_file.items(), key=lambda kv: -int(kv[1]))
    ]
    top = out["top"]
    assert isinstance(top, list)
    lines += ["", "Top allocation sites still held (per pending detach):", "", "```", *top, "```"]
    finish("Memory", rows, args, "\n".join(lines))


if __name__ == "__main__":
    main()
