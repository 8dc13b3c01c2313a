"""The ``aiodetach`` command end to end, on a real libvirtd + QEMU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

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
