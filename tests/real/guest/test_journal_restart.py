"""An agent **process** killed mid-unplug, and the next one, on a booted guest.

q35 with native PCIe hotplug: the guest takes ~6.3 s to release a virtio
disk (the 5 s attention-button window), so a request sent by a process that
is SIGKILLed one second later is still pending when the next process asks
for the same device.  Requests are counted in a file each agent appends to
before calling libvirt (see ``tests/real/_journal_agent.py``), and the guest's own
pciehp log says how many button presses it saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _probes import child_env
from aiodetach_lab.requests import sends_in

from ._support import Guest, button_presses, cancels, guest, virtio_disk

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

AGENT = Path(__file__).resolve().parents[1] / "_journal_agent.py"


@pytest.fixture(scope="module")
def native(libvirtd: str) -> Iterator[Guest]:
    disks = [virtio_disk(f"vd{c}", f"ua-disk{i}") for i, c in enumerate("bcd", 1)]
    with guest(
        libvirtd, machine="q35", native_pcie_hotplug=True, disks=disks, kernel_log=True
    ) as g:
        yield g


def _agent(g: Guest, alias: str, log: Path, journal: Path | None, *extra: str) -> list[str]:
    cmd = [sys.executable, str(AGENT), g.uri, g.name, alias, "--requests-log", str(log)]
    if journal is not None:
        cmd += ["--journal", str(journal)]
    return cmd + list(extra)


def _start_and_kill(g: Guest, alias: str, log: Path, journal: Path | None) -> float:
    """Start an agent, SIGKILL it 1 s after its request went out; the request's time."""
    first = subprocess.Popen(
        _agent(g, alias, log, journal), env=child_env(), stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not sends_in(log):
        assert first.poll() is None, "the first agent ended before sending"
        assert time.monotonic() < deadline, "the first agent sent nothing"
        time.sleep(0.02)
    sent_at = float(sends_in(log)[0][3])
    time.sleep(max(sent_at + 1.0 - time.time(), 0))
    first.kill()
    assert first.wait(30) == -9
    return sent_at


def _run(cmd: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(
        cmd, env=child_env(), capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_killed_agent_with_journal_then_the_next_one_joins(native: Guest, tmp_path: Path) -> None:
    offset = len(native.serial_text())
    log, journal = tmp_path / "requests.log", tmp_path / "journal.db"
    sent_at = _start_and_kill(native, "ua-disk1", log, journal)
    started = time.time()
    opened, result = _run(_agent(native, "ua-disk1", log, journal))
    finished = time.time()

    assert [r["outcome"] for r in opened["recovered"]] == ["pending"]
    assert len(opened["pending"]) == 1
    assert result["ok"], result
    assert (result["resumed"], result["joined"], result["attempts"]) == (True, True, 1)
    assert result["confirmed_by"] == "event"
    assert len(sends_in(log)) == 1, log.read_text()  # the second process sent nothing
    assert not native.has_alias("ua-disk1")
    text = native.serial_text()[offset:]
    assert (button_presses(text), cancels(text)) == (1, 0), text
    print(
        f"\njournal: second agent started {started - sent_at:.2f} s after the request, "
        f"result {finished - sent_at:.2f} s after it (its own call {result['elapsed']:.2f} s); "
        f"device_del sent 1"
    )


def test_killed_agent_without_journal_sends_again(native: Guest, tmp_path: Path) -> None:
    """The baseline: without a journal the second process knows nothing and sends."""
    offset = len(native.serial_text())
    log = tmp_path / "requests.log"
    _start_and_kill(native, "ua-disk2", log, None)
    _opened, result = _run(_agent(native, "ua-disk2", log, None))
    sends = sends_in(log)
    assert len(sends) == 2, log.read_text()
    assert sends[0][1] != sends[1][1], "one request per process"
    assert result["ok"], result
    assert not result["resumed"]
    text = native.serial_text()[offset:]
    refused = [line for line in log.read_text().splitlines() if line.startswith("refused ")]
    print(
        f"\nno journal: device_del sent {len(sends)}; refused: {refused}; "
        f"presses {button_presses(text)}, cancels {cancels(text)}"
    )


def test_guest_finishes_while_no_agent_runs(native: Guest, tmp_path: Path) -> None:
    log, journal = tmp_path / "requests.log", tmp_path / "journal.db"
    _start_and_kill(native, "ua-disk3", log, journal)
    deadline = time.monotonic() + 60
    while native.has_alias("ua-disk3"):
        assert time.monotonic() < deadline, "the guest never released the disk"
        time.sleep(0.2)
    [opened] = _run(_agent(native, "ua-disk3", log, journal, "--recover-only"))
    [found] = opened["recovered"]
    assert (found["alias"], found["outcome"], found["confirmed_by"]) == (
        "ua-disk3",
        "removed",
        "xml",
    )
    assert opened["pending"] == []
    assert len(sends_in(log)) == 1
