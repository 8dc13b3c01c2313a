"""The domain migrates away while its devices are being unplugged.

Two private libvirtd daemons on this machine, each with its own host UUID
(libvirt refuses to migrate to a daemon that reports its own), play source
and destination host; the OS-less guest's PCI unplugs stay pending.  The
source's service must wake every waiter at once with
``DomainStopped(reason="migrated")``, after one request per device.

Measured here (and asserted, so a libvirt that behaves otherwise is noticed):
libvirt migrates a domain with unplugs pending, and the devices are still in
the destination's live XML: the unplug did not travel with the domain, so a
caller must detach again on the new host.
"""

from __future__ import annotations

import asyncio
import time
import uuid as _uuid

import libvirt
import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DomainStopped
from aiodetach_lab import domains as _lab
from aiodetach_lab.daemon import PrivateLibvirtd

from .._real import domains_removed, live_xml, quiet, record_requests, until

ALIASES = ("ua-v0", "ua-v1")


def _migrate(source_uri: str, target_uri: str, uuid: str) -> float:
    """Live-migrate ``uuid`` (client-driven); return the seconds it took."""
    quiet()
    source, target = libvirt.open(source_uri), libvirt.open(target_uri)
    try:
        started = time.monotonic()
        # UNSAFE: the disk images are plain files on this machine, not shared storage.
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE
        # The migration stream goes to 127.0.0.1, not to whatever this host's
        # name resolves to.
        source.lookupByUUIDString(uuid).migrate(target, flags, None, "tcp://127.0.0.1", 0)
        return time.monotonic() - started
    finally:
        source.close()
        target.close()


async def test_migrated_away_wakes_every_waiter(
    private_libvirtd: PrivateLibvirtd,
    second_private_libvirtd: PrivateLibvirtd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, target = private_libvirtd, second_private_libvirtd
    sent = record_requests(monkeypatch)
    name = f"rm-{_uuid.uuid4().hex[:6]}"
    disks = [_lab.DiskSpec(f"vd{c}", "virtio", a) for c, a in zip("bc", ALIASES, strict=True)]
    uuid = await asyncio.to_thread(source.define, name, disks)
    with domains_removed(source.uri, [uuid]), domains_removed(target.uri, [uuid]):
        async with DetachService(source.uri, settings=DetachSettings(timeout=60.0)) as svc:
            callers = [
                asyncio.create_task(svc.detach(name, alias=a)) for a in ALIASES for _ in "ab"
            ]
            await until(lambda: len(sent.requests) == 2, 20, "2 requests sent")
            await asyncio.sleep(0.3)
            assert not any(c.done() for c in callers)
            took = await asyncio.to_thread(_migrate, source.tcp_uri, target.tcp_uri, uuid)
            started = time.monotonic()
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*callers, return_exceptions=True)
            woke_after_migration = time.monotonic() - started
            assert svc.pending() == []
        assert all(isinstance(o, DomainStopped) for o in outcomes), outcomes
        stopped = [o for o in outcomes if isinstance(o, DomainStopped)]
        assert {o.reason for o in stopped} == {"migrated"}
        assert sorted(o.alias or "" for o in stopped) == sorted(ALIASES * 2)
        assert len(sent.requests) == 2
        # The unplugs did not travel with the domain.
        dest_xml = await asyncio.to_thread(live_xml, target.uri, uuid)
        assert all(f"'{a}'" in dest_xml for a in ALIASES)
    print(
        f"migration: {took:.2f} s; waiters woke {woke_after_migration:.3f} s after "
        "migrate() returned (the STOPPED/MIGRATED event comes before it returns); "
        "devices still attached on the destination"
    )
