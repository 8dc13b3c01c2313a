"""Every live unplug of one service, keyed by (domain UUID, alias).

The registry is what makes "one unplug per device at a time" true: a
caller either starts the device's unplug or joins the one in flight, and an
unplug leaves the registry in the same step as it ends, so a caller never
joins one that is over.  The event intake reads :attr:`Unplugs.by_key` on
its hot path.
"""

from __future__ import annotations

import asyncio

from ._connection import Connection
from ._journal import Entry, Journal
from ._settings import DetachSettings
from ._unplug import Key, Unplug
from .instrumentation._dispatch import Hooks

__all__ = ["Unplugs"]


class Unplugs:
    """Every live unplug of one service, keyed by (domain UUID, alias)."""

    def __init__(
        self,
        conn: Connection,
        settings: DetachSettings,
        hooks: Hooks,
        journal: Journal | None = None,
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.hooks = hooks
        self.journal = journal
        self.by_key: dict[Key, Unplug] = {}
        """Read by the event intake's hot path: one lookup per event."""
        conn.on_lost = self._wake_all

    def join(
        self,
        uuid: str,
        domain: str,
        alias: str,
        *,
        run_id: str | None = None,
        device: str | None = None,
    ) -> tuple[Unplug, bool]:
        """The unplug of this device, started if none is in flight; counts the caller in."""
        key = (uuid, alias)
        unplug = self.by_key.get(key)
        joined = unplug is not None
        if unplug is None:
            unplug = Unplug(self, key, domain, run_id=run_id, device=device)
            self._start(unplug)
            unplug.join()
            unplug.record("started")
        else:
            unplug.join()
        return unplug, joined

    def take_up(self, entry: Entry, run_id: str | None) -> Unplug:
        """An unplug of an earlier run of this process, found unfinished in the
        journal and still attached: a real entry of the registry (``pending()``,
        joins, hooks, metrics see it), with nobody waiting yet."""
        key = (entry.domain_uuid, entry.alias)
        unplug = Unplug(self, key, entry.domain_name, run_id=run_id, device=entry.device)
        unplug.take_up(entry, self.settings.timeout)
        self._start(unplug)
        unplug.record("started")
        unplug.record("recovered")
        return unplug

    def _start(self, unplug: Unplug) -> None:
        self.by_key[unplug.key] = unplug
        unplug.start()  # "ended" pairs with "started", always

    def forget(self, unplug: Unplug) -> None:
        if self.by_key.get(unplug.key) is unplug:
            del self.by_key[unplug.key]

    def connection_lost(self, reason: str) -> None:
        self.conn.lost(reason)  # wakes every unplug through on_lost if it is news

    def _wake_all(self) -> None:
        for unplug in self.by_key.values():
            unplug.wake()  # its driver sees the connection down and waits for it

    async def close(self) -> None:
        unplugs = list(self.by_key.values())
        tasks = [u.task for u in unplugs if u.task is not None]
        for unplug in unplugs:
            unplug.abort()  # a parked one ends here, a driven one when its task is cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
        self.by_key.clear()
