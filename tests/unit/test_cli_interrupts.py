"""Ctrl-C and SIGTERM during a command, on the fake hypervisor: the command
closes, says per device what happened, and exits 130 / 143; a second Ctrl-C
exits at once.  In a real pseudo-terminal (what a person sees) and through
pipes (``--json``)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

from pydantic import TypeAdapter

from _probes import child_env
from _pty import Terminal
from aiodetach._cli_json import Output

HELPER = Path(__file__).with_name("_cli_on_fake.py")
# One slot: ua-ok0 ends, ua-never waits for its guest, ua-ok1 never starts.
BATCH = "vm alias=ua-ok0 persistent=false\nvm alias=ua-never\nvm alias=ua-ok1\n"
WAIT = ["--attempts", "2", "--timeout", "30"]


def _waiting(term: Terminal) -> bool:
    return any(re.search(r"vm/ua-never · attempt 1 of 2 · [\d.]+ s left", r) for r in term.lines())


def test_ctrl_c_during_a_detach_says_what_was_done() -> None:
    """The persistent definition was changed and a live request is pending in
    the guest: the screen says so after Ctrl-C, and the exit status is 130."""
    cmd = [sys.executable, str(HELPER), "detach", "vm", "--alias", "ua-never", *WAIT]
    with Terminal(cmd, env=child_env()) as term:
        term.until(_waiting)
        term.interrupt(signal.SIGINT)
        code = term.wait()
    assert code == 130
    shown = term.unwrapped()
    assert "interrupted (SIGINT): closing; press Ctrl-C again to exit at once" in shown
    report = [row for row in shown if row.startswith("vm/ua-never: ")]
    assert report == [
        "vm/ua-never: request outstanding in the guest (it may still remove it); "
        "requests sent 1; persistent definition changed"
    ], shown
    assert shown[-1] == ("interrupted by SIGINT, closed: 1 request outstanding")
    # The display's last frame stays above the report: no row of it left below.
    assert not any("s left" in row for row in shown[shown.index(report[0]) :])


def test_sigterm_during_a_batch_lists_every_device(tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    cmd = [sys.executable, str(HELPER), "detach-many", str(batch), "--concurrency", "1", *WAIT]
    with Terminal(cmd, env=child_env()) as term:
        term.until(_waiting)
        term.interrupt(signal.SIGTERM)
        code = term.wait()
    assert code == 143
    shown = term.unwrapped()
    start = next(i for i, row in enumerate(shown) if row.startswith("vm/ua-ok0: "))
    assert shown[start] == "vm/ua-ok0: removed (live)"
    assert shown[start + 1].startswith("vm/ua-never: request outstanding in the guest")
    assert shown[start + 2] == "vm alias=ua-ok1: not started"
    assert shown[-1] == (
        "interrupted by SIGTERM, closed: 1 removed, 1 request outstanding, 1 not started"
    )


async def _start(*args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(**env),
    )


async def _read_until(proc: asyncio.subprocess.Process, pattern: str) -> str:
    assert proc.stderr is not None
    seen = ""
    while not re.search(pattern, seen):
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, f"the command ended before {pattern!r}: {seen}"
        seen += line
    return seen


async def test_ctrl_c_during_a_batch_with_json_reports_each_device(tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    proc = await _start("detach-many", str(batch), "--concurrency", "1", "--json", *WAIT)
    try:
        await _read_until(proc, r'"alias": "ua-never".*"event": "aiodetach.detach_sent"')
        proc.send_signal(signal.SIGINT)
        out, _err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    objects = [json.loads(line) for line in out.decode().splitlines()]
    for obj in objects:  # every line is one of the documented objects, exactly
        TypeAdapter(Output).validate_python(obj)
    mine = [o for o in objects if o.get("type") in ("interrupted", "interrupted_summary")]
    assert [o["schema_version"] for o in mine] == [1, 1, 1, 1]
    devices, summary = mine[:-1], mine[-1]
    assert [(o["domain"], o["alias"], o["state"]) for o in devices] == [
        ("vm", "ua-ok0", "removed"),
        ("vm", "ua-never", "request_outstanding"),
        ("vm", "ua-ok1", "not_started"),
    ]
    assert [o["persistent_changed"] for o in devices] == [False, True, False]
    assert [o["requests_sent"] for o in devices] == [1, 1, 0]
    assert devices[2]["request"] == {"domain": "vm", "alias": "ua-ok1"}
    assert summary["type"] == "interrupted_summary"
    assert (summary["signal"], summary["exit_code"], summary["devices"]) == ("SIGINT", 130, 3)
    assert summary["states"]["not_started"] == 1


async def test_a_second_ctrl_c_exits_at_once_while_closing() -> None:
    """The close hangs (libvirtd does not answer): the first Ctrl-C waits for
    it, the second ends the process with 130 and no further waiting (no report)."""
    proc = await _start("detach", "vm", "--alias", "ua-never", *WAIT, AIODETACH_FAKE_SLOW_CLOSE="1")
    try:
        await _read_until(proc, r"attempt 1 of 2: live detach request sent")
        proc.send_signal(signal.SIGINT)
        await _read_until(proc, r"press Ctrl-C again to exit at once")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert "interrupted again: exiting now" in err.decode()
    assert out == b""  # the report was not waited for
