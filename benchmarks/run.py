"""Run every benchmark, each in its own process, and print one markdown table.

    python benchmarks/run.py            # full run (a few minutes)
    python benchmarks/run.py --quick    # smoke run (CI)
    python benchmarks/run.py dispatch memory   # a subset, by name

Each script's own output (details and table) goes to stderr as it runs; the
combined table is printed to stdout at the end.  Real-QEMU benchmarks report
"skipped" where no libvirtd can be started.  No number is asserted: a missed
target is reported in the "met?" column, the exit status is 0 unless a
benchmark crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, table

HERE = Path(__file__).resolve().parent
# In-process first (no libvirt), then the real-QEMU ones.
BENCHMARKS = [
    "dispatch",
    "wakeup",
    "memory",
    "journal",
    "detection",
    "loop_lag",
    "overhead",
    "scale",
    "mass",
    "seed_bug",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run of every benchmark")
    parser.add_argument("names", nargs="*", help=f"subset to run, of: {' '.join(BENCHMARKS)}")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    names = args.names or BENCHMARKS
    rows: list[Row] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="aiodetach-bench-") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(out)]
            if args.quick:
                cmd.append("--quick")
            print(f"# running {name} …", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            proc = subprocess.run(cmd, stdout=sys.stderr, check=False, timeout=600)
            took = time.monotonic() - t0
            if proc.returncode != 0 or not out.exists():
                failed += 1
                rows.append(
                    Row(f"bench_{name}.py", "—", "—", "—", "—", "error", f"exit {proc.returncode}")
                )
                continue
            rows += [Row(**r) for r in json.loads(out.read_text())]
            print(f"# {name} took {took:.1f} s", file=sys.stderr, flush=True)
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
