"""The persistent (config) half: one synchronous detach per device, never retried.

Concurrent callers of one device share one config detach, keyed by the
device's *identity* in the persistent definition (disk target, MAC, hostdev
source, …; see :mod:`aiodetach._xml`), never by a description: two different
``<hostdev>``s may describe alike, and each must get its own detach.

A caller that read the persistent definition *before* another caller's
config detach of the same device completed would otherwise send a second
one and get "device not found" for a detach that did happen.  Each caller
therefore takes a :meth:`PersistentStep.ticket` before its read; a config
detach that completed after that ticket counts as this caller's too.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Hashable

import structlog

from ._connection import Connection
from ._errors_map import is_connection_error, map_error
from ._unplug import Unplugs
from ._xml import DeviceRef, find_same_device
from .backend import BackendError, DomainInfo
from .errors import DeviceNotFound

__all__ = ["PersistentStep"]

_log = structlog.get_logger("aiodetach")
Key = tuple[str, Hashable]


class PersistentStep:
    """Config detaches of one service, coalesced per device."""

    def __init__(self, conn: Connection, unplugs: Unplugs) -> None:
        self._conn = conn
        self._unplugs = unplugs
        self._ops: dict[Key, asyncio.Task[None]] = {}
        self._seq = 0  # bumped by every config detach that completes
        self._completed: dict[Key, int] = {}  # key -> _seq when it completed
        self._readers: Counter[int] = Counter()  # tickets of callers between read and detach

    def ticket(self) -> int:
        """Take before reading the persistent definition; give back with :meth:`release`."""
        self._readers[self._seq] += 1
        return self._seq

    def release(self, ticket: int) -> None:
        self._readers[ticket] -= 1
        if self._readers[ticket] <= 0:
            del self._readers[ticket]
        # Only a caller whose ticket predates a completion can need its record.
        oldest = min(self._readers, default=self._seq)
        for key in [k for k, seq in self._completed.items() if seq <= oldest]:
            del self._completed[key]

    async def detach(
        self,
        info: DomainInfo,
        dev: DeviceRef,
        alias: str | None,
        ticket: int,
        *,
        live_follows: bool,
    ) -> bool:
        """Remove ``dev`` from the persistent definition.  False: "not found",
        ignored because a live detach follows."""
        key: Key = (info.uuid, dev.identity if dev.identity is not None else dev.xml)
        task = self._ops.get(key)
        if task is None and self._completed.get(key, -1) > ticket:
            _log.info("aiodetach.persistent_joined", domain=info.name, alias=alias)
            return True  # another caller's config detach of this device, after our read
        if task is None:
            task = asyncio.get_running_loop().create_task(self._config_detach(info, dev))
            self._ops[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        try:
            await asyncio.shield(task)
        except DeviceNotFound:
            if live_follows:
                _log.info("aiodetach.persistent_missing_ignored", domain=info.name, alias=alias)
                return False
            raise
        _log.info("aiodetach.persistent_detached", domain=info.name, alias=alias)
        return True

    def _done(self, key: Key, task: asyncio.Task[None]) -> None:
        self._ops.pop(key, None)
        if task.cancelled():
            return
        if task.exception() is None:  # retrieved either way: its callers may be gone
            self._seq += 1
            if self._readers:
                self._completed[key] = self._seq

    async def close(self) -> None:
        tasks = list(self._ops.values())
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _config_detach(self, info: DomainInfo, dev: DeviceRef) -> None:
        conn = self._conn
        try:
            await conn.call(conn.backend.detach_config, info.uuid, dev.xml)
        except BackendError as err:
            if not (is_connection_error(err) and conn.state == "open"):
                raise map_error(
                    err, domain=info.name, alias=dev.alias, action="persistent detach"
                ) from None
            # Did it land before the daemon went away?  Ask the definition.
            self._unplugs.connection_lost("call failed: " + err.message)
            await conn.wait_up()
            try:
                xml = await conn.read(conn.backend.domain_xml, info.uuid, inactive=True)
                if find_same_device(xml, dev) is None:
                    return
                await conn.call(conn.backend.detach_config, info.uuid, dev.xml)
            except BackendError as err2:
                raise map_error(
                    err2, domain=info.name, alias=dev.alias, action="persistent detach"
                ) from None
