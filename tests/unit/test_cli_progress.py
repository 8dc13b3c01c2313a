"""The CLI's progress output (drawn from hook records) and ``--metrics-port``,
on the fake hypervisor: in a real pseudo-terminal, and through pipes."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import structlog

from _probes import child_env
from _pty import Terminal
from aiodetach._cli import configure_logging

HELPER = Path(__file__).with_name("_cli_on_fake.py")
BATCH = "\n".join(
    [f"vm alias=ua-ok{i} persistent=false" for i in range(6)]
    + ["vm alias=ua-lost persistent=false", "vm alias=ua-never persistent=false"]
)
FAST = ["--attempts", "2", "--timeout", "0.4"]


BAR = re.compile(r"^━+╺?━* (\d+)/(\d+) · ok (\d+) · failed (\d+) · pending (\d+)")
"""The bar's row on the screen (rich's bar, then the counts)."""


def in_terminal(*args: str, columns: int = 80, **env: str) -> Terminal:
    return Terminal([sys.executable, str(HELPER), *args], env=child_env() | env, columns=columns)


def _waiting_row(term: Terminal) -> re.Match[str] | None:
    for row in term.lines():
        found = re.fullmatch(
            r"\s*vm/ua-never · attempt (\d) of 2 · (\d+\.\d) s left · requests (\d)(?: · .*)?",
            row,
        )
        if found:
            return found
    return None


def test_detach_many_progress_moves_while_a_guest_is_waited_for(tmp_path: Path) -> None:
    """Nothing happens for seconds while ua-never's window runs (no record
    comes), and the screen still moves: the time left in the attempt counts
    down; ua-never's row says which attempt of how many, the bar row the counts."""
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    with in_terminal("detach-many", str(batch), "--attempts", "2", "--timeout", "3") as term:
        term.until(lambda t: _waiting_row(t) is not None and _bar(t) is not None)
        first = _waiting_row(term)
        assert first is not None
        term.until(
            lambda t: (
                (row := _waiting_row(t)) is not None
                and row.group(1) == first.group(1)
                and float(row.group(2)) < float(first.group(2))
            )
        )
        bar = _bar(term)
        assert bar is not None
        assert bar.group(2) == "8"  # of 8 devices
        code = term.wait()
    assert code == 12
    shown = term.scrolled()
    # Redrawn in place: the final bar once, no earlier bar or waiting row left behind.
    bars = [row for row in shown if BAR.match(row)]
    assert len(bars) == 1, shown
    assert BAR.match(bars[0]).groups()[:4] == ("8", "8", "7", "1")  # type: ignore[union-attr]
    assert not any("s left" in row for row in shown), shown
    # Steps worth an eye, above the display, once each; routine ones only move it.
    joined = "\n".join(shown)
    assert joined.count("[vm/ua-lost] the live XML shows the device gone") == 1
    assert joined.count("[vm/ua-never] gave up: the device is still attached after 2") == 1
    assert "live detach request sent" not in joined
    assert "ok     vm alias=ua-ok0: 1 request(s)" in joined
    assert "7 detached, 1 failed" in joined


def _bar(term: Terminal) -> re.Match[str] | None:
    return next((m for row in term.lines() if (m := BAR.match(row))), None)


def test_progress_fits_a_narrow_terminal(tmp_path: Path) -> None:
    """Every row is cut to the terminal's width (a wrapped row is what left the
    old bar behind on each redraw): at 40 columns the bar's row ends in "…"
    and is still drawn once."""
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    with in_terminal("detach-many", str(batch), *FAST, columns=40) as term:
        code = term.wait()
    assert code == 12
    shown = term.scrolled()
    bars = [row for row in shown if row.startswith("━")]
    assert len(bars) == 1, shown
    assert bars[0].endswith("…"), bars
    assert len(bars[0]) == 40


def test_detach_shows_attempt_and_time_left_on_a_terminal() -> None:
    with in_terminal(
        "detach",
        "vm",
        "--alias",
        "ua-never",
        "--no-persistent",
        "--attempts",
        "2",
        "--timeout",
        "3",
    ) as term:
        term.until(lambda t: (row := _waiting_row(t)) is not None and row.group(1) == "1")
        term.until(lambda t: (row := _waiting_row(t)) is not None and row.group(1) == "2")
        code = term.wait()
    assert code == 7
    shown = term.scrolled()
    # Each step above the display once, in order; the display's row not left behind.
    steps = [row for row in shown if row.startswith("[vm/ua-never]")]
    assert steps == [
        "[vm/ua-never] attempt 1 of 2: live detach request sent",
        "[vm/ua-never] attempt 1 of 2: no DEVICE_REMOVED within 3 s; re-reading the live",
        "[vm/ua-never] attempt 2 of 2: live detach request sent",
        "[vm/ua-never] attempt 2 of 2: no DEVICE_REMOVED within 3 s; re-reading the live",
        "[vm/ua-never] gave up: the device is still attached after 2 request(s)",
    ], shown
    assert [row for row in shown if "s left" in row] == [], shown
    assert any(row.startswith("error: DetachTimeout") for row in shown), shown


def test_without_rich_a_terminal_gets_plain_lines(tmp_path: Path) -> None:
    """rich is the ``cli`` extra: without it the command still runs, and prints
    plain lines (one per step) on a terminal too."""
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    with in_terminal("detach-many", str(batch), *FAST, AIODETACH_FAKE_NO_RICH="1") as term:
        code = term.wait()
    assert code == 12
    assert "\x1b[" not in term.raw.decode()  # no cursor movement: lines only
    shown = term.scrolled()
    assert "[vm/ua-never] attempt 2 of 2: live detach request sent" in shown
    assert "[vm/ua-lost] the live XML shows the device gone (its event was lost)" in shown
    assert shown[-1] == "7 detached, 1 failed"


def test_detach_many_prints_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    proc = subprocess.run(
        [sys.executable, str(HELPER), "detach-many", str(batch), *FAST],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 12, proc.stderr
    assert "\r" not in proc.stderr
    assert "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert "[vm/ua-ok3] attempt 1 of 2: live detach request sent" in lines
    assert "[vm/ua-never] attempt 2 of 2: live detach request sent" in lines
    assert "[vm/ua-lost] the live XML shows the device gone (its event was lost)" in lines
    assert any(
        re.fullmatch(r"\[vm/ua-ok0\] detached in \d\.\d{3} s after 1 request\(s\)", ln)
        for ln in lines
    )
    assert lines[-1] == "7 detached, 1 failed"
    assert len(proc.stdout.splitlines()) == 8


def test_detach_json_progress_is_the_log_events(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(HELPER), "detach", "vm", "--alias", "ua-ok0", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    events = [json.loads(line)["event"] for line in proc.stderr.splitlines()]
    assert events == [
        "aiodetach.persistent_detached",
        "aiodetach.detach_sent",
        "aiodetach.detached",
    ]
    assert json.loads(proc.stdout)["ok"] is True


async def test_detach_many_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        "detach-many",
        str(batch),
        "--attempts",
        "2",
        "--timeout",
        "1.5",
        "--metrics-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    assert proc.stderr is not None
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "the command ended before serving metrics"
            found = re.search(r"serving Prometheus metrics on (http://\S+)", line)
            url = found.group(1) if found else None
        assert url.startswith("http://127.0.0.1:")
        body = ""
        for _ in range(40):  # until ua-never's first request went out
            body = await asyncio.to_thread(_get, url)
            if "aiodetach_requests_total 8.0" in body:
                break
            await asyncio.sleep(0.05)
        assert "aiodetach_requests_total 8.0" in body, body
        pending = re.search(r"^aiodetach_pending_unplugs (\S+)$", body, re.MULTILINE)
        assert pending is not None
        assert 1 <= float(pending.group(1)) <= 8  # ua-never's at least, not yet timed out
        assert "process_cpu_seconds_total" in body  # the process collector too
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 12
    with pytest.raises(urllib.error.URLError):  # the server stopped with the command
        await asyncio.to_thread(_get, url)


async def test_watch_serves_metrics_until_interrupted() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        "watch",
        "--metrics-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    assert proc.stderr is not None
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "the command ended before serving metrics"
            found = re.search(r"serving Prometheus metrics on (http://\S+)", line)
            url = found.group(1) if found else None
        body = await asyncio.to_thread(_get, url)
        assert 'aiodetach_watched_events_total{kind="device-removed"} 0.0' in body
        assert "aiodetach_pending_unplugs 0.0" in body
        proc.send_signal(2)  # Ctrl-C
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130


def test_metrics_port_in_use_is_a_clean_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(HELPER), "watch", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            check=False,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:"), proc.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own localhost URL
        return str(resp.read().decode())


def test_cli_logging_follows_stderr_when_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures structlog once; a stderr replaced afterwards (a test's
    capture, a caller's redirect) gets the lines, and the stream it replaced,
    closed by now, is never written to."""
    configure_logging(as_json=False, verbose=False)
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    structlog.get_logger("aiodetach").warning("aiodetach.first")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("aiodetach").warning("aiodetach.second")
    assert "aiodetach.second" in second.getvalue()
