"""The persistent (config) half: one synchronous detach per device, never retried.

Never retried once libvirt ran it.  A call libvirt did not run because
another job (a migration) held the domain for all of its wait (30 s, "cannot
acquire state change lock") is sent again while a caller waits for it: it
was not taken.

Concurrent callers of one device share one config detach, keyed by the
device's *identity* in the persistent definition (disk target, MAC, hostdev
source, …; see `aiodetach._xml`), never by a description: two different
``<hostdev>``s may describe alike, and each must get its own detach.

A caller that began while another caller's config detach of the same device
was under way would otherwise send a second one (or, reading the definition
after it landed, not find the device) and get "device not found" for a
detach that did happen.  Each caller therefore takes a
`PersistentStep.ticket()` when it begins; a config detach of its device
under way or completed since then counts as this caller's too.
"""

from __future__ import annotations

import asyncio
import functools
import xml.etree.ElementTree as ET
from collections.abc import Hashable
from typing import Literal

from ._connection import Connection
from ._errors_map import is_connection_error, is_job_held, map_error
from ._machine_io import JOB_RETRY_GAP
from ._recent import Recent
from ._registry import Unplugs
from ._xml import DeviceRef, Selector, find_device, find_same_device, same_identity
from .backend import BackendError, DomainInfo
from .errors import DeviceNotFound

__all__ = ["PersistentOutcome", "PersistentStep"]

Key = tuple[str, Hashable]
PersistentOutcome = Literal[
    "persistent_detached", "persistent_joined", "persistent_missing_ignored"
]
"""What the config step did for a caller (named as the caller's record step)."""


class PersistentStep:
    """Config detaches of one service, coalesced per device."""

    def __init__(self, conn: Connection, unplugs: Unplugs) -> None:
        self._conn = conn
        self._unplugs = unplugs
        self._ops: dict[Key, tuple[asyncio.Task[None], DeviceRef]] = {}
        self._completed: Recent[Key, DeviceRef] = Recent()  # config detaches that landed
        self._waiting: dict[Key, int] = {}  # callers waiting for each config detach

    def ticket(self) -> int:
        """Take when a detach begins; give back with `release()`."""
        return self._completed.ticket()

    def release(self, ticket: int) -> None:
        self._completed.release(ticket)

    def removed_since(
        self, uuid: str, ticket: int, selector: Selector, live_dev: DeviceRef | None
    ) -> DeviceRef | None:
        """The device this caller means, if another caller's config detach of it
        is under way or completed since this caller began.

        Such a caller may read the persistent definition after that detach
        landed and not find the device there; it asked for what did happen,
        so it shares that detach instead of failing with "not found".
        """
        candidates = [dev for key, (_task, dev) in self._ops.items() if key[0] == uuid]
        candidates += [dev for key, dev in self._completed.since(ticket) if key[0] == uuid]
        for dev in candidates:
            if live_dev is not None and live_dev.identity is not None:
                if same_identity(dev, live_dev):
                    return dev
            elif find_device(_alone(dev), selector):
                return dev
        return None

    async def detach(
        self,
        info: DomainInfo,
        dev: DeviceRef,
        ticket: int,
        *,
        live_follows: bool,
    ) -> PersistentOutcome:
        """Remove ``dev`` from the persistent definition.
        ``persistent_missing_ignored``: "not found", ignored because a live
        detach follows.  The caller reports the step (its record names the call)."""
        key: Key = (info.uuid, dev.identity if dev.identity is not None else dev.xml)
        op = self._ops.get(key)
        if op is None and self._completed.get(key, ticket):
            # Another caller's config detach of this device, since we began.
            return "persistent_joined"
        if op is None:
            task = asyncio.get_running_loop().create_task(self._config_detach(info, dev, key))
            self._ops[key] = (task, dev)
            task.add_done_callback(functools.partial(self._done, key, dev))
        else:
            task = op[0]
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            await asyncio.shield(task)
        except DeviceNotFound:
            if live_follows:
                return "persistent_missing_ignored"
            raise
        finally:
            left = self._waiting.pop(key) - 1
            if left:
                self._waiting[key] = left
        return "persistent_detached"

    def _done(self, key: Key, dev: DeviceRef, task: asyncio.Task[None]) -> None:
        self._ops.pop(key, None)
        if task.cancelled():
            return
        if task.exception() is None:  # retrieved either way: its callers may be gone
            self._completed.add(key, dev)

    async def close(self) -> None:
        tasks = [task for task, _dev in self._ops.values()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _config_detach(self, info: DomainInfo, dev: DeviceRef, key: Key) -> None:
        conn = self._conn
        try:
            await self._send(info, dev, key)
        except BackendError as err:
            if not (is_connection_error(err) and conn.state == "open"):
                raise map_error(
                    err, domain=info.name, alias=dev.alias, action="persistent detach"
                ) from None
            # Did it land before the daemon went away?  Ask the definition.
            self._unplugs.connection_lost("call failed: " + err.message)
            await conn.wait_up()
            try:
                xml = await conn.definition(info.uuid, inactive=True)
                # A re-read of the same definition: a twin at another address
                # is another device (``own=xml``), so ``dev`` is gone.
                if find_same_device(xml, dev, xml) is None:
                    return
                await self._send(info, dev, key)
            except BackendError as err2:
                raise map_error(
                    err2, domain=info.name, alias=dev.alias, action="persistent detach"
                ) from None

    async def _send(self, info: DomainInfo, dev: DeviceRef, key: Key) -> None:
        """``detachDeviceFlags(CONFIG)``, sent again while another job holds
        the domain past libvirt's wait and a caller still waits for it (the
        caller's own deadline bounds it, as for the live half).  The call
        blocks in libvirt until the job ends, so sending it again at once is
        the wait; a refusal that came sooner is sent again a moment later."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await conn.call(conn.backend.detach_config, info.uuid, dev.xml)
                return
            except BackendError as err:
                if not (is_job_held(err) and self._waiting.get(key)):
                    raise
                refused = err
            if loop.time() - started < JOB_RETRY_GAP:
                await asyncio.sleep(JOB_RETRY_GAP)
                if not self._waiting.get(key):
                    # Every caller left during the pause: nothing for nobody
                    # (the job may have ended meanwhile, and it would go through).
                    raise refused


def _alone(dev: DeviceRef) -> str:
    """A domain XML holding only ``dev``, to match a selector against it."""
    root = ET.Element("domain")
    ET.SubElement(root, "devices").append(ET.fromstring(dev.xml))  # noqa: S314 - libvirt's
    return ET.tostring(root, encoding="unicode")
