"""Mass detach: N SCSI disks at once, aiodetach against raw libvirt.

    python benchmarks/bench_mass.py [--quick]

Real libvirtd + QEMU, OS-less i440fx domains whose SCSI disks QEMU releases
by itself (the event comes ~50 ms after the request), so what is measured is
the detach machinery and libvirtd, not a guest.  Three scenarios: N = 20 and
N = 60 disks of one domain, and 200 disks across 10 domains (20 each);
``--quick`` runs 10 on one domain and 40 across 4.

Each round detaches every disk of the scenario once per side, the sides in a
rotated order, and hot-plugs the disks back (untimed) before each side:

* **aiodetach**: one open :class:`DetachService` (default settings), all the
  requests at once with ``detach_many(concurrency=N, per_domain=None)``,
  domains named by name, ``live=True, persistent=False`` (the raw side does
  no persistent detach either);
* **raw**: written here against libvirt: its own connection with a
  ``DEVICE_REMOVED`` callback resolving a Future per (domain, alias), the
  domains looked up by name, then one thread per device calling
  ``detachDeviceAlias(alias, AFFECT_LIVE)``, and a wait for every event;
* **raw, one call at a time**: the same, with a lock around every libvirt
  call, which is what aiodetach's backend does on its connection (libvirt
  9.0's client crashes when a partition heals under two blocked calls): it
  tells what that serialisation costs by itself.

Time is wall clock from the first request to the last confirmation; CPU is
this process's (all threads) plus libvirtd's (``/proc/<pid>/task/*/schedstat``)
over the same span, per device.  Medians over the rounds, with their spread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import libvirt

from _common import (
    URI,
    Row,
    configure_logging,
    daemon_pid,
    eprint,
    finish,
    fmt_ratio,
    fmt_s,
    median,
    met,
    parse_args,
    proc_cpu_ns,
    skipped,
)
from aiodetach import DetachService
from aiodetach_lab.bench import bench_domain, disk_device_xml, live_aliases, unavailable
from aiodetach_lab.domains import DiskSpec

TIME_TARGET = 1.03
CPU_TARGET = 1.2
WAIT = 60.0  # no scenario may hang the benchmark


def scsi_specs(n: int) -> list[DiskSpec]:
    """``n`` SCSI disks, targets sdb… then sdaa… (more than a to z fit on virtio-scsi)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = [
        f"sd{letters[i + 1]}" if i < 25 else f"sd{letters[(i - 25) // 26]}{letters[(i - 25) % 26]}"
        for i in range(n)
    ]
    return [DiskSpec(target=t, bus="scsi", alias=f"ua-m{i}") for i, t in enumerate(names)]


@dataclass
class Scenario:
    label: str
    domains: list[tuple[Any, list[DiskSpec]]]  # (lab domain, its disks in this scenario)

    @property
    def size(self) -> int:
        return sum(len(specs) for _, specs in self.domains)


@dataclass
class Sample:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # per device, this process + libvirtd


class Raw:
    """Raw libvirt, one thread per device: the limit aiodetach is held to."""

    def __init__(self, *, serial: bool) -> None:
        self._conn = libvirt.open(URI)
        self._waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._cid = self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._removed, None
        )
        self._lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if serial else contextlib.nullcontext()
        )
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.domainEventDeregisterAny(self._cid)
        self._conn.close()

    def _removed(self, _c: Any, dom: libvirt.virDomain, alias: str, _o: Any) -> None:
        fut = self._waiters.get((dom.name(), alias))
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    async def detach_all(self, work: list[tuple[str, list[str]]]) -> None:
        n = sum(len(aliases) for _, aliases in work)
        if self._pool is None or self._pool._max_workers < n:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="raw")
        loop = asyncio.get_running_loop()
        pool = self._pool
        jobs = []
        for name, aliases in work:
            dom = await loop.run_in_executor(pool, self._call, self._conn.lookupByName, name)
            for alias in aliases:
                # Registered before sending: the event may beat the call's return.
                fut = self._waiters[(name, alias)] = loop.create_future()
                jobs.append(fut)
                call = loop.run_in_executor(
                    pool, self._call, dom.detachDeviceAlias, alias, libvirt.VIR_DOMAIN_AFFECT_LIVE
                )
                jobs.append(call)
        try:
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*jobs)
        finally:
            self._waiters.clear()


async def ours(svc: DetachService, work: list[tuple[str, list[str]]]) -> None:
    requests = [
        {"domain": name, "alias": alias, "live": True, "persistent": False}
        for name, aliases in work
        for alias in aliases
    ]
    async with asyncio.timeout(WAIT):
        outcomes = await svc.detach_many(requests, concurrency=len(requests), per_domain=None)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} detaches failed, e.g. {failed[0].error}")


def restore(conn: libvirt.virConnect, scenario: Scenario) -> None:
    """Hot-plug back every disk of the scenario that is not attached."""
    for lab, specs in scenario.domains:
        dom = conn.lookupByName(lab.name)
        present = live_aliases(dom)
        for spec in specs:
            if spec.alias not in present:
                dom.attachDeviceFlags(disk_device_xml(lab, spec), libvirt.VIR_DOMAIN_AFFECT_LIVE)


async def measure(scenarios: list[Scenario], rounds: int) -> dict[str, dict[str, Sample]]:
    pid = daemon_pid()
    out: dict[str, dict[str, Sample]] = {s.label: {} for s in scenarios}
    admin = libvirt.open(URI)
    async with DetachService(URI) as svc:
        raw, serial = Raw(serial=False), Raw(serial=True)
        sides: list[tuple[str, Callable[[list[tuple[str, list[str]]]], Awaitable[None]]]] = [
            ("aiodetach", lambda w: ours(svc, w)),
            ("raw", raw.detach_all),
            ("raw, one call at a time", serial.detach_all),
        ]
        try:
            for r in range(-1, rounds):  # round -1: an untimed warm-up
                for scenario in scenarios:
                    work = [
                        (lab.name, [s.alias or "" for s in specs])
                        for lab, specs in scenario.domains
                    ]
                    k = r % len(sides)
                    for name, run in sides[k:] + sides[:k]:
                        await asyncio.to_thread(restore, admin, scenario)
                        await asyncio.sleep(0.1)  # let QEMU and libvirtd settle
                        c0, d0 = time.process_time(), proc_cpu_ns(pid) if pid else None
                        t0 = time.perf_counter()
                        await run(work)
                        wall = time.perf_counter() - t0
                        c1, d1 = time.process_time(), proc_cpu_ns(pid) if pid else None
                        daemon = d1 - d0 if d0 is not None and d1 is not None else 0.0
                        if r < 0:
                            continue
                        sample = out[scenario.label].setdefault(name, Sample())
                        sample.wall.append(wall)
                        sample.cpu.append((c1 - c0 + daemon) / scenario.size)
                if r >= 0:
                    eprint(f"  round {r + 1}/{rounds} done")
        finally:
            raw.close()
            serial.close()
            admin.close()
    return out


def _spread(xs: list[float]) -> str:
    ys = sorted(xs)
    return f"{fmt_s(ys[0])} to {fmt_s(ys[-1])}"


def rows_for(label: str, sides: dict[str, Sample], rounds: int) -> tuple[list[Row], list[str]]:
    ours_s, raw_s, ser_s = sides["aiodetach"], sides["raw"], sides["raw, one call at a time"]
    wall = median(ours_s.wall) / median(raw_s.wall)
    cpu = median(ours_s.cpu) / median(raw_s.cpu)
    rows = [
        Row(
            f"mass detach, {label}: wall time (median of {rounds} rounds)",
            f"{fmt_s(median(ours_s.wall))} (spread {_spread(ours_s.wall)})",
            f"raw, thread per device: {fmt_s(median(raw_s.wall))} (spread {_spread(raw_s.wall)}); "
            f"raw, one call at a time: {fmt_s(median(ser_s.wall))}",
            fmt_ratio(wall),
            f"≤ {TIME_TARGET:g}x raw",
            met(wall <= TIME_TARGET),
        ),
        Row(
            f"mass detach, {label}: CPU per detach (this process + libvirtd)",
            f"{fmt_s(median(ours_s.cpu))} (spread {_spread(ours_s.cpu)})",
            f"raw: {fmt_s(median(raw_s.cpu))} (spread {_spread(raw_s.cpu)}); "
            f"raw, one call at a time: {fmt_s(median(ser_s.cpu))}",
            fmt_ratio(cpu),
            f"≤ {CPU_TARGET:g}x raw",
            met(cpu <= CPU_TARGET),
        ),
    ]
    lines = [
        f"- {label}, {name}: wall {', '.join(fmt_s(x) for x in s.wall)}; "
        f"CPU/detach {', '.join(fmt_s(x) for x in s.cpu)}"
        for name, s in sides.items()
    ]
    return rows, lines


@contextlib.contextmanager
def domains(big: int, spread: tuple[int, int]) -> Iterator[tuple[Any, list[Any]]]:
    """One domain with ``big`` disks, and ``spread[0]`` domains with ``spread[1]`` each."""
    count, per = spread
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(bench_domain(scsi_specs(big), "mass"))
        many = [
            stack.enter_context(bench_domain(scsi_specs(per), f"mass{i}")) for i in range(count)
        ]
        yield one, many


def main() -> None:
    args = parse_args(__doc__ or "")
    configure_logging(args.structlog_default)
    if args.quick:
        rounds, sizes, spread = 3, [10], (4, 10)
    else:
        rounds, sizes, spread = 7, [20, 60], (10, 20)
    why = unavailable()
    if why is not None:
        finish("Mass detach", [skipped("mass detach", why, f"≤ {TIME_TARGET:g}x raw")], args)
        return
    with domains(max(sizes), spread) as (one, many):
        specs = scsi_specs(max(sizes))
        scenarios = [Scenario(f"{n} disks, 1 domain", [(one, specs[:n])]) for n in sizes]
        count, per = spread
        scenarios.append(
            Scenario(
                f"{count * per} disks, {count} domains",
                [(lab, scsi_specs(per)) for lab in many],
            )
        )
        results = asyncio.run(measure(scenarios, rounds))
    rows: list[Row] = []
    lines = [
        f"{rounds} rounds after one untimed warm-up; sides rotated each round; "
        "disks hot-plugged back (untimed) before each side."
    ]
    for scenario in scenarios:
        more_rows, more_lines = rows_for(scenario.label, results[scenario.label], rounds)
        rows += more_rows
        lines += more_lines
    finish("Mass detach", rows, args, "\n".join(lines))


if __name__ == "__main__":
    main()
