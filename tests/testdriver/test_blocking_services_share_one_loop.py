"""Two blocking facades open at once, on libvirt's test driver: libvirt's
event implementation is process-wide and bound to one running loop, so the
facades share one loop thread, and libvirt's events reach both (each facade
on a loop of its own was refused with EventLoopConflict)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import libvirt

from aiodetach import BlockingDetachService, DeviceEvent

WAIT = 60.0  # bounds waits for conditions against a hang only


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aiodetach-blocking"]


def test_two_facades_at_once_both_get_libvirts_events(test_uri: str) -> None:
    before = len(_loop_threads())
    seen: dict[int, list[DeviceEvent]] = {0: [], 1: []}
    arrived = threading.Condition()

    def watch(n: int, stream: Iterator[DeviceEvent]) -> None:
        for event in stream:
            with arrived:
                seen[n].append(event)
                arrived.notify_all()

    with (
        BlockingDetachService(test_uri, log=False) as first,
        BlockingDetachService(test_uri, log=False) as second,
    ):
        assert len(_loop_threads()) == before + 1  # one loop thread for both
        watchers = [
            threading.Thread(target=watch, args=(n, svc.events("test")))
            for n, svc in enumerate((first, second))
        ]
        for watcher in watchers:
            watcher.start()
        # The test driver's state is shared by the process's open connections:
        # stop "test" on a third one until both streams (watching from their
        # first next(), in their threads) have seen it stop.
        conn = libvirt.open(test_uri)
        try:
            with arrived:
                while not (seen[0] and seen[1]):
                    dom = conn.lookupByName("test")
                    if not dom.isActive():
                        dom.create()
                    dom.destroy()
                    arrived.wait(0.2)
        finally:
            conn.close()
        assert first.pending() == second.pending() == []
        first.close()
        assert not second.closed
        assert second.pending() == []  # the loop outlives the first facade's close
    for watcher in watchers:
        watcher.join(WAIT)
        assert not watcher.is_alive()
    assert {e.kind for e in seen[0] + seen[1]} == {"domain-stopped"}
    assert len(_loop_threads()) == before  # the last close ended the loop thread
