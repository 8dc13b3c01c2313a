"""A real DEVICE_REMOVAL_FAILED: the guest refuses to give back a pinned DIMM.

The guest onlines a hot-plugged 128 MiB DIMM as kernel memory and fills it
with unmovable objects, then prints ``AIODETACH-MEMORY-PINNED <block>``.
Asked to unplug it, Linux fails to offline the memory and answers the ACPI
eject with a failure (_OST); QEMU reports it and libvirt emits
DEVICE_REMOVAL_FAILED ~15 ms after the request.  aiodetach must raise
:class:`DetachFailed` after that one request and never retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from aiodetach import DetachSettings
from aiodetach.errors import DetachFailed
from aiodetach_lab.guest import MEMORY_PINNED_LINE, wait_for_ready

from ._support import (
    DIMM_ALIAS,
    DIMM_XML,
    Guest,
    connection,
    guest,
    recording_service,
    wait_for_line_prefix,
)


@pytest.fixture(scope="module")
def pinned_memory_guest(libvirtd: str) -> Iterator[Guest]:
    with guest(libvirtd, machine="pc", memory_hotplug_slots=4, pin_hotplugged_memory=True) as g:
        yield g


@pytest.mark.slow
async def test_pinned_dimm_fails_once_and_is_not_retried(pinned_memory_guest: Guest) -> None:
    g = pinned_memory_guest
    offset = len(g.serial_log.read_bytes())
    with connection(g.uri) as conn:
        conn.lookupByName(g.name).attachDeviceFlags(DIMM_XML, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    await wait_for_line_prefix(g.serial_log, MEMORY_PINNED_LINE, after=offset, within=120)

    # Long timeout, many attempts: only DEVICE_REMOVAL_FAILED can end this quickly.
    settings = DetachSettings(timeout=20, attempts=8)
    async with recording_service(g.uri, settings) as (svc, backend):
        started = time.monotonic()
        with pytest.raises(DetachFailed) as info:
            await svc.detach(g.name, alias=DIMM_ALIAS)
        failed_after = time.monotonic() - started
        # The service stays open: nothing may be re-sent behind the caller's back.
        await asyncio.sleep(3)
        assert svc.pending() == []

    assert (info.value.domain, info.value.alias) == (g.name, DIMM_ALIAS)
    assert failed_after < 5, failed_after
    assert [(r.alias, r.error) for r in backend.requests] == [(DIMM_ALIAS, None)]
    assert g.has_alias(DIMM_ALIAS), "the guest kept the DIMM"


def test_wait_for_ready_can_wait_for_the_memory_pinned_line(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text(f"AIODETACH-GUEST-READY\n{MEMORY_PINNED_LINE} 32\n")
    wait_for_ready(log, timeout=0.3, marker=MEMORY_PINNED_LINE)
