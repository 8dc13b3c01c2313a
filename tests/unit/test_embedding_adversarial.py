"""Embedding promises of the blocking facade attacked through the public API,
on the fake: what may be read from an event loop's thread (the facade's own,
in a hook, or a caller's), and what ends when the facade closes."""

from __future__ import annotations

import asyncio

from aiodetach import BlockingDetachService, DetachSettings
from aiodetach.instrumentation import DetachRecord, Record
from aiodetach.testing import FakeHypervisor, GuestUnplug


def test_what_does_not_block_is_answered_from_an_event_loop_thread(
    fake: FakeHypervisor,
) -> None:
    """``uri``, ``settings`` and ``recovered()`` block nothing: an asyncio
    program holding a facade for its threads (or a hook labelling a metric)
    reads them on a loop's thread without `CalledFromEventLoop`."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.now())
    seen_in_hook: list[str] = []
    holder: list[BlockingDetachService] = []

    def hook(record: Record) -> None:
        if isinstance(record, DetachRecord) and record.kind == "started" and holder:
            seen_in_hook.append(holder[0].uri)

    settings = DetachSettings(attempts=3, timeout=5)
    with BlockingDetachService(backend=fake, hooks=[hook], settings=settings) as svc:
        holder.append(svc)

        async def from_a_loop() -> tuple[str, DetachSettings, int, bool]:
            return svc.uri, svc.settings, len(svc.recovered()), svc.closed

        assert asyncio.run(from_a_loop()) == (fake.uri, settings, 0, False)
        assert svc.detach("vm", alias="ua-disk1").attempts == 1
    assert seen_in_hook == [fake.uri]
