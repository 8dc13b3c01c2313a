"""A fake hypervisor whose calls can be held in their worker thread, and the
helpers the interleaving tests share (test_protocol_interleavings.py,
test_callers_cancelled_as_their_unplug_decides.py).

A call is held either before it does anything (``after=False``) or after it
took its answer (``after=True``), so that an event, a close or a
cancellation can land exactly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor, GuestUnplug

ALIAS = "ua-disk1"


@dataclass
class Hold:
    method: str
    nth: int
    after: bool
    when: Callable[..., bool]
    seen: int = 0
    fired: bool = False
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class HoldFake(FakeHypervisor):
    """The public fake, with calls that can be held in their worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.holds: list[Hold] = []
        self._hold_lock = threading.Lock()

    def hold(
        self,
        method: str,
        *,
        nth: int = 1,
        after: bool = False,
        when: Callable[..., bool] = lambda *a, **k: True,
    ) -> Hold:
        h = Hold(method, nth, after, when)
        with self._hold_lock:
            self.holds.append(h)
        return h

    def _maybe_hold(self, method: str, after: bool, *args: Any, **kw: Any) -> None:
        chosen = None
        with self._hold_lock:
            for h in self.holds:
                if h.method == method and h.after == after and not h.fired and h.when(*args, **kw):
                    h.seen += 1
                    if h.seen == h.nth:
                        h.fired = True
                        chosen = h
                        break
        if chosen is not None:
            chosen.entered.set()
            chosen.release.wait(5)

    def lookup(self, ref: str) -> Any:
        self._maybe_hold("lookup", False, ref)
        out = super().lookup(ref)
        self._maybe_hold("lookup", True, ref)
        return out

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        self._maybe_hold("domain_xml", False, uuid, inactive=inactive)
        out = super().domain_xml(uuid, inactive=inactive)
        self._maybe_hold("domain_xml", True, uuid, inactive=inactive)
        return out

    def detach_live(self, uuid: str, alias: str) -> None:
        self._maybe_hold("detach_live", False, uuid, alias)
        super().detach_live(uuid, alias)
        self._maybe_hold("detach_live", True, uuid, alias)

    def release_all(self) -> None:
        for h in self.holds:
            h.release.set()


def live_xml(*a: Any, inactive: bool = False, **k: Any) -> bool:
    return not inactive


async def entered(h: Hold, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not h.entered.is_set():
        if time.monotonic() > deadline:
            pytest.fail(f"{h.method} (after={h.after}) was never held")
        await asyncio.sleep(0.002)


async def until(cond: Callable[[], bool], within: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.002)


def service(
    fake: FakeHypervisor, records: list[Any] | None = None, journal: Path | None = None, **kw: Any
) -> DetachService:
    hooks = [records.append] if records is not None else []
    return DetachService(
        backend=fake, settings=DetachSettings(**kw), log=False, hooks=hooks, journal=journal
    )


async def reap(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


def live_requests(fake: FakeHypervisor, alias: str = ALIAS) -> list[float]:
    return [r.at for r in fake.requests if r.alias == alias]


def n_detach_live(fake: FakeHypervisor) -> int:
    return fake.calls.count("detach_live")


def add_vm(fake: FakeHypervisor, unplug: GuestUnplug, **kw: Any) -> Any:
    vm = fake.add_domain("vm-1", **kw)
    vm.add_disk("vdb", alias=ALIAS, unplug=unplug)
    return vm


LIVE: dict[str, Any] = {"alias": ALIAS, "live": True, "persistent": False}
