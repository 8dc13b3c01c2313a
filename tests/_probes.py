"""Helpers shared by tests in several directories."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodetach


class LoopLag:
    """The worst oversleep of a task that sleeps ``tick`` seconds in a loop."""

    def __init__(self) -> None:
        self.worst = 0.0


@asynccontextmanager
async def loop_lag(tick: float = 0.005) -> AsyncIterator[LoopLag]:
    """Measure how long the event loop was kept from running, while inside."""
    lag = LoopLag()
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(tick)
            lag.worst = max(lag.worst, loop.time() - t - tick)

    task = asyncio.create_task(ticker())
    try:
        yield lag
    finally:
        stop.set()
        await task


async def until(predicate: Callable[[], bool], limit: float, what: str) -> float:
    """Poll ``predicate`` on the loop; return the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > limit:
            raise AssertionError(f"timed out after {limit:g} s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - started


def info_and_up(entries: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in entries if e.get("log_level") in {"info", "warning", "error", "critical"}]


def check_no_domain_xml(entries: list[MutableMapping[str, Any]]) -> None:
    for entry in info_and_up(entries):
        for key, value in entry.items():
            text = str(value)
            assert "<domain" not in text, (key, entry)
            assert "<devices" not in text, (key, entry)
            assert len(text) < 1000, (key, entry)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must import the same aiodetach as
    this test: the source tree in development, the installed wheel when the
    wheel check runs the tests against it (a path computed from the test file
    would pick the checkout in both cases)."""
    here = str(Path(aiodetach.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


_SLOW_STEP = re.compile(r"^Executing <.*> took \d+\.\d+ seconds\n", re.MULTILINE)


def without_slow_steps(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``done`` without asyncio's own debug-mode warnings of a loop step over
    0.1 s ("Executing <Task …> took 0.25 seconds"): the children run with
    ``-X dev``, and a loaded machine makes such steps.  They are Python's
    output, not aiodetach's, which tests of a silent library look at."""
    done.stderr = _SLOW_STEP.sub("", done.stderr)
    return done


def fresh_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter in development mode (asyncio's debug
    checks on), for what can only happen once per process: libvirt's event
    implementation is registered once, and a loop bridge cannot be unregistered.
    Exits 0, else the assertion shows its stderr."""
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return without_slow_steps(done)
