"""A request libvirt refused without taking it uses no attempt after a restart
either (docs/journal.md, "Not taken").

The journal notes each live request before it goes out; a refusal that says
the request never got into the guest ("guest is busy" with nothing of ours
pending, a call failed inside the client) takes that note back, so a service
restarted with the journal neither waits a window for it nor counts it
against ``attempts``.  (A request refused because another job held the
domain: tests/unit/test_jobs_and_migrations_adversarial.py.)  On the fake
hypervisor, through the public API.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from _probes import until
from aiodetach import DetachService
from aiodetach.errors import ServiceClosed
from aiodetach.testing import FakeHypervisor, GuestUnplug

from ._journal_support import journal_rows, journal_settings

BOUND = 15.0


def _unfinished(journal: Path) -> list[dict[str, object]]:
    return [r for r in journal_rows(journal) if r["finished_at"] is None]


async def test_a_busy_refusal_is_no_attempt_after_a_restart(
    fake: FakeHypervisor, tmp_path: Path
) -> None:
    """The slot refused "guest is busy" and nothing of ours was pending: the
    restarted service takes nothing up and its one attempt is the request
    that the guest takes."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug(busy_first=2))
    journal = tmp_path / "j.db"
    settings = journal_settings(attempts=1, timeout=5.0)
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: fake.busy_refusals >= 1, 10, "a busy refusal")
        await until(lambda: not _unfinished(journal), 10, "the refusal in the journal")
    with pytest.raises(ServiceClosed):
        await caller
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        assert svc.recovered() == []
        async with asyncio.timeout(BOUND):
            result = await svc.detach("vm", alias="ua-d", persistent=False)
    assert (result.live, result.attempts, result.resumed) == (True, 1, False)
    assert len(fake.requests) == fake.busy_refusals + 1


async def test_a_request_failed_in_the_client_is_no_attempt_after_a_restart(
    fake: FakeHypervisor, tmp_path: Path
) -> None:
    """The request failed inside libvirt's client ("client socket is closed":
    libvirtd never heard of it) and the service stopped before the connection
    came back: the restarted service sends it, as its first attempt."""
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.now())
    journal = tmp_path / "j.db"
    settings = journal_settings(attempts=1, timeout=5.0)

    def daemon_dies(call: str) -> None:
        if call == "detach_live":
            fake.crash()  # the call then fails in the client: not sent

    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        fake.before_call = daemon_dies
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: "detach_live" in fake.calls, 10, "the request")
        await until(lambda: not _unfinished(journal), 10, "the failure in the journal")
    with pytest.raises(ServiceClosed):
        await caller
    fake.before_call = None
    fake.restart()
    assert fake.requests == []
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        assert svc.recovered() == []
        async with asyncio.timeout(BOUND):
            result = await svc.detach("vm", alias="ua-d", persistent=False)
    assert (result.live, result.attempts, result.resumed) == (True, 1, False)
    assert len(fake.requests) == 1


async def test_a_refusal_during_a_resets_hold_is_no_attempt_after_a_restart(
    fake: FakeHypervisor, tmp_path: Path
) -> None:
    """A reset voided the accepted request (native PCIe: the guest never
    releases the device for it), and its re-send was refused while QEMU still
    held the slot: neither counts.  The restarted service takes nothing up and
    its one attempt is the request the guest takes once the hold is over."""
    vm = fake.add_domain("vm")
    slot = GuestUnplug("manual", refuse_while_pending=True, on_reset="void", reset_hold=3.0)
    vm.add_disk("vdb", alias="ua-d", unplug=slot)
    journal = tmp_path / "j.db"
    settings = journal_settings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 10, "the request")
        await until(lambda: bool(_unfinished(journal)), 10, "its row")
        fake.reset_domain("vm")
        await until(lambda: fake.held_refusals >= 1, 10, "a refusal during the hold")
        await until(lambda: not _unfinished(journal), 10, "the refusal in the journal")
    with pytest.raises(ServiceClosed):
        await caller
    device = vm.live_device("ua-d")
    assert device is not None
    assert device.held_until is not None
    held_until = device.held_until
    await until(lambda: time.monotonic() >= held_until, 10, "the slot's hold over")
    sent_before = len(fake.requests)
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        assert svc.recovered() == []
        detach = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) > sent_before, 10, "the new request")
        fake.complete("vm", "ua-d")
        async with asyncio.timeout(BOUND):
            result = await detach
    assert (result.live, result.attempts, result.resumed) == (True, 1, False)
    assert len(fake.requests) == sent_before + 1
