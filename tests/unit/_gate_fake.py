"""A fake hypervisor whose reads can be held after they took their answer.

Shared by the unit tests of shared reads, of reads straddling another
caller's unplug and of closing under held reads (and the ``gf`` fixture in
conftest): a held read returns what the domain was when it was read, so a
caller's view can be made older than the moment it goes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiodetach.backend import BackendError, DomainInfo
from aiodetach.testing import FakeHypervisor

__all__ = ["GateFake", "held", "holding", "settle"]

_R = TypeVar("_R")


class GateFake(FakeHypervisor):
    """Counts reads per kind; can hold the next read of a kind *after* it took
    its answer (so what it returns is older than the moment it is released),
    or fail reads of a kind."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.hold: dict[str, threading.Event] = {}
        self.holding: dict[str, threading.Event] = {
            k: threading.Event() for k in ("lookup", "live", "inactive")
        }
        self.fail: dict[str, BackendError] = {}
        self.after_answer: dict[str, Any] = {}  # kind -> callable run after the answer is taken

    def _gate(self, kind: str) -> None:
        fn = self.after_answer.pop(kind, None)
        if fn is not None:
            fn()
        gate = self.hold.pop(kind, None)
        if gate is not None:
            self.holding[kind].set()
            gate.wait(10)

    def lookup(self, ref: str) -> DomainInfo:
        self.reads["lookup"] += 1
        failure = self.fail.get("lookup")
        if failure is not None:
            self._enter("lookup")
            raise failure
        try:
            info = super().lookup(ref)
        except BackendError:
            self._gate("lookup")
            raise
        self._gate("lookup")
        return info

    def domain_xml(self, uuid: str, *, inactive: bool) -> str:
        kind = "inactive" if inactive else "live"
        self.reads[kind] += 1
        failure = self.fail.get(kind)
        if failure is not None:
            self._enter("domain_xml")
            raise failure
        xml = super().domain_xml(uuid, inactive=inactive)
        self._gate(kind)
        return xml


async def holding(fake: GateFake, kind: str) -> None:
    await asyncio.to_thread(fake.holding[kind].wait, 10)
    fake.holding[kind].clear()


async def held(
    fake: GateFake, kind: str, call: Coroutine[Any, Any, _R]
) -> tuple[asyncio.Task[_R], threading.Event]:
    """Start ``call`` with its next read of ``kind`` held once that read took
    its answer; return its task once held, and the gate that releases it."""
    fake.hold[kind] = gate = threading.Event()
    task = asyncio.create_task(call)
    await holding(fake, kind)
    return task, gate


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)
