"""Event intake: libvirt's callbacks, onto the loop, into the unplugs.

A backend calls `EventIntake` (an [`EventSink`][aiodetach.backend.EventSink])
from whatever thread libvirt runs its callbacks on; anything that arrives off
the loop thread hops onto it with ``call_soon_threadsafe``.  These are not
methods of the service on purpose: the service's public surface is what a
caller may use.

``DEVICE_REMOVED`` on the loop thread is the hot path of a mass detach, so it
is one dict lookup and one ``set_result``, with no log call (even a filtered
structlog call costs as much as the dispatch itself; the unplug logs its
outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._registry import Unplugs
from ._unplug import Verdict

__all__ = ["CLOSED", "DeviceEvent", "EventIntake"]


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A device notification from libvirt, as streamed by `DetachService.events()`."""

    kind: Literal["device-removed", "device-removal-failed", "domain-stopped"]
    domain_uuid: str
    domain_name: str
    alias: str | None
    detail: str | None = None
    timestamp: float = field(default_factory=time.time)


CLOSED: Any = object()
"""Put on every watcher's queue when the service closes."""


class EventIntake:
    """The service's [`EventSink`][aiodetach.backend.EventSink]."""

    def __init__(self, unplugs: Unplugs) -> None:
        self._unplugs = unplugs.by_key
        self._registry = unplugs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.watchers: set[asyncio.Queue[DeviceEvent]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver onto ``loop``, which runs in the calling thread."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(fn, *args)

    # ---------------------------------------------------------- EventSink
    def device_removed(self, uuid: str, name: str, alias: str) -> None:
        if threading.get_ident() != self._loop_thread:
            self._to_loop(self._device_event, Verdict.REMOVED, uuid, name, alias)
            return
        unplug = self._unplugs.get((uuid, alias))
        if unplug is not None:
            unplug.decide(Verdict.REMOVED)
        if self.watchers:
            self.publish(DeviceEvent("device-removed", uuid, name, alias))

    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None:
        self._to_loop(self._device_event, Verdict.FAILED, uuid, name, alias)

    def domain_stopped(self, uuid: str, name: str, reason: str) -> None:
        self._to_loop(self._domain_stopped, uuid, name, reason)

    def domain_resumed(self, uuid: str, name: str) -> None:
        self._to_loop(self._domain_resumed, uuid)

    def domain_rebooted(self, uuid: str, name: str) -> None:
        self._to_loop(self._domain_rebooted, uuid)

    def connection_closed(self, reason: str) -> None:
        self._to_loop(self._registry.connection_lost, reason)

    # ------------------------------------------------------ on the loop
    def _device_event(self, verdict: Verdict, uuid: str, name: str, alias: str) -> None:
        unplug = self._unplugs.get((uuid, alias))
        if unplug is not None:
            unplug.decide(verdict)
        if self.watchers:
            kind: Literal["device-removed", "device-removal-failed"] = (
                "device-removed" if verdict is Verdict.REMOVED else "device-removal-failed"
            )
            self.publish(DeviceEvent(kind, uuid, name, alias))

    def _domain_stopped(self, uuid: str, name: str, reason: str) -> None:
        # A scan, not an index: domains stop rarely, and an index would cost
        # memory for every pending detach.
        for (domain_uuid, _alias), unplug in list(self._unplugs.items()):
            if domain_uuid == uuid:
                unplug.decide(("stopped", reason))  # ends it: off the registry
        self.publish(DeviceEvent("domain-stopped", uuid, name, None, detail=reason))

    def _domain_resumed(self, uuid: str) -> None:
        # Wakes the unplugs waiting out a pause; one inside an attempt
        # re-arms its wait and carries on.
        for (domain_uuid, _alias), unplug in list(self._unplugs.items()):
            if domain_uuid == uuid:
                unplug.wake()

    def _domain_rebooted(self, uuid: str) -> None:
        # A reset voids a pending native-PCIe unplug: each unplug of the
        # domain looks again shortly (and sends again if the device stayed).
        for (domain_uuid, _alias), unplug in list(self._unplugs.items()):
            if domain_uuid == uuid:
                unplug.guest_reset()

    def publish(self, event: DeviceEvent) -> None:
        for queue in self.watchers:
            queue.put_nowait(event)
