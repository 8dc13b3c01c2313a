"""Running a command in a real pseudo-terminal (for the CLI's progress bar tests)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time


def run_in_pty_cmd(
    cmd: list[str], *, timeout: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal: its exit
    status and everything it wrote (the terminal turns "\\n" into "\\r\\n")."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, b"".join(chunks).decode(errors="replace")
