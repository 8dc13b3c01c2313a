"""The lab reads its guests' serial consoles for marker lines (a test
harness, not the library): a marker counts only as a line of its own, even
when the kernel's log, on the same console, cuts into it.

Skipped where the lab is not installed (CI's wheel stages)."""

from __future__ import annotations

from pathlib import Path

import pytest

guest = pytest.importorskip("aiodetach_lab.guest")

MARKER = "AIODETACH-GUEST-READY"


@pytest.mark.parametrize(
    ("console", "found"),
    [
        (b"AIODETACH-GUEST-READY\n", True),
        (b"AIODETACH-GUEST-READY 32\n", True),
        (b"AIODETACH-GUEST-READY\r\n", True),
        # A kernel line between the marker and its newline (run 2 of the
        # five runs, stop 22: the guest waited out its 120 s boot timeout).
        (b"AIODETACH-GUEST-READY[    2.346054] tsc: Refined TSC clocksource\n\n", True),
        (b"[    0.000000] Kernel command line: console=ttyS0 AIODETACH-GUEST-READY\n", False),
        (b"AIODETACH-GUEST-READYX\n", False),
        (b"echo AIODETACH-GUEST-READY\n", False),
        (b"AIODETACH-GUEST-REA", False),
    ],
)
def test_a_marker_counts_only_as_a_line_of_its_own(
    tmp_path: Path, console: bytes, found: bool
) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"SeaBIOS\n" + console)
    assert guest._LogScanner(log, MARKER).found() is found


def test_a_marker_written_in_pieces_is_found_once_whole(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    scanner = guest._LogScanner(log, MARKER)
    assert not scanner.found()  # no file yet
    log.write_bytes(b"boot\nAIODETACH-GU")
    assert not scanner.found()
    with log.open("ab") as out:
        out.write(b"EST-READY[    2.1] clocksource: Switched\n")
    assert scanner.found()
