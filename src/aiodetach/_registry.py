"""Every live unplug of one service, keyed by (domain UUID, alias).

The registry is what makes "one unplug per device at a time" true: a
caller either starts the device's unplug or joins the one in flight, and an
unplug leaves the registry in the same step as it ends, so a caller never
joins one that is over by mistake.  The one exception is deliberate: an
unplug that *removed* the device since a caller began (between that caller's
read of the live definition and its join, see :mod:`aiodetach._recent`) is
that caller's outcome too, and :meth:`Unplugs.join` hands it over instead of
starting a second unplug of a device already gone.  The event intake reads
:attr:`Unplugs.by_key` on its hot path.
"""

from __future__ import annotations

import asyncio

from ._connection import Connection
from ._journal import Entry, Journal
from ._recent import Recent
from ._settings import DetachSettings
from ._unplug import Key, Unplug
from ._xml import DeviceRef, Selector, ended_device, names_device
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
        self.removed: Recent[Key, Unplug] = Recent()
        """Unplugs that removed their device since the oldest caller in flight began."""
        conn.on_lost = self._wake_all

    def ticket(self) -> int:
        """Take when a detach begins, give back (:meth:`release`) once it has joined."""
        return self.removed.ticket()

    def release(self, ticket: int) -> None:
        self.removed.release(ticket)

    def mark(self) -> int:
        """Take just before reading the live definition: an unplug that ends
        after it may have removed a device that read still shows."""
        return self.removed.seq

    def removed_since(
        self, uuid: str, ticket: int, selector: Selector, other: DeviceRef | None
    ) -> DeviceRef | None:
        """The device this caller means, if an unplug removed it from the live
        definition since the caller began (so its read did not show it).

        Matched by the device's identity in the ``other`` definition, when the
        caller found it there, else by the caller's selector (alias, disk
        target, MAC).
        """
        for (u, alias), unplug in self.removed.since(ticket):
            if u != uuid:
                continue
            if other is not None and other.identity is not None:
                if other.identity == unplug.identity and other.tag == unplug.tag:
                    return ended_device(unplug.tag, alias, unplug.identity)
            elif names_device(selector, unplug.tag, alias, unplug.identity):
                return ended_device(unplug.tag, alias, unplug.identity)
        return None

    def join(
        self,
        uuid: str,
        domain: str,
        alias: str,
        *,
        ref: DeviceRef | None = None,
        since: int | None = None,
        gone: bool = False,
        run_id: str | None = None,
        device: str | None = None,
    ) -> tuple[Unplug, bool]:
        """The unplug of this device, started if none is in flight; counts the caller in.

        ``since``: the caller's mark (:meth:`mark`) when its read showed the
        device, its ticket when the read did not (``gone``).  An unplug that
        removed the device after it is this caller's outcome, unless (the read
        showed it) another unplug of that alias is already in flight or the
        device read has another identity: then the alias names a device
        attached since.
        """
        key = (uuid, alias)
        unplug = self.by_key.get(key)
        if since is not None and (gone or unplug is None):
            ended = self.removed.get(key, since)
            if ended is not None and (
                gone
                or ref is None
                or ref.identity is None
                or ended.identity is None
                or ref.identity == ended.identity
            ):
                ended.join()
                return ended, True
        joined = unplug is not None
        if unplug is None:
            unplug = Unplug(self, key, domain, run_id=run_id, device=device, ref=ref)
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
        """The unplug ended (its ``result`` is set if it removed the device)."""
        if self.by_key.get(unplug.key) is unplug:
            del self.by_key[unplug.key]
        if unplug.result is not None:
            self.removed.add(unplug.key, unplug)

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
