"""The CLI's live progress on a terminal, drawn with rich (the ``cli`` extra).

Why rich rather than a ``\\r``-redrawn line: a line longer than the terminal
wraps, and ``\\r`` then only returns to its last row, so every redraw left
the old one behind; rich measures the terminal on each redraw, cuts every
row to its width (``…``), and moves the cursor over all the rows it drew.

Why a ticker: the records only come at steps, and a detach waiting for its
guest has none for seconds, so the display redraws itself four times a second
(elapsed, time left in the attempt) from what `aiodetach._tracking.Tracker`
saw.  It redraws on the event loop (``auto_refresh=False``: no thread of
rich's reads the tracker while a hook changes it), and never more often than
the ticker however many records arrive.
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ._progress import describe, notable
from ._tracking import Call, Tracker
from .instrumentation import Record

__all__ = ["LiveProgress"]

SHOWN = 5
"""In-flight devices listed under a batch's bar (the rest are counted)."""

TICK = 0.25


class LiveProgress:
    """A hook (and a log stream) drawing the live display while a command runs."""

    def __init__(
        self, tracker: Tracker, stream: TextIO, *, total: int, batch: bool, force: bool = False
    ) -> None:
        self._tracker = tracker
        self._total = total
        self._batch = batch
        self._started = time.monotonic()
        self.console = Console(
            file=stream,
            force_terminal=True if force else None,
            highlight=False,
            emoji=False,
            markup=False,
        )
        self._live = Live(
            console=self.console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
            transient=False,
            get_renderable=self.render,
        )
        self._ticker: asyncio.Task[None] | None = None
        self._pending_text = ""

    # ------------------------------------------------------------ lifetime
    async def __aenter__(self) -> LiveProgress:
        self._tracker.notices = self  # an interrupt's notice goes above the display
        self._live.start(refresh=True)
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """The last state drawn, and the cursor below it."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._live.is_started:
            self._live.refresh()
            self._live.stop()
        self._tracker.notices = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._live.refresh()

    # ---------------------------------------------------------------- hook
    def __call__(self, record: Record) -> None:
        if self._batch and not notable(record):
            return
        line = describe(record)
        if line is not None:
            self._print(line)

    def write(self, text: str) -> int:
        """Other stderr lines (the CLI's log lines): above the display."""
        self._pending_text += text
        if "\n" in self._pending_text:
            lines, _, self._pending_text = self._pending_text.rpartition("\n")
            for line in lines.split("\n"):
                self._print(line)
        return len(text)

    def flush(self) -> None:
        self.console.file.flush()

    def _print(self, line: str) -> None:
        # rich redraws its last frame under a printed line: bring it up to date
        # first (a frame from before this record would show a stale state).
        if self._live.is_started:
            self._live.refresh()
        # Whole, above the display: the terminal wraps a long line, rich must
        # not cut it into lines (a JSON log line would no longer parse).
        self.console.print(Text(line), soft_wrap=True)

    # -------------------------------------------------------------- render
    def render(self) -> RenderableType:
        tracker = self._tracker
        now = time.monotonic()
        took = now - self._started
        if not self._batch:
            calls = list(tracker.calls.values())
            if not calls:
                return _row(f"connecting … {took:.1f} s")
            return _row(self._device(calls[-1], now) + f" · {took:.1f} s")
        done, failed, flying = tracker.counts()
        waiting = max(self._total - len(tracker.calls), 0)
        stats = (
            f"{done + failed}/{self._total} · ok {done} · failed {failed} · "
            f"pending {flying} · not started {waiting} · {took:.1f} s"
        )
        head = Table.grid(padding=(0, 1))
        head.add_column(width=20, no_wrap=True)
        head.add_column(no_wrap=True, overflow="ellipsis")
        head.add_row(ProgressBar(total=max(self._total, 1), completed=done + failed), stats)
        rows: list[RenderableType] = [head]
        in_flight = tracker.in_flight()
        for call in in_flight[:SHOWN]:
            rows.append(_row("  " + self._device(call, now)))
        if len(in_flight) > SHOWN:
            rows.append(_row(f"  … and {len(in_flight) - SHOWN} more in flight"))
        return Group(*rows)

    def _device(self, call: Call, now: float) -> str:
        where = f"{call.domain}/{call.alias or '-'}"
        view = self._tracker.unplug_of(call)
        if call.finished:
            return f"{where} {'detached' if call.ok else 'failed'}"
        if view is None:  # looking the device up, or its persistent half
            return where + (" · persistent definition changed" if call.persistent_changed else "")
        text = f"{where} · attempt {view.attempt} of {view.attempts}"
        if view.deadline is not None:
            text += f" · {max(view.deadline - now, 0.0):.1f} s left"
        else:
            text += f" · {view.step.replace('_', ' ')}"
        return text + f" · requests {view.sent}"


def _row(text: str) -> Text:
    return Text(text, no_wrap=True, overflow="ellipsis")
