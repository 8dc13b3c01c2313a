"""A lifecycle event of libvirt's test driver through a service (a test helper).

Imported by tests in this directory and by the scripts they run in fresh
interpreters (which put this directory on ``sys.path``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiodetach import DetachService, DeviceEvent
from aiodetach._libvirt import LibvirtBackend

__all__ = ["stopped_event_of_a_destroyed_domain"]


async def _first(events: AsyncIterator[DeviceEvent]) -> DeviceEvent:
    return await anext(events)


async def stopped_event_of_a_destroyed_domain(uri: str) -> tuple[str, str | None]:
    """Destroy the test driver's domain ``test`` and return the event the
    service saw: ``("domain-stopped", "destroyed")`` when events flow."""
    backend = LibvirtBackend(uri)
    async with DetachService(uri, backend=backend) as svc:
        events = svc.events("test")
        first = asyncio.create_task(_first(events))
        await asyncio.sleep(0)
        # Destroy it on the service's own connection, from a worker thread as
        # a blocking call would be.  The test driver's default state is shared
        # by every connection of the process that is open at the time: one an
        # earlier test still holds (a stuck call's, closed when it returns)
        # may have kept "test" destroyed, so start it first if need be.
        conn = backend._connection()

        def destroy() -> None:
            dom = conn.lookupByName("test")
            if not dom.isActive():
                dom.create()
            dom.destroy()

        await asyncio.to_thread(destroy)
        async with asyncio.timeout(5):
            event = await first
    return event.kind, event.detail
