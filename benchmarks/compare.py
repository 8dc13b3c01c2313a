"""Compare benchmarks of this tree against another revision, in one run.

    python benchmarks/compare.py --base c89f89e dispatch wakeup memory
    python benchmarks/compare.py --base main --rounds 3 overhead mass

A change to the core is measured against the code before it on the same
machine at the same time: this machine is noisy, and a number from another
day says little.  The base revision is exported (``git archive``) to a
temporary directory; each round runs every named benchmark once per side,
each in its own process with that side's ``src/`` and ``lab/`` first on the
path and that side's own benchmark script (a benchmark may use names the
other side does not have).  The sides alternate which goes first, round by
round, so a drift of the machine's load weighs on both.

Printed: for every row the benchmarks report, each side's median and spread
(min-max over the rounds) of the row's first number, of its ratio column
where it has one, and head / base.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _first_number(text: str) -> float | None:
    """The row's headline: a p99 or a memory held where the row gives one
    (its first number is a p50 or a peak), else its first number."""
    text = text.replace(",", "")
    for label in ("p99 ", "held "):
        at = text.find(label)
        if at >= 0:
            text = text[at + len(label) :]
            break
    found = _NUMBER.search(text)
    return float(found.group()) if found else None


def _export(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _run(side: Path, name: str, out: Path, quick: bool) -> list[dict[str, str]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(side / "src"), str(side / "lab" / "src")])
    cmd = [sys.executable, str(side / "benchmarks" / f"bench_{name}.py"), "--json", str(out)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False, timeout=1200)
    if proc.returncode != 0 or not out.exists():
        print(f"# {side.name}/{name}: exit {proc.returncode}", file=sys.stderr)
        return []
    rows: list[dict[str, str]] = json.loads(out.read_text())
    out.unlink()
    return rows


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    return f"{med:.4g} ({min(values):.4g}-{max(values):.4g})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke size")
    parser.add_argument("names", nargs="+", help="benchmarks, as benchmarks/run.py names them")
    args = parser.parse_args()
    results: dict[tuple[str, str, str], list[float]] = {}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aiodetach-compare-") as tmp:
        base = _export(args.base, Path(tmp) / "base")
        sides = {"base": base, "head": ROOT}
        for r in range(args.rounds):
            turn = ["base", "head"] if r % 2 == 0 else ["head", "base"]
            for name in args.names:
                for label in turn:
                    print(f"# round {r + 1}/{args.rounds}: {name} on {label}", file=sys.stderr)
                    out = Path(tmp) / f"{label}-{name}.json"
                    for row in _run(sides[label], name, out, args.quick):
                        key = row["benchmark"]
                        if key not in order:
                            order.append(key)
                        for column in ("aiodetach", "ratio"):
                            value = _first_number(row.get(column, ""))
                            if value is not None:
                                results.setdefault((key, column, label), []).append(value)
    print(f"| benchmark | column | base ({args.base}) | head | head / base |")
    print("|---|---|---|---|---|")
    for key in order:
        for column in ("aiodetach", "ratio"):
            b = results.get((key, column, "base"), [])
            h = results.get((key, column, "head"), [])
            if not b and not h:
                continue
            rel = (
                f"{statistics.median(h) / statistics.median(b):.3f}"
                if b and h and statistics.median(b)
                else "—"
            )
            print(f"| {key} | {column} | {_spread(b)} | {_spread(h)} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
