"""The ``aiodetach`` command end to end, on a real libvirtd + QEMU."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import libvirt
import pytest

from _pty import Terminal
from aiodetach import DetachService
from aiodetach_lab import domains as _lab

DISKS = (
    _lab.DiskSpec("sda", "scsi", alias="ua-scsi1"),
    _lab.DiskSpec("sdb", "scsi", alias="ua-scsi2"),
    _lab.DiskSpec("vdb", "virtio", alias="ua-blk1"),
)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiodetach", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def domain(libvirtd: str) -> Iterator[_lab.LabDomain]:
    with _lab.throwaway_domain(libvirtd, disks=DISKS) as dom:
        yield dom


def test_detach_json(libvirtd: str, domain: _lab.LabDomain) -> None:
    proc = cli("detach", domain.name, "--alias", "ua-scsi1", "--uri", libvirtd, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    assert (out["live"], out["persistent"], out["attempts"]) == (True, True, 1)
    assert out["confirmed_by"] == "event"
    # Progress goes to stderr as JSON lines, one per library event.
    events = [json.loads(line)["event"] for line in proc.stderr.splitlines()]
    assert "aiodetach.detach_sent" in events


def test_detach_human_output_and_retries(libvirtd: str, domain: _lab.LabDomain) -> None:
    proc = cli(
        "detach",
        domain.name,
        "--target",
        "vdb",
        "--no-persistent",
        "--attempts",
        "2",
        "--timeout",
        "0.5",
        "--uri",
        libvirtd,
    )
    assert proc.returncode == 7, (proc.stdout, proc.stderr)
    assert "attempt 1 of 2: live detach request sent" in proc.stderr
    assert "attempt 2 of 2: live detach request sent" in proc.stderr
    assert "DetachTimeout" in proc.stderr
    assert "ua-blk1" in proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["--alias", "ua-nope"], 4, "DeviceNotFound"),
        (["--mac", "52:54:00:99:99:99"], 4, "DeviceNotFound"),
        (["--alias", ""], 2, "InvalidRequest"),
    ],
)
def test_detach_errors_have_distinct_exit_codes(
    libvirtd: str, domain: _lab.LabDomain, args: list[str], code: int, error: str
) -> None:
    proc = cli("detach", domain.name, *args, "--uri", libvirtd, "--json")
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    assert out["error"] == error
    assert out["domain"] == domain.name


def test_unknown_domain_exit_code(libvirtd: str) -> None:
    proc = cli("detach", "aiodetach-lab-nope", "--alias", "x", "--uri", libvirtd)
    assert proc.returncode == 3
    assert "DomainNotFound" in proc.stderr


def test_invalid_settings_exit_code(libvirtd: str) -> None:
    proc = cli("detach", "vm", "--alias", "x", "--attempts", "0", "--uri", libvirtd)
    assert proc.returncode == 2
    assert "attempts" in proc.stderr


def test_unreachable_daemon_exit_code() -> None:
    proc = cli("detach", "vm", "--alias", "x", "--uri", "qemu+unix:///system?socket=/nonexistent")
    assert proc.returncode == 9, proc.stderr
    assert "ConnectionLost" in proc.stderr


async def test_watch_streams_events(libvirtd: str, domain: _lab.LabDomain) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiodetach",
        "watch",
        domain.name,
        "--uri",
        libvirtd,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.5)  # let it connect and subscribe
        async with DetachService(libvirtd) as svc:
            await svc.detach(domain.name, alias="ua-scsi2", persistent=False)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        event = json.loads(line)
        assert event["kind"] == "device-removed"
        assert (event["domain"], event["alias"]) == (domain.name, "ua-scsi2")
    finally:
        proc.terminate()
        await proc.wait()


# A CLI run in which any detach call made to libvirt ends the process, loudly.
NO_DETACH = """
import sys
from aiodetach._libvirt import LibvirtBackend
from aiodetach._cli import main

def refuse(*args, **kwargs):
    print("DETACH CALLED", args[1:], file=sys.stderr, flush=True)
    raise SystemExit(99)

LibvirtBackend.detach_live = refuse
LibvirtBackend.detach_config = refuse
sys.exit(main(sys.argv[1:]))
"""


def definitions(uri: str, uuid: str) -> tuple[str, str]:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        return dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()


def test_dry_run_shows_the_plan_and_changes_nothing(libvirtd: str, domain: _lab.LabDomain) -> None:
    before = definitions(libvirtd, domain.uuid)
    runs = [
        ["--alias", "ua-scsi1", "--json"],
        ["--target", "vdb", "--live", "--json"],
        ["--target", "sdb"],
    ]
    shown = []
    for args in runs:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                NO_DETACH,
                "-c",
                libvirtd,
                "detach",
                domain.name,
                *args,
                "--dry-run",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
        assert "DETACH CALLED" not in proc.stderr
        shown.append(proc.stdout)
    scsi1, blk1 = json.loads(shown[0]), json.loads(shown[1])
    assert (scsi1["type"], scsi1["domain_uuid"], scsi1["running"]) == ("dry_run", domain.uuid, True)
    assert scsi1["live"]["alias"] == "ua-scsi1"
    assert "virDomainDetachDeviceAlias('ua-scsi1'" in scsi1["live"]["request"]
    assert "target dev='sda'" in scsi1["persistent"]["xml"].replace('"', "'")
    assert scsi1["live"]["identity"] == scsi1["persistent"]["identity"]
    assert blk1["live"]["alias"] == "ua-blk1"
    assert blk1["persistent"] is None
    assert "ua-scsi2" in shown[2]
    assert "nothing was changed" in shown[2]
    assert definitions(libvirtd, domain.uuid) == before
    # The detach then does what the dry run said.
    done = cli("detach", domain.name, "--alias", "ua-scsi1", "--uri", libvirtd, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["device"] == scsi1["live"]["device"]


def _left(term: Terminal, name: str) -> tuple[int, float] | None:
    """(attempt, seconds left) of the live display's row, if it is on the screen."""
    for row in term.lines():
        found = re.search(
            rf"^{re.escape(name)}/ua-blk1 · attempt (\d) of \d · (\d+\.\d) s left", row
        )
        if found:
            return int(found.group(1)), float(found.group(2))
    return None


def test_progress_moves_while_the_guest_is_waited_for(
    libvirtd: str, domain: _lab.LabDomain
) -> None:
    """An OS-less guest never answers the PCI disk's unplug: on an 80-column
    terminal the display counts the attempt's time down while no record comes,
    moves on to attempt 2, and leaves no old frame behind."""
    cmd = [sys.executable, "-m", "aiodetach", "detach", domain.name, "--target", "vdb"]
    cmd += ["--no-persistent", "--attempts", "2", "--timeout", "4", "--uri", libvirtd]
    with Terminal(cmd, columns=80) as term:
        term.until(lambda t: _left(t, domain.name) is not None)
        first = _left(term, domain.name)
        assert first is not None
        term.until(
            lambda t: (
                (now := _left(t, domain.name)) is not None
                and now[0] == first[0]
                and now[1] < first[1]
            )
        )
        term.until(lambda t: (now := _left(t, domain.name)) is not None and now[0] == 2)
        code = term.wait()
    assert code == 7
    shown = term.scrolled()
    assert not any("s left" in row for row in shown), shown
    sent = f"[{domain.name}/ua-blk1] attempt 2 of 2: live detach request sent"
    assert sent in term.written(), shown  # the row may wrap: the domain's name varies
    assert any(row.startswith("error: DetachTimeout") for row in shown), shown


def test_ctrl_c_reports_the_changed_definition_and_the_pending_request(
    libvirtd: str, domain: _lab.LabDomain
) -> None:
    """Ctrl-C while the guest is waited for: the persistent definition was
    already changed and the request is pending in the guest; the report says
    both, and the definition really is changed."""
    cmd = [sys.executable, "-m", "aiodetach", "detach", domain.name, "--target", "vdb"]
    cmd += ["--attempts", "3", "--timeout", "30", "--uri", libvirtd]
    with Terminal(cmd, columns=80) as term:
        term.until(lambda t: _left(t, domain.name) is not None)
        term.interrupt(signal.SIGINT)
        code = term.wait()
    assert code == 130
    shown = term.scrolled()
    assert any(row.startswith(f"{domain.name}/ua-blk1: request outstanding") for row in shown)
    assert (
        f"{domain.name}/ua-blk1: request outstanding in the guest (it may still remove it); "
        "requests sent 1; persistent definition changed"
    ) in term.written(), shown
    assert shown[-1] == "interrupted by SIGINT, closed: 1 request outstanding", shown
    conn = libvirt.openReadOnly(libvirtd)
    try:
        dom = conn.lookupByName(domain.name)
        assert "ua-blk1" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert "ua-blk1" in dom.XMLDesc(0)  # the guest still holds it
    finally:
        conn.close()


async def test_sigterm_with_json_reports_each_device(libvirtd: str, domain: _lab.LabDomain) -> None:
    batch = f"{domain.name} alias=ua-scsi1\n{domain.name} alias=ua-blk1\n"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiodetach",
        "detach-many",
        "-",
        "--concurrency",
        "1",
        "--attempts",
        "2",
        "--timeout",
        "30",
        "--json",
        "--uri",
        libvirtd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stderr is not None
    try:
        proc.stdin.write(batch.encode())
        proc.stdin.close()
        seen = ""
        while not re.search(r'"alias": "ua-blk1".*"aiodetach.detach_sent"', seen):
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, seen
            seen += line
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 143
    objects = [json.loads(line) for line in out.decode().splitlines()]
    mine = [o for o in objects if o.get("type") in ("interrupted", "interrupted_summary")]
    assert [(o["alias"], o["state"], o["persistent_changed"]) for o in mine[:-1]] == [
        ("ua-scsi1", "removed", True),
        ("ua-blk1", "request_outstanding", True),
    ]
    assert (mine[-1]["signal"], mine[-1]["exit_code"]) == ("SIGTERM", 143)
