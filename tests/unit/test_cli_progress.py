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
from _pty import run_in_pty_cmd
from aiodetach._cli import configure_logging

HELPER = Path(__file__).with_name("_cli_on_fake.py")
BATCH = "\n".join(
    [f"vm alias=ua-ok{i} persistent=false" for i in range(6)]
    + ["vm alias=ua-lost persistent=false", "vm alias=ua-never persistent=false"]
)
FAST = ["--attempts", "2", "--timeout", "0.4"]


def run_in_pty(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run the helper with stdout and stderr on a pseudo-terminal; all it wrote."""
    return run_in_pty_cmd([sys.executable, str(HELPER), *args], timeout=timeout, env=child_env())


def test_detach_many_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(BATCH)
    code, out = run_in_pty("detach-many", str(batch), *FAST)
    assert code == 12, out  # ua-never timed out
    text = out.replace("\r\n", "\n")  # the terminal's newline translation
    # The bar is redrawn in place, and ends full with the final counts.
    assert "\r\x1b[K[" in text
    final = re.findall(r"\[(#*)(-*)\] 8/8  ok 7  failed 1  pending 0  requests (\d+)", text)
    assert final, text
    assert final[-1][1] == ""  # no "-" left
    assert int(final[-1][2]) == 9  # 8 first requests + ua-never's re-send
    # Steps worth an eye are printed above the bar, each on its own line.
    assert "[vm/ua-lost] the live XML shows the device gone (its event was lost)\n" in text
    assert "[vm/ua-never] attempt 2 of 2: no DEVICE_REMOVED within 0.4 s" in text
    assert "[vm/ua-never] gave up: the device is still attached after 2 request(s)\n" in text
    # Routine steps only move the bar.
    assert "live detach request sent" not in text
    # The results, then the summary.
    assert "ok     vm alias=ua-ok0: 1 request(s)" in text
    assert "FAILED vm alias=ua-never: DetachTimeout" in text
    assert "7 detached, 1 failed" in text


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


def test_detach_prints_progress_lines(tmp_path: Path) -> None:
    code, out = run_in_pty("detach", "vm", "--alias", "ua-never", "--no-persistent", *FAST)
    assert code == 7, out
    assert "[vm/ua-never] attempt 1 of 2: live detach request sent" in out
    assert (
        "[vm/ua-never] attempt 1 of 2: no DEVICE_REMOVED within 0.4 s; re-reading the live XML"
        in out
    )
    assert "error: DetachTimeout" in out


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
