"""A guest reset in the middle of a native-PCIe unplug (q35, pciehp), real QEMU.

The reset voids the pending unplug: libvirt emits REBOOT and never
DEVICE_REMOVED, the device stays attached, and QEMU refuses a new request
for ~5 s after the voided one ("already in the process of unplug").  With one
attempt, 0.1 waited the window out and raised DetachTimeout for a device the
guest would have released.  aiodetach notices the reboot, looks, sends again
as soon as QEMU takes it (using no attempt), and waits the window of that
request.  That request reaches a guest that is booting again: its pciehp acts
on the press when it probes the slot, and the unplug then took 7 s (idle
machine) to 16 s (loaded), so the window here is 30 s, not 8 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.instrumentation import Record, UnplugRecord
from aiodetach_lab.requests import recording_requests

from ._support import IN_PROGRESS_MARKERS, Guest, connection, guest, virtio_disk

pytestmark = pytest.mark.slow


@pytest.fixture
def native(libvirtd: str) -> Iterator[Guest]:
    with guest(
        libvirtd,
        machine="q35",
        native_pcie_hotplug=True,
        disks=[virtio_disk("vdb", "ua-disk1")],
        kernel_log=True,
        reboot=True,
    ) as g:
        yield g


def _reset(uri: str, name: str) -> float:
    with connection(uri) as conn:
        conn.lookupByName(name).reset(0)
    return time.monotonic()


@pytest.mark.parametrize("into", [0.0, 1.0], ids=["at-the-press", "1s-into-the-blink"])
async def test_reset_during_the_unplug_resends_once_taken_using_no_attempt(
    native: Guest, into: float
) -> None:
    offset = len(native.serial_text())
    kinds: list[str] = []

    def hook(record: Record) -> None:
        if isinstance(record, UnplugRecord):
            kinds.append(record.kind)

    settings = DetachSettings(timeout=30, attempts=1)
    with recording_requests() as backend:
        async with DetachService(native.uri, settings=settings, hooks=[hook]) as svc:
            started = time.monotonic()
            task = asyncio.create_task(svc.detach(native.name, alias="ua-disk1"))
            # pciehp saw the button: its 5 s blink runs, the unplug is pending.
            await _button_pressed(native, offset)
            # The scenario's timing (the reset lands inside the 5 s blink), not a wait.
            await asyncio.sleep(into)
            reset_at = await asyncio.to_thread(_reset, native.uri, native.name)
            result = await task

    accepted, refused = backend.accepted(), backend.refused()
    assert len(accepted) == 2, backend.requests  # the voided one, and the one taken after it
    for r in refused:
        assert any(m in (r.error or "") for m in IN_PROGRESS_MARKERS), r
    assert result.attempts == 1, result  # the voided request used no attempt
    assert result.confirmed_by == "event", result
    assert (kinds.count("guest_reset"), kinds.count("request_voided")) == (1, 1), kinds
    assert not native.has_alias("ua-disk1")
    # What was measured (docs/libvirt-behaviour.md).
    print(
        f"\nreset {reset_at - accepted[0].ended:.2f} s after the request was taken; {len(refused)} refusal(s); "
        f"re-send taken {accepted[1].ended - accepted[0].ended:.2f} s after the first; "
        f"removed {started + result.elapsed - reset_at:.2f} s after the reset; "
        f"elapsed {result.elapsed:.2f} s"
    )


async def _button_pressed(g: Guest, offset: int) -> None:
    """Until pciehp logged the attention button (its 5 s blink then runs)."""
    deadline = time.monotonic() + 60
    while "Attention button pressed" not in g.serial_text()[offset:]:
        assert time.monotonic() < deadline, g.serial_text()[offset:]
        await asyncio.sleep(0.05)
