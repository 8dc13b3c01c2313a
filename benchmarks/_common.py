"""Shared helpers for the benchmarks: options, statistics, the results table.

Every benchmark script returns :class:`Row` objects and prints them as a
markdown table; ``benchmarks/run.py`` runs each script in its own process
(``--json FILE``) and prints all rows in one table.  Nothing here asserts a
wall-clock number: targets are compared and reported, never enforced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

URI = os.environ.get("AIODETACH_BENCH_URI", "qemu:///system")
BENCH_PREFIX = f"aiodetach-lab-{os.getpid()}-bench-"
"""Names of the domains the benchmarks create: the lab's prefix and this
process's PID (``_lab.cleanup_leftovers`` run by a concurrent test session
spares domains whose creator is alive), so a crashed run's leftovers are
recognisable.  The benchmarks remove only what they created."""


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    benchmark: str
    aiodetach: str
    comparison: str
    ratio: str
    target: str
    met: str  # "yes", "no", "n/a" or "skipped"
    note: str = ""


def met(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "yes" if ok else "no"


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (fewer items and repetitions)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument(
        "--structlog-default",
        action="store_true",
        help="leave structlog unconfigured (its defaults print every debug line)",
    )
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def configure_logging(default: bool = False) -> None:
    """Log like a production service: warnings and up (to stderr), cached loggers.

    structlog's *unconfigured* default prints every debug line to stdout,
    which no service runs with; ``default=True`` keeps it for comparison.
    """
    if default:
        return
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def finish(title: str, rows: Sequence[Row], args: argparse.Namespace, details: str = "") -> None:
    print(f"\n## {title}\n")
    if details:
        print(details.rstrip() + "\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


def table(rows: Sequence[Row]) -> str:
    head = ["benchmark", "aiodetach", "comparison(s)", "ratio", "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.benchmark, r.aiodetach, r.comparison, r.ratio, r.target, r.met]
        if r.note:
            cells[0] = f"{r.benchmark} ({r.note})"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fmt_s(seconds: float) -> str:
    """A duration with a unit that keeps 3 significant digits."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.3g} µs"
    return f"{seconds * 1e9:.3g} ns"


def fmt_ratio(value: float) -> str:
    return f"{value:.3g}x"


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime of another process from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_ns(pid: int) -> float | None:
    """On-CPU seconds of every thread of another process, from schedstat (ns precision)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # thread exited meanwhile
    return total / 1e9


SYSTEM_DAEMON_PIDFILE = "/run/libvirtd.pid"


def daemon_pid() -> int | None:
    """The libvirtd serving ``qemu:///system``, from its pid file.

    Not the first process named ``libvirtd``: the test suite runs private
    daemons (``tests/real/private``) on the same machine, and measuring one of
    those would count nothing of the benchmark, or someone else's load.
    """
    try:
        with open(SYSTEM_DAEMON_PIDFILE) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def self_cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    return time.process_time()


@contextmanager
def stopwatch(into: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        into.append(time.perf_counter() - start)


def skipped(benchmark: str, reason: str, target: str) -> Row:
    return Row(benchmark, "—", "—", "—", target, "skipped", reason)


def eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def repeat(n: int, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(n)]
