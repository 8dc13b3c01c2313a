"""Mutation testing of the pure protocol machine and the planner: do the tests bite?

    python benchmarks/mutation.py                 # 2 workers; about 6 min with 3
    python benchmarks/mutation.py --max-children 4 --json out.json --keep /tmp/mut

mutmut (``pip install mutmut``; configured in pyproject.toml, ``[tool.mutmut]``)
makes every small change it knows to ``src/aiodetach/_machine.py`` and
``src/aiodetach/_rules.py`` (an operator, a comparison, a constant, an
argument, a ``not`` dropped...) and runs the tests that reach the changed
function against each.  A mutant that no test notices *survived*.  This
script runs it on a scratch copy of the project (the working tree is never
touched, and mutmut's cache does not go stale), prints a markdown table of
mutants killed and survived per module, then every survivor with its diff:
those listed in :data:`EQUIVALENT` below with why no test can notice them
(they cannot change behaviour), the rest flagged as unexplained.

Not part of the default benchmark run (``benchmarks/run.py``) nor of CI: it
takes minutes.  Exit status 1 when a module's killed share is under 90 % or
a survivor is unexplained.  See docs/development.md, "Proof that the tests bite".
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["_machine.py", "_rules.py"]
TARGET = 0.90
COPIED = ["src", "tests", "lab", "pyproject.toml"]

# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code), grouped.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests"}
STATUS |= {code: "timeout" for code in (36, 24, -24, 152, 255)}

# Why a surviving mutant cannot change what the machine does (docs/development.md).
_FALSY = "only ever tested for truth, where None is False"
_SET_FIRST = (
    "assigned on every path before it is first read (or, ``early``, read only with a verdict)"
)
_WAIT_ID = "a wait's token only has to be new (checked by every row), and it still is"
_WAIT_ID_LOOK = (
    "the token goes back to that of the look before it, which armed no wait; every "
    "wait armed afterwards still gets a new token"
)
_AFTER_END = "nothing is read after the end: handle() returns at once in DONE"
_NOW_UNUSED = "``now`` is read only to compute a deadline, which this path does not"
_NOW_CALLERS = (
    "``now`` is read by ``_queue`` only with no caller left; here one is back (IDLE, BACKING_OFF "
    "and ``begin`` all have a caller)"
)
_RECONNECTING_NO_SETTLE = "on this path the phase is RECONNECTING, so nothing is settled or output"
_UNREACHABLE = "only waiting phases are entered (``pragma: no cover``)"
_PHASE_SET = "every branch after it sets the phase before anything reads it"
_BUSY_AFTER_ACCEPTED = (
    "``busy_since`` is read only by a back-off, which needs nothing accepted; this is after SENT"
)
_EARLY_WITHOUT_VERDICT = "``early`` is read only while a verdict is kept, and it is cleared here"
_COUNTING_NEVER_QUEUED = (
    "only ``_queue`` reads the result, and a verdict that counts never waits for it: it ends "
    "the unplug where it lands or when the call out answers (``_kept``)"
)
_GO_BACK_NO_VERDICT = (
    "settling with no verdict does nothing, and where the phase is not the one gone back to no "
    "verdict is kept (``_queue`` settles its own; after a request, events count and end it)"
)
_READ_FAILED_ENDS = "both branches after it end the unplug, which clears ``reading``"

EQUIVALENT: dict[tuple[str, str, str], str] = {
    # (function, line before, line after): why no behaviour can change.
    ("UnplugMachine.__init__", "self.reading = False", "self.reading = None"): _FALSY,
    ("UnplugMachine.__init__", "self.handed = False", "self.handed = None"): _FALSY,
    ("UnplugMachine.__init__", "self.deadline = 0.0", "self.deadline = None"): _SET_FIRST,
    ("UnplugMachine.__init__", "self.deadline = 0.0", "self.deadline = 1.0"): _SET_FIRST,
    ("UnplugMachine.__init__", "self.token = 0", "self.token = 1"): _WAIT_ID,
    ("UnplugMachine.__init__", "self.after = Phase.QUEUED", "self.after = None"): _SET_FIRST,
    (
        "UnplugMachine.__init__",
        "self.resume: Phase | None = None",
        'self.resume: Phase | None = ""',
    ): _SET_FIRST,
    ("UnplugMachine.__init__", "self.early = False", "self.early = None"): _FALSY,
    ("UnplugMachine.__init__", "self.early = False", "self.early = True"): _SET_FIRST,
    (
        "UnplugMachine.__init__",
        "self.failure: object = None",
        'self.failure: object = ""',
    ): _SET_FIRST,
    ("UnplugMachine._answered", "self.phase = Phase.QUEUED", "self.phase = None"): _PHASE_SET,
    (
        "UnplugMachine._answered",
        "self.busy_since = None",
        'self.busy_since = ""',
    ): _BUSY_AFTER_ACCEPTED,
    (
        "UnplugMachine._back_off",
        "self._enter(out, Phase.BACKING_OFF, now)",
        "self._enter(out, Phase.BACKING_OFF, None)",
    ): _NOW_UNUSED,
    ("UnplugMachine._back_off", "self._settle(out, now)", "self._settle(out, None)"): _NOW_UNUSED,
    ("UnplugMachine._end", "self.token += 1", "self.token = 1"): _AFTER_END,
    ("UnplugMachine._end", "self.token += 1", "self.token -= 1"): _AFTER_END,
    ("UnplugMachine._end", "self.token += 1", "self.token += 2"): _AFTER_END,
    ("UnplugMachine._end", "self.reading = False", "self.reading = None"): _FALSY,
    ("UnplugMachine._end", "self.reading = False", "self.reading = True"): _AFTER_END,
    (
        "UnplugMachine._enter",
        "raise AssertionError(phase)",
        "raise AssertionError(None)",
    ): _UNREACHABLE,
    ("UnplugMachine._enter", "self.token += 1", "self.token += 2"): _WAIT_ID,
    ("UnplugMachine._event", "self._settle(out, now)", "self._settle(out, None)"): _NOW_UNUSED,
    ("UnplugMachine._go_back", "self.token += 1", "self.token -= 1"): _WAIT_ID_LOOK,
    ("UnplugMachine._go_back", "self.token += 1", "self.token += 2"): _WAIT_ID,
    (
        "UnplugMachine._go_back",
        "self._enter(out, after, now)",
        "self._enter(out, after, None)",
    ): _NOW_UNUSED,
    (
        "UnplugMachine._go_back",
        "if self.verdict is not None and self.phase is after:",
        "if self.verdict is not None or self.phase is after:",
    ): _GO_BACK_NO_VERDICT,
    ("UnplugMachine._go_back", "self._settle(out, now)", "self._settle(out, None)"): _NOW_UNUSED,
    (
        "UnplugMachine._idle",
        "self._enter(out, Phase.IDLE, now)",
        "self._enter(out, Phase.IDLE, None)",
    ): _NOW_UNUSED,
    (
        "UnplugMachine._woken",
        "elif self.reading and phase in (Phase.PAUSED, Phase.RECHECKING):",
        "elif self.reading or phase in (Phase.PAUSED, Phase.RECHECKING):",
    ): (
        "a RECHECKING unplug is always reading and a PAUSED one not reading is taken by the "
        "branch before; a read out in another phase marked 'again' is read as any read out "
        "(only a state read in PAUSED or RECHECKING looks at the mark)"
    ),
    ("UnplugMachine._joined", "self.token += 1", "self.token += 2"): _WAIT_ID,
    ("UnplugMachine._left", "self.token += 1", "self.token += 2"): _WAIT_ID,
    ("UnplugMachine._look", "self.token += 1", "self.token += 2"): _WAIT_ID,
    (
        "UnplugMachine._queue",
        "if self._settle(out, now):",
        "if self._settle(out, None):",
    ): _NOW_UNUSED,
    ("UnplugMachine._reconnect", "self.token += 1", "self.token -= 1"): _WAIT_ID_LOOK,
    ("UnplugMachine._reconnect", "self.token += 1", "self.token += 2"): _WAIT_ID,
    ("UnplugMachine._resume_idle", "self._queue(out, now)", "self._queue(out, None)"): _NOW_CALLERS,
    (
        "UnplugMachine._settle",
        "self.verdict, self.early = None, False",
        "self.verdict, self.early = None, True",
    ): _EARLY_WITHOUT_VERDICT,
    (
        "UnplugMachine._settle",
        "self.failure, self.verdict, self.early = verdict, None, False",
        "self.failure, self.verdict, self.early = verdict, None, True",
    ): _EARLY_WITHOUT_VERDICT,
    ("UnplugMachine._settle", "return True", "return False"): _COUNTING_NEVER_QUEUED,
    (
        "UnplugMachine._settle_early",
        "self._settle(out, now)",
        "self._settle(out, None)",
    ): _NOW_UNUSED,
    ("UnplugMachine._state_read", "self.reading = False", "self.reading = None"): _FALSY,
    (
        "UnplugMachine._state_read",
        "self._enter(out, Phase.WAITING, now)",
        "self._enter(out, Phase.WAITING, None)",
    ): _NOW_UNUSED,
    ("UnplugMachine._timer", "self._queue(out, now)", "self._queue(out, None)"): _NOW_CALLERS,
    (
        "UnplugMachine._timer",
        "self._resume_idle(out, now)",
        "self._resume_idle(out, None)",
    ): _NOW_CALLERS,
    (
        "UnplugMachine._window",
        "self._enter(out, Phase.WAITING, now)",
        "self._enter(out, Phase.WAITING, None)",
    ): _NOW_UNUSED,
    (
        "UnplugMachine._window",
        "self._settle_early(out, now)",
        "self._settle_early(out, None)",
    ): _NOW_UNUSED,
    (
        "UnplugMachine._window",
        "self._settle_early(out, now)",
        "self._settle_early(None, now)",
    ): _RECONNECTING_NO_SETTLE,
    ("UnplugMachine._xml_read", "self.reading = False", "self.reading = None"): _FALSY,
    ("UnplugMachine.begin", "self._queue(out, now)", "self._queue(out, None)"): _NOW_CALLERS,
    (
        "UnplugMachine.handle",
        "self._event(out, event, now)",
        "self._event(out, event, None)",
    ): _NOW_UNUSED,
    (
        "UnplugMachine.handle",
        "self._woken(out, event, now)",
        "self._woken(out, event, None)",
    ): _NOW_UNUSED,
    ("UnplugMachine.handle", "self.reading = False", "self.reading = None"): _FALSY,
    ("UnplugMachine.handle", "self.reading = False", "self.reading = True"): _READ_FAILED_ENDS,
    (
        "UnplugMachine.taken_up",
        "self._enter(out, Phase.WAITING, now)",
        "self._enter(out, Phase.WAITING, None)",
    ): _NOW_UNUSED,
}
"""Survivors that cannot change behaviour, by the line mutmut changed (not by
mutmut's numbering, which moves whenever the module does)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON to FILE")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (mutmut show/browse)")
    args = parser.parse_args()
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="aiodetach-mutation-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            source, target = ROOT / name, work / name
            if source.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
        shutil.rmtree(work / "mutants", ignore_errors=True)
        print(f"# mutmut run in {work} …", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(mutmut), "run", "--max-children", str(args.max_children)],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        took = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 2
        return report(work, mutmut, took, args.json)


def report(work: Path, mutmut: Path, took: float, json_path: str | None) -> int:
    rows: list[dict[str, object]] = []
    survivors: list[tuple[str, str, str, str | None]] = []
    for module in MODULES:
        meta = json.loads((work / "mutants/src/aiodetach" / f"{module}.meta").read_text())
        codes: dict[str, int | None] = meta["exit_code_by_key"]
        counts = Counter(
            STATUS.get(code, "other") if code is not None else "not run" for code in codes.values()
        )
        equivalent = 0
        for name, code in sorted(codes.items(), key=lambda item: _order(item[0])):
            if code != 0:
                continue
            function, before, after = diff(work, mutmut, name)
            why = EQUIVALENT.get((function, before, after))
            equivalent += why is not None
            survivors.append((name, before, after, why))
        total = len(codes)
        killed = counts["killed"]
        row = {
            "module": module,
            "mutants": total,
            "killed": killed,
            "survived": counts["survived"],
            "equivalent": equivalent,
            "unexplained": counts["survived"] - equivalent,
            "timeout": counts["timeout"],
            "no tests": counts["no tests"],
            "other": total - killed - counts["survived"] - counts["timeout"] - counts["no tests"],
            "killed %": round(100 * killed / total, 1) if total else 0.0,
            "killed % of non-equivalent": round(100 * killed / (total - equivalent), 1)
            if total > equivalent
            else 0.0,
        }
        rows.append(row)
    keys = list(rows[0])
    print(f"mutmut: {len(rows)} modules, {took / 60:.1f} min\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    print("\nSurvivors:\n")
    for name, before, after, why in survivors:
        print(f"- `{name}`: `{before}` → `{after}`")
        print(f"  - {'equivalent: ' + why if why else '**UNEXPLAINED**'}")
    if json_path:
        Path(json_path).write_text(json.dumps({"took_s": round(took), "modules": rows}, indent=2))
    bad = [r for r in rows if float(str(r["killed %"])) < 100 * TARGET or r["unexplained"]]
    return 1 if bad else 0


def _order(name: str) -> tuple[str, int]:
    base, _, number = name.rpartition("__mutmut_")
    return base, int(number) if number.isdigit() else 0


def diff(work: Path, mutmut: Path, name: str) -> tuple[str, str, str]:
    """The mutated function (``Class.method``) and its one changed line, before and after."""
    shown = subprocess.run(
        [str(mutmut), "show", name], cwd=work, capture_output=True, text=True, check=False
    ).stdout
    removed = [_code(line) for line in shown.splitlines() if re.match(r"-(?!--)", line)]
    added = [_code(line) for line in shown.splitlines() if re.match(r"\+(?!\+\+)", line)]
    function = name.rpartition("__mutmut_")[0].rpartition(".")[2]
    function = function.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".")
    return function, " ".join(removed), " ".join(added)


def _code(line: str) -> str:
    """A diff line's code, without its marker, indentation and comment."""
    return line[1:].split("  #")[0].strip()


if __name__ == "__main__":
    sys.exit(main())
