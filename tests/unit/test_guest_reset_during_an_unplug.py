"""A guest reset during a live unplug, on the fake hypervisor.

Native PCIe (QEMU): the reset voids the pending unplug (no DEVICE_REMOVED
ever comes for it) and QEMU refuses a new request for a while after the
voided one ("already in the process of unplug").  The voided request uses no
attempt; it is sent again as soon as QEMU takes it, its refusals spaced.
ACPI: the reset completes the pending unplug (DEVICE_REMOVED follows REBOOT):
one request, success.
"""

from __future__ import annotations

import asyncio

from aiodetach import DetachService, DetachSettings
from aiodetach.instrumentation import Record, UnplugRecord
from aiodetach.testing import FakeHypervisor, GuestUnplug


class Steps:
    """A hook: the unplug's steps, and an event set at its first request."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.sent = asyncio.Event()

    def __call__(self, record: Record) -> None:
        if isinstance(record, UnplugRecord):
            self.kinds.append(record.kind)
            if record.kind == "request_sent":
                self.sent.set()


async def _detach_with_reset(
    fake: FakeHypervisor, settings: DetachSettings, *, emit: bool = True
) -> tuple[object, Steps]:
    steps = Steps()
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-disk1"))
        await steps.sent.wait()  # libvirt took the request: the guest's unplug is pending
        fake.reset_domain("vm", emit=emit)
        return await task, steps


async def test_native_pcie_reset_voids_the_request_it_is_sent_again_using_no_attempt() -> None:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.native_pcie(0.8, hold=0.9))
    # One attempt whose window (2 s) is longer than the unplug (0.8 s): a
    # voided request waited out would end in DetachTimeout.
    result, steps = await _detach_with_reset(fake, DetachSettings(attempts=1, timeout=2.0))
    assert result.attempts == 1  # type: ignore[attr-defined]
    assert result.confirmed_by == "event"  # type: ignore[attr-defined]
    assert vm.live_device("ua-disk1") is None
    assert fake.voided == 1
    assert steps.kinds.count("guest_reset") == 1
    assert steps.kinds.count("request_voided") == 1
    assert "attempt_timed_out" not in steps.kinds
    # Refused while QEMU holds the voided request, spaced (not hammered), then
    # taken once: nothing was ever sent into a pending unplug.
    assert 1 <= fake.held_refusals <= 3
    taken = [r for r in fake.requests if not r.while_pending]
    assert len(fake.requests) - len(taken) == 0
    assert len(taken) == 2 + fake.held_refusals


async def test_native_pcie_reset_whose_event_is_lost_costs_an_attempt() -> None:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.native_pcie(0.3, hold=0.4))
    settings = DetachSettings(attempts=2, timeout=1.0)
    result, steps = await _detach_with_reset(fake, settings, emit=False)
    # Without REBOOT the void request is only noticed when its window runs out.
    assert result.attempts == 2  # type: ignore[attr-defined]
    assert "request_voided" not in steps.kinds
    assert steps.kinds.count("attempt_timed_out") == 1


async def test_acpi_reset_completes_the_unplug_one_request() -> None:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    # The guest would take 30 s: only the reset removes it.
    vm.add_disk("vdb", alias="ua-disk1", unplug=GuestUnplug.acpi(30.0))
    result, steps = await _detach_with_reset(fake, DetachSettings(attempts=1, timeout=10.0))
    assert result.attempts == 1  # type: ignore[attr-defined]
    assert result.confirmed_by == "event"  # type: ignore[attr-defined]
    assert len(fake.requests) == 1
    assert fake.voided == 0
    assert "request_voided" not in steps.kinds
