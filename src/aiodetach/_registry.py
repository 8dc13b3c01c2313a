"""Every live unplug of one service, keyed by (domain UUID, alias).

The registry is what makes "one unplug per device at a time" true: a
caller either starts the device's unplug or joins the one in flight, and an
unplug leaves the registry in the same step as it ends, so a caller never
joins one that is over by mistake.  The one exception is deliberate: an
unplug that *removed* the device since a caller began (between that caller's
read of the live definition and its join, see `aiodetach._recent`) is
that caller's outcome too, and `Unplugs.join()` hands it over instead of
starting a second unplug of a device already gone.  The event intake reads
`Unplugs.by_key` on its hot path.
"""

from __future__ import annotations

import asyncio
import sys

from ._connection import Connection
from ._deadlines import Deadlines
from ._ending import LiveDone
from ._journal import Entry, Journal
from ._recent import Recent
from ._settings import DetachSettings
from ._unplug import Key, Unplug
from ._xml import DeviceRef, Identity, Selector, ended_device, names_device
from .errors import DetachTimeout
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
        self.loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self.loop)
        """The windows of parked unplugs, on one timer."""
        self.removed: Recent[Key, Unplug] = Recent()
        """Unplugs that removed their device since the oldest caller in flight began."""
        conn.on_lost = self._wake_all

    def ticket(self) -> int:
        """Take when a detach begins, give back (`release()`) once it has joined."""
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
        """The device this caller means, if its read of the live definition no
        longer showed it because an unplug removed it: one that ended since
        the caller began, or one still in flight whose device left the live
        definition before its event reached us (libvirt updates the definition
        first, then emits ``DEVICE_REMOVED``).

        Matched by the device's identity in the ``other`` definition, when the
        caller found it there, else by the caller's selector (alias, disk
        target, MAC, or device XML by identity).  The in-flight unplugs of the
        domain are scanned: this runs only when a read missed the device.
        """
        candidates = [(k[1], u) for k, u in self.removed.since(ticket) if k[0] == uuid]
        candidates += [(k[1], u) for k, u in self.by_key.items() if k[0] == uuid]
        for alias, unplug in candidates:
            identity = unplug.identity
            if other is not None and other.identity is not None:
                if other.identity == identity:
                    return ended_device(unplug.tag, alias, identity)
            elif names_device(selector, unplug.tag, alias, identity):
                return ended_device(unplug.tag, alias, identity)
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

        ``since``: the caller's mark (`mark()`) when its read showed the
        device, its ticket when the read did not (``gone``).  An unplug that
        removed *that* device (the same identity) after it is this caller's
        outcome, when the read did not show the device, when nothing is in
        flight for the alias, or when what is in flight is another device
        attached under the alias since.
        """
        # Interned: libvirt's aliases (scsi0-0-0-1, net0, …) recur in every domain.
        key = (uuid, sys.intern(alias))
        unplug = self.by_key.get(key)
        if since is not None:
            mine = ref.identity if ref is not None else None
            other_device = (
                unplug is not None
                and mine is not None
                and unplug.identity is not None
                and unplug.identity != mine
            )
            if gone or unplug is None or other_device:
                ended = self._removed_device(key, since, mine)
                if ended is not None:
                    ended.join()
                    return ended, True
        joined = unplug is not None
        if unplug is None:
            unplug = Unplug(self, key, domain, run_id=run_id, device=device, ref=ref)
            self._add(unplug)
            unplug.join()
            unplug.record("started")
            unplug.start()
        else:
            unplug.join()
        return unplug, joined

    def untold(self, unplug: Unplug, mine: asyncio.Future[LiveDone], exc: BaseException) -> None:
        """A caller cancelled in the step its unplug ran out of attempts never saw
        the `DetachTimeout` its future holds.  The unplug goes on as one idle
        with every attempt used would: kept one ``timeout`` for callers asking
        again (they get a look at the live XML, and the timeout with no request
        sent), ended by the device's events or its domain stopping meanwhile
        (rule 3: a retry loop ends in `DetachTimeout` like a patient caller)."""
        if (
            isinstance(exc, asyncio.CancelledError)
            and mine.done()
            and not mine.cancelled()
            and isinstance(mine.exception(), DetachTimeout)
            and unplug.key not in self.by_key
            and self.conn.state == "open"
        ):
            kept = Unplug(self, unplug.key, unplug.domain)
            kept.identity, kept.persistent_done = unplug.identity, unplug.persistent_done
            self._add(kept)
            kept.record("started")
            kept.linger(unplug.sent)

    def _removed_device(self, key: Key, since: int, identity: Identity | None) -> Unplug | None:
        """The newest unplug of ``key`` that removed a device with ``identity``
        (any, if either is unknown) after ``since``."""
        for ended in reversed(self.removed.get(key, since)):
            if identity is None or ended.identity is None or ended.identity == identity:
                return ended
        return None

    def take_up(self, entry: Entry, run_id: str | None, ref: DeviceRef | None = None) -> Unplug:
        """An unplug of an earlier run of this process, found unfinished in the
        journal and still attached: a real entry of the registry (``pending()``,
        joins, hooks, metrics see it), with nobody waiting yet."""
        key = (entry.domain_uuid, entry.alias)
        unplug = Unplug(self, key, entry.domain_name, run_id=run_id, device=entry.device, ref=ref)
        self._add(unplug)
        unplug.take_up(entry)
        unplug.record("started")
        unplug.record("recovered")
        return unplug

    def _add(self, unplug: Unplug) -> None:
        self.by_key[unplug.key] = unplug  # "ended" pairs with "started", always

    def forget(self, unplug: Unplug) -> None:
        """The unplug ended (its ``result`` is set if it removed the device)."""
        if self.by_key.get(unplug.key) is unplug:
            del self.by_key[unplug.key]
        if unplug.result is not None:
            self.removed.add(unplug.key, unplug)

    def connection_lost(self, reason: str) -> None:
        self.conn.lost(reason)  # wakes every unplug through on_lost if it is news

    def _wake_all(self) -> None:
        for unplug in list(self.by_key.values()):
            unplug.connection_down()  # one in its window waits for the reconnect

    async def close(self) -> None:
        for unplug in list(self.by_key.values()):
            unplug.abort()
        self.by_key.clear()
        self.deadlines.close()
