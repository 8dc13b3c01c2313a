"""The journal's cost per detach: the same detaches with and without ``journal=``.

What is timed
    One ``detach()`` call after another (live only), each of a device the
    fake guest releases during the request (``GuestUnplug.now()``), so the time is
    aiodetach's own work plus, with a journal, its two writes: the request's
    row, committed before the request goes to libvirt (in the request's worker
    thread, on its path), and the outcome (queued to the journal's thread,
    off the path).  Three services in the same run, rounds interleaved:
    no journal, ``journal_sync="normal"`` (WAL commit, no fsync) and
    ``journal_sync="full"`` (the default: fsync per request row).  The
    journal file is in the system's temporary directory.

:class:`aiodetach.testing.FakeHypervisor` is a fake: with real libvirt the
detach itself costs tens of milliseconds (SCSI on an OS-less QEMU: ~57 ms,
see the overhead row), and the journal's absolute cost is added to that.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, configure_logging, eprint, finish, fmt_s, median, parse_args
from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor, GuestUnplug


async def _round(journal: Path | None, sync: str, n: int, tag: str) -> list[float]:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    for i in range(n):
        vm.add_disk(f"vd{i}", alias=f"ua-{tag}-{i}", unplug=GuestUnplug.now())
    settings = DetachSettings(journal_sync=sync)  # type: ignore[arg-type]
    times: list[float] = []
    async with DetachService(backend=fake, settings=settings, journal=journal, log=False) as svc:
        for i in range(n):
            t0 = time.perf_counter()
            await svc.detach("vm", alias=f"ua-{tag}-{i}", persistent=False)
            times.append(time.perf_counter() - t0)
    return times


async def main_async(quick: bool) -> tuple[list[Row], str]:
    n, rounds = (30, 2) if quick else (200, 5)
    samples: dict[str, list[float]] = {"none": [], "normal": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="aiodetach-bench-journal-") as tmp:
        for r in range(rounds):
            for kind in samples:
                path = None if kind == "none" else Path(tmp) / f"{kind}-{r}.db"
                sync = "full" if kind == "none" else kind
                samples[kind] += await _round(path, sync, n, f"{kind}{r}")
    base = median(samples["none"])
    rows = []
    for kind, label in (("normal", 'journal_sync="normal"'), ("full", 'journal_sync="full"')):
        med = median(samples[kind])
        rows.append(
            Row(
                f"journal cost per detach, {label} (fake hypervisor, live only)",
                f"{fmt_s(med)} (+{fmt_s(med - base)})",
                f"no journal: {fmt_s(base)}",
                f"+{fmt_s(med - base)}",
                "—",
                "n/a",
                f"n={len(samples[kind])}",
            )
        )
    details = (
        f"{n} detaches x {rounds} rounds per variant, interleaved; medians of per-call times; "
        f"temp dir {tempfile.gettempdir()} on {os.uname().sysname}"
    )
    eprint(details)
    return rows, details


def main() -> int:
    args = parse_args(__doc__ or "")
    configure_logging(args.structlog_default)
    rows, details = asyncio.run(main_async(args.quick))
    finish("Journal cost", rows, args, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
