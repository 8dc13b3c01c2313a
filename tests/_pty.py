"""Running a command in a real pseudo-terminal (for the CLI's progress tests).

:class:`Terminal` runs a command on a pseudo-terminal of a given size and
feeds what it writes to a terminal emulator (pyte), so a test checks what a
person would *see* (the screen), not the bytes that drew it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable

import pyte


def run_in_pty_cmd(
    cmd: list[str], *, timeout: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal: its exit
    status and everything it wrote (the terminal turns "\\n" into "\\r\\n")."""
    with Terminal(cmd, env=env) as term:
        code = term.wait(timeout)
    return code, term.raw.decode(errors="replace")


class Terminal:
    """``cmd`` on a ``columns`` x ``rows`` pseudo-terminal, its screen emulated."""

    def __init__(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        columns: int = 80,
        rows: int = 24,
    ) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.screen = pyte.Screen(columns, rows)
        self.screen.set_mode(pyte.modes.LNM)  # the terminal's "\n" -> "\r\n"
        self.history = pyte.HistoryScreen(columns, rows, history=10000)
        self.history.set_mode(pyte.modes.LNM)
        self._streams = [pyte.ByteStream(self.screen), pyte.ByteStream(self.history)]
        self.raw = b""
        # The size is the pty's alone: a COLUMNS/LINES inherited from the test
        # runner (pytest-xdist's workers set 80x24) would override it.
        env = {k: v for k, v in (os.environ if env is None else env).items()}
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        self._eof = False

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.master)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def lines(self) -> list[str]:
        """The screen now: its rows, trailing blanks cut, blank rows at the end left out."""
        rows = [row.rstrip() for row in self.screen.display]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def scrolled(self) -> list[str]:
        """Every row ever shown: what scrolled off the top, then the screen."""
        top = [
            "".join(line[x].data for x in range(self.history.columns)).rstrip()
            for line in self.history.history.top
        ]
        rows = [row.rstrip() for row in self.history.display]
        while rows and not rows[-1]:
            rows.pop()
        return top + rows

    def unwrapped(self) -> list[str]:
        """:meth:`scrolled` with each row the terminal wrapped (a full row
        followed by its rest) joined again: the lines as written."""
        out: list[str] = []
        full = False
        for row in self.scrolled():
            if full and out:
                out[-1] += row
            else:
                out.append(row)
            full = len(row) == self.history.columns
        return out

    def written(self) -> list[str]:
        """The lines written, control sequences left out: for plain lines
        (a report printed after the display stopped) whose wrapping on the
        screen would split them."""
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.raw.decode(errors="replace"))
        # A lone "\r" returns to the row's start: what follows it is what shows.
        return [line.rpartition("\r")[2] for line in text.replace("\r\n", "\n").split("\n")]

    def _pump(self, wait: float) -> None:
        if self._eof:
            time.sleep(min(wait, 0.05))
            return
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self._eof = True
            return
        self.raw += data
        for stream in self._streams:
            stream.feed(data)

    def until(self, check: Callable[[Terminal], bool], timeout: float = 60) -> None:
        """Read until ``check(self)`` holds (AssertionError with the screen if never)."""
        deadline = time.monotonic() + timeout
        while not check(self):
            if time.monotonic() > deadline or (self._eof and self.proc.poll() is not None):
                raise AssertionError("never seen; the screen:\n" + "\n".join(self.lines()))
            self._pump(0.1)

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        """Read to the end; the exit status."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            self._pump(0.2)
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
