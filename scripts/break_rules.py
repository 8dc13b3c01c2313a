"""Break each rule of the live unplug on a scratch copy and check the machine's tests notice.

    .venv/bin/python scripts/break_rules.py

For every rule below, a copy of ``src/`` is made with that one rule broken in
``aiodetach/_machine.py`` (a small textual change, the way a slip would break
it), and the machine's own tests (the table and the hypothesis model, no loop
and no threads) run against it.  A rule whose breaking no test notices is
reported, and the script exits 1.  The working tree is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE = Path("aiodetach") / "_machine.py"
TESTS = ["tests/unit/test_unplug_machine.py", "tests/unit/test_unplug_machine_model.py"]

# (rule, text in _machine.py, what it becomes)
BREAKS: list[tuple[str, str, str]] = [
    (
        "2: DEVICE_REMOVAL_FAILED is fatal (not retried)",
        "            self._end(out, End(Ending.FAILED))",
        "            self._queue(out, 0.0)",
    ),
    (
        "2: the window starts when libvirt answered",
        "        self.deadline = now + self.limits.timeout\n        if reconnected:",
        "        self.deadline = self.limits.timeout\n        if reconnected:",
    ),
    (
        "2: look at the live XML before re-sending",
        "        if not read.present:\n            self._conclude(out, Verdict.GONE)",
        "        if False:\n            self._conclude(out, Verdict.GONE)",
    ),
    (
        "2: at most `attempts` requests",
        "            if self.used < self.limits.attempts:",
        "            if self.used <= self.limits.attempts:",
    ),
    (
        "2: a paused domain uses no attempt",
        "            if paused:\n                # A paused guest cannot answer",
        "            if False:\n                # A paused guest cannot answer",
    ),
    (
        "2: a verdict kept while a call is out ends the unplug when it answers",
        "        self.phase = Phase.QUEUED  # nothing is out any more\n        if self._kept(out):",
        "        self.phase = Phase.QUEUED  # nothing is out any more\n        if False:",
    ),
    (
        "2: an early DEVICE_REMOVED is checked against the live XML",
        "        early = verdict is not Verdict.GONE and not (self.handed or event.in_libvirt)",
        "        early = False",
    ),
    (
        '2: "in progress" keeps waiting',
        "        elif outcome in (Outcome.IN_PROGRESS, Outcome.BUSY):",
        "        elif outcome is Outcome.BUSY:",
    ),
    (
        '2: "guest is busy" before anything was accepted uses no attempt',
        "        busy = (outcome is Outcome.BUSY and not self.accepted) or reset_held",
        "        busy = reset_held",
    ),
    (
        "2: the busy back-off grows",
        "        self.busy_refusals += 1",
        "        self.busy_refusals += 0",
    ),
    (
        "3: nothing is sent for nobody",
        "        return self.callers > 0 and not self.decided",
        "        return self.callers >= 0 and not self.decided",
    ),
    (
        "3: an orphan lingers one timeout for a caller",
        "            if self.callers == 0:\n                self._idle(out, Phase.RECHECKING, now)",
        "            if False:\n                self._idle(out, Phase.RECHECKING, now)",
    ),
    (
        "3: the last caller leaving a back-off ends it",
        "        if self.callers == 0 and self.phase is Phase.BACKING_OFF and not self.accepted:",
        "        if False:",
    ),
    (
        "5: the domain stopping ends every wait",
        "                self._end(out, End(Ending.STOPPED, reason=event.reason))",
        "                pass",
    ),
    (
        "6: a close ends the unplug",
        "            self._end(out, End(Ending.CANCELLED))",
        "            pass",
    ),
    (
        "7: after a reconnect the device is looked at (events were lost)",
        "        elif phase is Phase.WAITING and isinstance(event, ConnectionDown):",
        "        elif False:",
    ),
    (
        "7: a request that never reached libvirtd is not an attempt",
        "        unsent = outcome in (Outcome.SKIPPED, Outcome.NOT_SENT, Outcome.JOURNAL_FAILED)",
        "        unsent = outcome in (Outcome.SKIPPED, Outcome.JOURNAL_FAILED)",
    ),
    (
        "7: a maybe-sent request is waited out, not re-sent",
        '            out.append(LoseConnection("call failed: " + answer.reason))\n'
        "            self.accepted = True\n"
        "            self.taken_at = now  # if it reached QEMU, QEMU's hold began about now\n"
        "            self._window(out, now, reconnected=True)",
        '            out.append(LoseConnection("call failed: " + answer.reason))\n'
        "            self.after = Phase.QUEUED\n"
        "            self._reconnect(out)",
    ),
    (
        "2: a request another job held the domain against is not counted",
        "        if unsent or busy or job_held:\n            self.sent -= 1",
        "        if unsent or busy:\n            self.sent -= 1",
    ),
    (
        "2: a reset voids the request: the look finding the device uses no attempt",
        "        if phase is Phase.RECHECKING and self.rebooted:\n"
        "            self._voided(out, now)",
        "        if False:\n            self._voided(out, now)",
    ),
    (
        "2: a voided request stops counting",
        "        self.rebooted = False\n        self.sent -= 1",
        "        self.rebooted = False\n        self.sent -= 0",
    ),
    (
        "2: a reset during a re-check or while paused voids the request too",
        "        if phase not in (Phase.WAITING, Phase.RECHECKING, Phase.PAUSED)"
        " and not suspended:",
        "        if phase is not Phase.WAITING and not suspended:",
    ),
    (
        "2: a reset while the window is suspended (nobody waits, reconnecting) voids it too",
        "            self.accepted and back in (Phase.WAITING, Phase.RECHECKING)",
        "            False",
    ),
    (
        "2: a guest reset while paused is looked at a moment after it resumes",
        "(self._settle_time if self.rebooted else self.limits.timeout)",
        "self.limits.timeout",
    ),
    (
        "2: refusals in QEMU's hold after a void are not taken",
        "            and now - self.held_from < RESET_HOLD_LIMIT",
        "            and now - self.held_from < 0",
    ),
    (
        "2: QEMU's hold counts from a request refused \"in progress\" (another client's)",
        "            self.taken_at = now  # the pending one was taken by now: a reset voids it\n",
        "",
    ),
    (
        '5: "not running" reads why before DomainStopped',
        "            self.phase = Phase.STOPPING\n            self._look(out)",
        "            self._end(out, End(Ending.STOPPED, reason=str(self.failure)))",
    ),
    (
        "5: the shutoff reason read says why",
        "            self._end(out, End(Ending.STOPPED, reason=read.reason))",
        '            self._end(out, End(Ending.STOPPED, reason="stopped"))',
    ),
]


def main() -> int:
    source = (ROOT / "src" / MACHINE).read_text()
    survived: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aiodetach-break-") as tmp:
        scratch = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", scratch)
        env = dict(os.environ, PYTHONPATH=str(scratch))
        for rule, text, broken in BREAKS:
            if source.count(text) != 1:
                print(f"?? {rule}: the text to break is not in _machine.py once", flush=True)
                survived.append(rule)
                continue
            (scratch / MACHINE).write_text(source.replace(text, broken))
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            caught = proc.returncode != 0
            print(f"{'caught ' if caught else 'MISSED '} rule {rule}", flush=True)
            if not caught:
                survived.append(rule)
        (scratch / MACHINE).write_text(source)
    print(f"{len(BREAKS) - len(survived)} of {len(BREAKS)} broken rules caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
