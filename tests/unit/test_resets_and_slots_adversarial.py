"""Guest resets during an unplug, and the slot-minimum warning, pushed at their edges.

Through the public API on the fake: a reset at every step of the unplug
(before the request, in its thread, right after it was taken, while paused,
while a re-check reads, several REBOOTs per reset, two resets), with callers
leaving, joining, the service closing and the domain stopping; and the
``timeout_below_slot_minimum`` warning for joined callers, other device
kinds, a config-only call and domains whose XML says little.  The promises
are those of docs/protocol.md (rule 2) and docs/testing.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachError, DomainStopped
from aiodetach.instrumentation import DetachRecord, Record, UnplugRecord
from aiodetach.testing import FakeDomain, FakeHypervisor, GuestUnplug

ALIAS = "ua-disk1"


def _held_manual(hold: float = 0.2) -> GuestUnplug:
    """A native-PCIe slot that releases only when the test says so."""
    return GuestUnplug("manual", refuse_while_pending=True, on_reset="void", reset_hold=hold)


class Steps:
    """A hook: the unplug's steps, each awaitable by kind and count."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.detach: list[DetachRecord] = []
        self._waiters: list[tuple[str, int, asyncio.Event]] = []
        self.on: dict[str, Callable[[], object]] = {}

    def __call__(self, record: Record) -> None:
        if isinstance(record, DetachRecord):
            self.detach.append(record)
        if not isinstance(record, UnplugRecord):
            return
        self.kinds.append(record.kind)
        action = self.on.get(record.kind)
        if action is not None:
            action()
        for kind, count, event in self._waiters:
            if kind == record.kind and self.kinds.count(kind) >= count:
                event.set()

    async def reached(self, kind: str, count: int = 1) -> None:
        event = asyncio.Event()
        self._waiters.append((kind, count, event))
        if self.kinds.count(kind) >= count:
            event.set()
        await event.wait()


def _taken(fake: FakeHypervisor) -> int:
    """Requests QEMU took (not refused while it held the slot)."""
    return len(fake.requests) - fake.held_refusals


async def _until_taken(
    fake: FakeHypervisor, steps: Steps, task: asyncio.Task[object], n: int
) -> None:
    """Until QEMU took ``n`` requests, or the detach ended (then the test's
    assertions say what went wrong)."""
    while _taken(fake) < n and not task.done():
        step = asyncio.ensure_future(steps.reached("request_sent", len(fake.requests) + 1))
        await asyncio.wait([step, task], return_when=asyncio.FIRST_COMPLETED)
        step.cancel()


def _native(fake: FakeHypervisor, delay: float = 0.3, hold: float = 0.6) -> FakeDomain:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.native_pcie(delay, hold=hold))
    return vm


# ------------------------------------------------------------------ resets
@pytest.mark.parametrize("call", ["lookup", "domain_xml", "detach_live"])
async def test_a_reset_before_the_request_reaches_qemu_changes_nothing(call: str) -> None:
    """A REBOOT before any request of ours was taken (the service looks the
    domain up, reads its XML, or the request is in its thread) voids nothing:
    one request, one attempt, no reset step."""
    fake = FakeHypervisor()
    vm = _native(fake)
    done = False

    def reset_first(name: str) -> None:
        nonlocal done
        if name == call and not done:
            done = True
            fake.reset_domain("vm")

    fake.before_call = reset_first
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        result = await svc.detach("vm", alias=ALIAS)
    assert done
    assert result.attempts == 1
    assert vm.live_device(ALIAS) is None
    assert (fake.voided, len(fake.requests)) == (0, 1)
    assert "guest_reset" not in steps.kinds
    assert "request_voided" not in steps.kinds


async def test_several_reboot_events_of_one_reset_void_the_request_once() -> None:
    """QEMU emits REBOOT two or three times per reset (the firmware resets
    again): one reset step, one voided request, one extra request taken."""
    fake = FakeHypervisor()
    vm = _native(fake)
    steps = Steps()

    def reset_thrice() -> None:
        fake.reset_domain("vm")
        sink = fake.sink
        assert sink is not None
        sink.domain_rebooted(vm.uuid, vm.name)
        sink.domain_rebooted(vm.uuid, vm.name)

    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        await steps.reached("request_sent")
        reset_thrice()
        result = await task
    assert result.attempts == 1
    assert vm.live_device(ALIAS) is None
    assert fake.voided == 1
    assert steps.kinds.count("guest_reset") == 1
    assert steps.kinds.count("request_voided") == 1
    assert _taken(fake) == 2
    assert not any(r.while_pending for r in fake.requests)


async def test_a_second_reset_voids_the_re_sent_request_too_using_no_attempt() -> None:
    """Two resets, each after QEMU took our request: both requests were
    void, neither uses an attempt, and the third one is taken."""
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=_held_manual(hold=0.2))
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        for taken in (1, 2):
            await _until_taken(fake, steps, task, taken)
            fake.reset_domain("vm")
        await _until_taken(fake, steps, task, 3)
        fake.complete("vm", ALIAS)
        result = await task
    assert result.attempts == 1
    assert fake.voided == 2
    assert steps.kinds.count("request_voided") == 2
    assert steps.kinds.count("guest_reset") == 2
    assert "attempt_timed_out" not in steps.kinds
    assert not any(r.while_pending for r in fake.requests)


async def test_a_reset_while_the_guest_is_paused_uses_no_attempt() -> None:
    """The request reached a paused guest (noticed at the window's end), the
    guest is reset while paused (the pending unplug is void), then resumed:
    the request is sent again using no attempt, not waited out as an
    attempt of its own."""
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=_held_manual(hold=0.1))
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=0.5)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        await steps.reached("request_sent")
        fake.pause_domain("vm")
        await steps.reached("paused")
        fake.reset_domain("vm")
        await asyncio.sleep(0)  # nothing to await: a paused unplug takes no step on REBOOT
        fake.resume_domain("vm")
        await _until_taken(fake, steps, task, 2)
        fake.complete("vm", ALIAS)
        result = await task
    assert result.attempts == 1
    assert fake.voided == 1
    assert steps.kinds.count("request_voided") == 1
    assert "attempt_timed_out" not in steps.kinds


@pytest.mark.parametrize("read", ["lookup", "domain_xml"])
async def test_a_reset_while_a_re_check_reads_voids_the_request(read: str) -> None:
    """The window ran out on a pending native-PCIe unplug and the re-check is
    reading the state or the XML when the guest is reset: the request was
    void (no attempt used, the reset said once), and sent again."""
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=_held_manual(hold=0.1))
    steps = Steps()
    armed = False

    def reset_during_read(name: str) -> None:
        nonlocal armed
        if name == read and armed:
            armed = False
            fake.reset_domain("vm")

    fake.before_call = reset_during_read

    def arm() -> None:
        nonlocal armed
        armed = True

    steps.on["attempt_timed_out" if read == "domain_xml" else "request_sent"] = arm
    settings = DetachSettings(attempts=1, timeout=0.5)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        await _until_taken(fake, steps, task, 2)
        fake.complete("vm", ALIAS)
        result = await task
    assert fake.voided == 1
    assert result.attempts == 1
    assert steps.kinds.count("request_voided") == 1
    assert steps.kinds.count("guest_reset") == 1


async def test_a_reset_voiding_another_clients_pending_unplug_uses_no_attempt() -> None:
    """Another client's request is pending when ours is refused "already in
    the process of unplug" (an unplug in progress: we wait on it); a reset
    voids it.  QEMU still holds the slot for a moment: those refusals are not
    taken, and the request that goes through uses no attempt."""
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=_held_manual(hold=1.0))
    fake.open(_NoSink(), read_only=False)
    fake.detach_live(vm.uuid, ALIAS)  # virsh detach-device-alias, say
    fake.close()
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        await steps.reached("in_progress")
        fake.reset_domain("vm")
        await _until_taken(fake, steps, task, 3)  # theirs, ours voided, ours again
        fake.complete("vm", ALIAS)
        result = await task
    assert result.attempts == 1
    assert fake.voided == 1
    assert steps.kinds.count("request_voided") == 1
    assert "attempt_timed_out" not in steps.kinds


class _NoSink:
    """Events for a client that is not the service (nobody listens)."""

    def device_removed(self, uuid: str, name: str, alias: str) -> None: ...
    def device_removal_failed(self, uuid: str, name: str, alias: str) -> None: ...
    def domain_stopped(self, uuid: str, name: str, reason: str) -> None: ...
    def domain_resumed(self, uuid: str, name: str) -> None: ...
    def domain_rebooted(self, uuid: str, name: str) -> None: ...
    def connection_closed(self, reason: str) -> None: ...


@pytest.mark.parametrize("leave_at", ["guest_reset", "request_voided", "busy_backoff"])
async def test_a_caller_leaving_after_a_reset_stops_the_requests(leave_at: str) -> None:
    """The only caller gives up (its own cancellation) during the settle after
    the REBOOT, as the request is found void, or while QEMU holds the slot:
    nothing is sent after it left."""
    fake = FakeHypervisor()
    _native(fake, delay=0.3, hold=1.5)
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        sent_then: list[int] = []

        def leave() -> None:
            sent_then.append(len(fake.requests))
            task.cancel()

        steps.on[leave_at] = leave
        await steps.reached("request_sent")
        fake.reset_domain("vm")
        with pytest.raises(asyncio.CancelledError):
            await task
        await steps.reached("ended")
    assert sent_then
    # At most the request already in its thread when the caller left.
    assert len(fake.requests) <= sent_then[0] + (1 if leave_at == "request_voided" else 0)
    assert not any(r.while_pending for r in fake.requests)


async def test_joined_callers_share_one_voided_unplug() -> None:
    """Three callers on one unplug, a reset: one reset step, one voided
    request, one extra request taken, the same result for all."""
    fake = FakeHypervisor()
    vm = _native(fake)
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=ALIAS)) for _ in range(3)]
        await steps.reached("request_sent")
        fake.reset_domain("vm")
        results = await asyncio.gather(*tasks)
    assert [r.attempts for r in results] == [1, 1, 1]
    assert sum(r.joined for r in results) == 2
    assert vm.live_device(ALIAS) is None
    assert steps.kinds.count("request_voided") == 1
    assert _taken(fake) == 2


async def test_the_domain_stopping_while_qemu_holds_the_slot_ends_the_unplug() -> None:
    fake = FakeHypervisor()
    _native(fake, delay=0.3, hold=30.0)
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        await steps.reached("request_sent")
        steps.on["busy_backoff"] = lambda: fake.stop_domain("vm")
        fake.reset_domain("vm")
        with pytest.raises(DomainStopped):
            await task


async def test_closing_the_service_while_qemu_holds_the_slot_ends_the_caller() -> None:
    fake = FakeHypervisor()
    _native(fake, delay=0.3, hold=30.0)
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=2.0)
    svc = DetachService(backend=fake, settings=settings, hooks=[steps])
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
    await steps.reached("request_sent")
    fake.reset_domain("vm")
    await steps.reached("busy_backoff")
    await svc.aclose()
    sent = len(fake.requests)
    with pytest.raises(DetachError):
        await task
    assert len(fake.requests) == sent


# ------------------------------------------------------------------ slots
NATIVE_OFF = ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")
PORT = {"type": "pci", "domain": "0x0000", "bus": "0x01", "slot": "0x00", "function": "0x0"}


def _on_port(
    machine: str, *, acpi: bool = True, qemu_args: tuple[str, ...] = ()
) -> tuple[FakeHypervisor, FakeDomain]:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.machine, vm.acpi, vm.qemu_args = machine, acpi, qemu_args
    vm.add_device("<controller type='pci' index='1' model='pcie-root-port'/>", alias="pci.1")
    return fake, vm


async def _warnings(
    fake: FakeHypervisor, callers: int = 1, *, live: bool | None = None
) -> list[DetachRecord]:
    """The slot warnings of ``callers`` joined calls with a 1 s ``timeout``."""
    steps = Steps()
    settings = DetachSettings(attempts=3, timeout=1.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        await asyncio.gather(*(svc.detach("vm", alias=ALIAS, live=live) for _ in range(callers)))
    return [r for r in steps.detach if r.kind == "timeout_below_slot_minimum"]


async def test_joined_callers_each_get_one_warning_for_their_call() -> None:
    fake, vm = _on_port("pc-q35-7.2", qemu_args=NATIVE_OFF)
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.later(1.5), address=PORT)
    found = await _warnings(fake, callers=3)
    assert len(fake.requests) == 2  # one re-send: still one warning per call
    assert sorted(r.detach_id for r in found) == sorted({r.detach_id for r in found})
    assert len(found) == 3


@pytest.mark.parametrize("kind", ["hostdev", "interface"])
async def test_a_hostdev_or_nic_on_a_native_root_port_warns(kind: str) -> None:
    fake, vm = _on_port("pc-q35-7.2", qemu_args=NATIVE_OFF)
    unplug = GuestUnplug.later(0.05)
    if kind == "hostdev":
        vm.add_hostdev("0x05", alias=ALIAS, unplug=unplug, address=PORT)
    else:
        vm.add_interface("52:54:00:00:00:01", alias=ALIAS, unplug=unplug, address=PORT)
    assert [(r.slot, r.timeout) for r in await _warnings(fake)] == [("native-pcie", 1.0)]


async def test_a_device_without_an_address_says_nothing() -> None:
    fake, vm = _on_port("pc-q35-7.2", qemu_args=NATIVE_OFF)
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.later(0.05))
    assert await _warnings(fake) == []


async def test_a_config_only_call_says_nothing() -> None:
    """``live=False`` sends no unplug: no window for the slot to miss."""
    fake, vm = _on_port("pc-q35-7.2", qemu_args=NATIVE_OFF)
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.later(0.05), address=PORT)
    assert await _warnings(fake, live=False) == []
    assert fake.requests == []


async def test_a_domain_without_machine_or_acpi_is_native() -> None:
    """No ``<os machine>`` and no ``<acpi/>``: no ACPI hotplug, so a root
    port hot-plugs natively (the docs' rule: no ``<acpi/>`` is native)."""
    fake, vm = _on_port("")
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.later(0.05), address=PORT)
    assert [r.slot for r in await _warnings(fake)] == ["native-pcie"]


async def test_a_root_port_on_a_machine_other_than_q35_is_native() -> None:
    """ACPI hotplug of root ports is q35's (ICH9); aarch64 ``virt`` (QEMU 7.2)
    has none, ``<acpi/>`` or not: its root ports are pciehp's."""
    fake, vm = _on_port("virt-7.2")
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.later(0.05), address=PORT)
    assert [r.slot for r in await _warnings(fake)] == ["native-pcie"]


async def test_a_reset_on_the_last_attempt_uses_no_attempt() -> None:
    """The first window ran out (one attempt used of two); the guest is reset
    during the second: that request was void, the third is taken, and the
    detach succeeds on the attempts it had."""
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=_held_manual(hold=0.1))
    steps = Steps()
    settings = DetachSettings(attempts=2, timeout=0.5)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=ALIAS))
        await steps.reached("attempt_timed_out")
        await steps.reached("request_sent", 2)  # refused "in progress": the first is pending
        fake.reset_domain("vm")
        await _until_taken(fake, steps, task, 3)
        fake.complete("vm", ALIAS)
        result = await task
    assert result.attempts == 2
    assert steps.kinds.count("request_voided") == 1
    assert steps.kinds.count("attempt_timed_out") == 1


async def test_an_acpi_reset_with_several_reboot_events_is_one_request() -> None:
    """ACPI: the reset completes the pending unplug (DEVICE_REMOVED follows
    the REBOOTs); joined callers all succeed on the one request."""
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias=ALIAS, unplug=GuestUnplug.acpi(30.0))
    steps = Steps()
    settings = DetachSettings(attempts=1, timeout=10.0)
    async with DetachService(backend=fake, settings=settings, hooks=[steps]) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias=ALIAS)) for _ in range(2)]
        await steps.reached("request_sent")
        sink = fake.sink
        assert sink is not None
        sink.domain_rebooted(vm.uuid, vm.name)
        fake.reset_domain("vm")
        results = await asyncio.gather(*tasks)
    assert [(r.attempts, r.confirmed_by) for r in results] == [(1, "event"), (1, "event")]
    assert (len(fake.requests), fake.voided) == (1, 0)
    assert "request_voided" not in steps.kinds
