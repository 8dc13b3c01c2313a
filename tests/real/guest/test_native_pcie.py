"""q35 with native PCIe hotplug (pciehp): a slow unplug, and re-sends refused while it runs.

Linux acts on an attention-button press only after a 5 s window in which a
second press cancels it; a virtio-blk unplug takes ~6.3 s under TCG.
QEMU 7.2 refuses a re-sent ``device_del`` meanwhile ("Device … is already in
the process of unplug", later "Hot-unplug failed: guest is busy (power
indicator blinking)"), so the press is never repeated and the unplug is never
cancelled.  These tests show aiodetach sends one request when it waits long
enough, treats the refusals as "still in progress" when it does not, and that
the guest saw exactly one button press and no cancel either way (pciehp's own
log lines, made visible with ``loglevel=7``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aiodetach import DetachSettings
from aiodetach.backend import ErrorCode, ErrorDomain

from ._support import (
    IN_PROGRESS_MARKERS,
    NATIVE_PCIE_UNPLUG,
    Guest,
    button_presses,
    cancels,
    guest,
    recording_service,
    virtio_disk,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def native(libvirtd: str) -> Iterator[Guest]:
    disks = [virtio_disk("vdb", "ua-disk1"), virtio_disk("vdc", "ua-disk2")]
    with guest(
        libvirtd, machine="q35", native_pcie_hotplug=True, disks=disks, kernel_log=True
    ) as g:
        yield g


async def test_one_request_when_timeout_exceeds_the_unplug(native: Guest) -> None:
    offset = len(native.serial_text())
    settings = DetachSettings(timeout=20, attempts=8)  # the defaults, pinned against env
    async with recording_service(native.uri, settings) as (svc, backend):
        result = await svc.detach(native.name, alias="ua-disk1")

    assert [(r.alias, r.error) for r in backend.requests] == [("ua-disk1", None)]
    assert result.attempts == 1
    assert result.confirmed_by == "event", result
    assert (result.live, result.persistent) == (True, True)
    # The 5 s attention-button window is really there (measured 6.1-6.3 s).
    assert 5.0 <= result.elapsed < 15, result
    log = native.serial_text()[offset:]
    assert (button_presses(log), cancels(log)) == (1, 0), log
    assert not native.has_alias("ua-disk1")
    assert not native.has_alias("ua-disk1", inactive=True)


async def test_short_timeout_resends_are_refused_as_in_progress(native: Guest) -> None:
    offset = len(native.serial_text())
    # Re-sends at ~2.5 s ("already in the process of unplug") and ~5 s (that, or "guest is
    # busy" once QEMU's 5 s pending window is over).  Not 2 s: a re-send at ~6.0-6.2 s, after
    # the guest powered the slot off but before libvirt removed the disk, is *accepted* by
    # QEMU (seen in benchmarks/bench_seed_bug.py; harmless, but not a refusal).
    settings = DetachSettings(timeout=2.5, attempts=8)
    async with recording_service(native.uri, settings) as (svc, backend):
        result = await svc.detach(native.name, alias="ua-disk2")

    accepted, refused = backend.accepted(), backend.refused()
    assert len(accepted) == 1, backend.requests
    assert accepted[0] == backend.requests[0], backend.requests
    assert len(refused) >= 2, backend.requests
    for r in refused:
        assert r.error is not None
        assert any(m in r.error for m in IN_PROGRESS_MARKERS), r
        assert (r.code, r.origin) == (ErrorCode.INTERNAL_ERROR, ErrorDomain.QEMU), r
    assert any("already in the process of unplug" in (r.error or "") for r in refused)
    # Still one unplug, completed by the guest and reported by event, no exception.
    assert result.confirmed_by == "event", result
    assert result.attempts == len(backend.requests)
    assert NATIVE_PCIE_UNPLUG - 1.5 <= result.elapsed < 15, result
    log = native.serial_text()[offset:]
    assert (button_presses(log), cancels(log)) == (1, 0), log
    assert not native.has_alias("ua-disk2")
