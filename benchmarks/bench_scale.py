"""Many devices at once: 100 SCSI disks on 10 real OS-less domains.

    python benchmarks/bench_scale.py [--quick]

Compares, on the same domains (the disks are hot-plugged back between runs):

* **sequential**: ``await svc.detach(...)`` one after another;
* **detach_many, per_domain=1**: all domains in parallel, one detach per
  domain at a time (libvirt's QEMU driver runs a domain's detaches in its job,
  one at a time, so this is "respecting" the serialisation);
* **detach_many, per_domain=4** (the default) and **unbounded** (every
  request at once, ``per_domain=None``, concurrency 100).

SCSI unplugs complete inside QEMU (~50 ms, no guest needed), so the numbers
measure the detach machinery and libvirtd, not a guest.  Also checks that
every disk really left the live XML and that exactly one request per disk
reached libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import libvirt

from _common import URI, Row, configure_logging, eprint, finish, fmt_ratio, fmt_s, met, parse_args
from aiodetach import DetachService, DetachSettings
from aiodetach._libvirt import LibvirtBackend
from aiodetach_lab import domains as _lab
from aiodetach_lab.bench import bench_domain, live_aliases, reattach, scsi_disks, unavailable
from aiodetach_lab.requests import recording_requests


async def one_mode(
    name: str,
    labs: list[_lab.LabDomain],
    run: Callable[[DetachService, list[dict[str, object]]], Awaitable[int]],
    per: int,
) -> tuple[float, int, int]:
    """Detach every disk of ``labs`` with ``run``; return (seconds, ok, requests)."""
    requests: list[dict[str, object]] = [
        {"domain": lab.name, "alias": f"ua-sd{i}", "persistent": False}
        for i in range(per)
        for lab in labs
    ]
    settings = DetachSettings(attempts=3, timeout=10)
    with recording_requests() as log:
        async with DetachService(URI, backend=LibvirtBackend(URI), settings=settings) as svc:
            t0 = time.perf_counter()
            ok = await run(svc, requests)
            took = time.perf_counter() - t0
    sent = len(log.accepted())
    eprint(f"  {name}: {fmt_s(took)} for {len(requests)} disks, {ok} ok, {sent} requests")
    return took, ok, sent


async def sequential(svc: DetachService, requests: list[dict[str, object]]) -> int:
    ok = 0
    for r in requests:
        kwargs = {k: v for k, v in r.items() if k != "domain"}
        await svc.detach(str(r["domain"]), **kwargs)  # type: ignore[arg-type]
        ok += 1
    return ok


def many(concurrency: int, per_domain: int | None) -> Callable[..., Awaitable[int]]:
    async def run(svc: DetachService, requests: list[dict[str, object]]) -> int:
        outcomes = await svc.detach_many(requests, concurrency=concurrency, per_domain=per_domain)
        for o in outcomes:
            if not o.ok:
                eprint(f"    failed: {o.request.describe()}: {o.error}")
        return sum(o.ok for o in outcomes)

    return run


def restore(labs: list[_lab.LabDomain], per: int) -> None:
    conn = libvirt.open(URI)
    try:
        for lab in labs:
            dom = conn.lookupByName(lab.name)
            present = live_aliases(dom)
            for spec in scsi_disks(per):
                if spec.alias not in present:
                    reattach(dom, lab, spec)
    finally:
        conn.close()


def main() -> None:
    args = parse_args(__doc__ or "")
    configure_logging(args.structlog_default)
    domains, per = (4, 5) if args.quick else (10, 10)
    total = domains * per
    target = "concurrent faster than sequential"
    why = unavailable()
    if why:
        finish(
            "Scale", [Row(f"{total} SCSI detaches", "—", "—", "—", target, "skipped", why)], args
        )
        return
    modes: list[tuple[str, Callable[..., Awaitable[int]]]] = [
        ("sequential", sequential),
        ("detach_many per_domain=1", many(total, 1)),
        ("detach_many per_domain=4", many(total, 4)),
        ("detach_many unbounded", many(total, None)),
    ]
    results: dict[str, tuple[float, int, int]] = {}
    with scale_domains(domains, per) as labs:
        for name, run in modes:
            restore(labs, per)
            results[name] = asyncio.run(one_mode(name, labs, run, per))
            conn = libvirt.open(URI)
            try:
                wanted = {spec.alias for spec in scsi_disks(per)}
                left = sum(len(wanted & live_aliases(conn.lookupByName(lab.name))) for lab in labs)
            finally:
                conn.close()
            if left:
                eprint(f"  {name}: {left} disks still attached!")
    seq = results["sequential"][0]
    rows = []
    for name, (took, ok, sent) in results.items():
        rows.append(
            Row(
                f"{total} SCSI detaches on {domains} domains: {name}",
                f"{fmt_s(took)} ({ok}/{total} ok, {sent} requests)",
                f"sequential: {fmt_s(seq)}",
                fmt_ratio(seq / took) + " faster" if name != "sequential" else "1x",
                target if name != "sequential" else "—",
                met(seq / took > 1 and ok == total and sent == total)
                if name != "sequential"
                else "n/a",
            )
        )
    finish("Scale", rows, args, details=f"{total} disks, {per} per domain, OS-less i440fx guests.")


@contextlib.contextmanager
def scale_domains(n: int, per: int) -> Iterator[list[_lab.LabDomain]]:
    """Start ``n`` domains with ``per`` SCSI disks each; remove them after."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(bench_domain(scsi_disks(per), f"scale{i}")) for i in range(n)]


if __name__ == "__main__":
    main()
