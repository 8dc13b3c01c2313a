"""The detach protocol, rule by rule, against the fake hypervisor."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from _probes import loop_lag
from aiodetach import DetachService, DetachSettings
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import (
    ConnectionLost,
    DetachError,
    DetachFailed,
    DetachRefused,
    DetachTimeout,
    DeviceNotFound,
    DomainNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    DomainStopped,
    InvalidRequest,
    ReadOnlyConnection,
    ServiceClosed,
)
from aiodetach.testing import FakeHypervisor, Unplug

# -- live detach ---------------------------------------------------------------------


async def test_event_during_the_call_is_not_lost(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.now())
    result = await svc.detach("vm", alias="ua-disk1")
    assert result.live
    assert result.persistent
    assert result.confirmed_by == "event"
    assert result.attempts == 1
    assert len(fake.requests) == 1


async def test_event_after_the_call(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-disk1", unplug=Unplug.later(0.05))
    result = await svc.detach("vm", target="vdb", persistent=False)
    assert (result.live, result.persistent, result.attempts) == (True, False, 1)
    assert result.confirmed_by == "event"


async def test_late_event_within_the_second_attempt(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    # 0.2 s timeout; the guest answers the first request after 0.3 s.  The
    # timeout re-reads the XML (still there), sends again, and the first
    # unplug's event then completes the detach.
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.3))
    result = await svc.detach("vm", alias="ua-d")
    assert result.attempts == 2
    assert result.confirmed_by == "event"


async def test_guest_that_never_answers_times_out_after_exactly_attempts(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    started = time.monotonic()
    with pytest.raises(DetachTimeout) as info:
        await svc.detach("vm", alias="ua-d")
    assert len(fake.requests) == svc.settings.attempts == 3
    assert info.value.attempts == 3
    assert info.value.domain == "vm"
    assert info.value.alias == "ua-d"
    assert time.monotonic() - started >= 3 * 0.2 * 0.9
    # Every re-send was preceded by a fresh read of the live XML.
    sequence = [c for c in fake.calls if c in ("domain_xml", "detach_live")]
    # (The last read is the check after the final timeout, before giving up.)
    assert sequence[-6:] == ["detach_live", "domain_xml"] * 3


async def test_lost_event_is_covered_by_the_xml_recheck(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.01, emit_event=False))
    result = await svc.detach("vm", alias="ua-d")
    assert result.confirmed_by == "xml"
    assert result.attempts == 1, "no second request once the XML shows it gone"


async def test_lost_event_on_the_last_attempt_is_still_success(
    fake: FakeHypervisor, make_svc: object
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.01, emit_event=False))
    async with DetachService(backend=fake, settings=DetachSettings(attempts=1, timeout=0.1)) as svc:
        result = await svc.detach("vm", alias="ua-d")
    assert result.confirmed_by == "xml"


async def test_removal_failed_is_fatal_and_not_retried(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.reject(0.01))
    with pytest.raises(DetachFailed) as info:
        await svc.detach("vm", alias="ua-d")
    assert len(fake.requests) == 1
    assert (info.value.domain, info.value.alias) == ("vm", "ua-d")


async def test_lost_first_request_is_resent_after_timeout(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    # A guest still in firmware drops the first unplug request.
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug("remove", lose_first=1))
    result = await svc.detach("vm", alias="ua-d")
    assert result.attempts == 2
    assert result.confirmed_by == "event"


async def test_in_progress_error_means_keep_waiting(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    # Native PCIe hotplug: a re-send while the unplug is pending is refused
    # with "already in the process of unplug"; that is not a failure.
    fake.add_domain("vm").add_disk(
        "vdb", alias="ua-d", unplug=Unplug.later(0.5, refuse_while_pending=True)
    )
    result = await svc.detach("vm", alias="ua-d")
    assert result.confirmed_by == "event"
    assert result.attempts == 3
    assert [r.while_pending for r in fake.requests] == [False, True, True]


async def test_device_gone_between_lookup_and_request(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())

    def vanish(name: str) -> None:
        if name == "detach_live":
            fake.complete("vm", "ua-d", emit=False)

    fake.before_call = vanish
    result = await svc.detach("vm", alias="ua-d", persistent=False)
    assert result.confirmed_by == "xml"


# -- coalescing ----------------------------------------------------------------------


async def test_concurrent_callers_share_one_request(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.1))
    results = await asyncio.gather(
        svc.detach("vm", alias="ua-d", persistent=False),
        svc.detach("vm", target="vdb", persistent=False),
        svc.detach("vm", alias="ua-d", persistent=False),
    )
    assert len(fake.requests) == 1
    assert fake.max_in_flight == 1
    assert [r.joined for r in results] == [False, True, True]
    assert {r.alias for r in results} == {"ua-d"}


async def test_joined_callers_share_the_error(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    results = await asyncio.gather(
        svc.detach("vm", alias="ua-d", persistent=False),
        svc.detach("vm", alias="ua-d", persistent=False),
        return_exceptions=True,
    )
    assert all(isinstance(r, DetachTimeout) for r in results)
    assert len(fake.requests) == 3  # attempts, not attempts x callers


async def test_different_devices_are_independent(fake: FakeHypervisor, svc: DetachService) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-1", unplug=Unplug.later(0.05))
    vm.add_disk("vdc", alias="ua-2", unplug=Unplug.reject(0.05))
    ok, failed = await asyncio.gather(
        svc.detach("vm", alias="ua-1"), svc.detach("vm", alias="ua-2"), return_exceptions=True
    )
    assert not isinstance(ok, BaseException)
    assert ok.live
    assert isinstance(failed, DetachFailed)


# -- cancellation --------------------------------------------------------------------


async def test_cancelling_one_caller_leaves_the_other(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    first = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    while len(fake.requests) < 1:
        await asyncio.sleep(0.001)
    # Started once the first caller's unplug is in flight, so it joins that one
    # (started together, whichever lookup returned first would own the unplug).
    second = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert svc.pending() != []
    fake.complete("vm", "ua-d")
    result = await second
    assert result.live
    assert result.joined
    assert svc.pending() == []


async def test_cancelling_the_last_caller_keeps_the_pending_request(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    """The unplug belongs to the device: with nobody waiting, the request in
    the guest is remembered until its window ends, and a new request joins it."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    while not fake.requests:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(svc.pending()) == 1
    again = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    await asyncio.sleep(0.01)
    fake.complete("vm", "ua-d")
    result = await again
    assert result.joined
    assert len(fake.requests) == 1
    assert svc.pending() == []


async def test_aclose_with_detaches_in_flight(fake: FakeHypervisor, fast: DetachSettings) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    svc = DetachService(backend=fake, settings=fast)
    await svc.open()
    tasks = [
        asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False)) for _ in range(3)
    ]
    while not fake.requests:
        await asyncio.sleep(0.001)
    await svc.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ServiceClosed) for r in results), results
    assert svc.pending() == []
    assert not fake.connected
    await svc.aclose()  # idempotent
    with pytest.raises(ServiceClosed):
        await svc.detach("vm", alias="ua-d")


async def test_aclose_is_shielded_from_cancellation(
    fake: FakeHypervisor, fast: DetachSettings
) -> None:
    fake.add_domain("vm")
    svc = DetachService(backend=fake, settings=fast)
    await svc.open()
    gate = threading.Event()
    fake.before_call = lambda name: gate.wait(2) if name == "close" else None
    closer = asyncio.create_task(svc.aclose())
    await asyncio.sleep(0.01)
    closer.cancel()
    await asyncio.sleep(0.01)
    assert not closer.done(), "the close must not be abandoned half way"
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert not fake.connected


# -- persistent ----------------------------------------------------------------------


async def test_persistent_only_on_a_shut_off_domain(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    vm = fake.add_domain("vm", running=False)
    vm.add_disk("vdb", alias="ua-d")
    result = await svc.detach("vm", alias="ua-d")
    assert (result.live, result.persistent, result.attempts) == (False, True, 0)
    assert fake.requests == []
    assert len(fake.config_requests) == 1


async def test_persistent_not_found_is_ignored_when_live_follows(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    # Hot-plugged live only: not in the persistent definition.
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", config=False)
    result = await svc.detach("vm", alias="ua-d", live=True, persistent=True)
    assert (result.live, result.persistent) == (True, False)


async def test_persistent_not_found_by_libvirt_is_ignored_when_live_follows(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    fake.fail_next["detach_config"] = BackendError(
        ErrorCode.DEVICE_MISSING, "device not found: disk vdb not found"
    )
    result = await svc.detach("vm", alias="ua-d")
    assert (result.live, result.persistent) == (True, False)


async def test_other_persistent_errors_are_fatal_and_skip_live(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    fake.fail_next["detach_config"] = BackendError(
        ErrorCode.OPERATION_FAILED, "operation failed: device is busy"
    )
    with pytest.raises(DetachRefused) as info:
        await svc.detach("vm", alias="ua-d")
    assert info.value.libvirt_code == ErrorCode.OPERATION_FAILED
    assert fake.requests == [], "the live detach must not start after a fatal persistent error"


async def test_persistent_only_device_missing_is_device_not_found(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm", running=False)
    with pytest.raises(DeviceNotFound):
        await svc.detach("vm", target="vdz", persistent=True)


async def test_persistent_is_sent_once(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    with pytest.raises(DetachTimeout):
        await svc.detach("vm", alias="ua-d")
    assert len(fake.config_requests) == 1
    assert len(fake.requests) == 3


async def test_mac_selector_and_interface(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_interface("52:54:00:AA:BB:CC", alias="ua-net1")
    result = await svc.detach("vm", mac="52:54:00:aa:bb:cc")
    assert result.alias == "ua-net1"
    assert "interface" in result.device


async def test_xml_selector(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_hostdev("0x05", alias="hostdev0")
    xml = (
        "<hostdev mode='subsystem' type='pci'><source>"
        "<address domain='0x0000' bus='0x05' slot='0x00' function='0x0'/></source></hostdev>"
    )
    result = await svc.detach("vm", xml=xml)
    assert result.alias == "hostdev0"


async def test_lookup_by_uuid(fake: FakeHypervisor, svc: DetachService) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d")
    result = await svc.detach(vm.uuid, alias="ua-d")
    assert result.domain_name == "vm"
    assert result.domain_uuid == vm.uuid


# -- errors --------------------------------------------------------------------------


async def test_unknown_domain(svc: DetachService) -> None:
    with pytest.raises(DomainNotFound) as info:
        await svc.detach("nope", alias="ua-d")
    assert info.value.domain == "nope"
    assert info.value.libvirt_code == ErrorCode.NO_DOMAIN
    assert "nope" in str(info.value)


@pytest.mark.parametrize(
    "selector", [{"alias": "ua-nope"}, {"target": "vdz"}, {"mac": "52:54:00:00:00:99"}]
)
async def test_unknown_device(
    fake: FakeHypervisor, svc: DetachService, selector: dict[str, Any]
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    with pytest.raises(DeviceNotFound) as info:
        await svc.detach("vm", **selector)
    assert info.value.domain == "vm"
    assert fake.requests == []
    assert fake.config_requests == []


async def test_live_on_shut_off_domain(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm", running=False).add_disk("vdb", alias="ua-d")
    with pytest.raises(DomainNotRunning) as info:
        await svc.detach("vm", alias="ua-d", live=True)
    assert info.value.domain == "vm"


async def test_persistent_on_transient_domain(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm", persistent=False).add_disk("vdb", alias="ua-d")
    with pytest.raises(DomainNotPersistent):
        await svc.detach("vm", alias="ua-d", persistent=True)


async def test_transient_domain_defaults_to_live_only(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm", persistent=False).add_disk("vdb", alias="ua-d")
    result = await svc.detach("vm", alias="ua-d")
    assert (result.live, result.persistent) == (True, False)
    assert fake.config_requests == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"alias": "a", "target": "vdb"}, "exactly one"),
        ({"alias": ""}, "must not be empty"),
        ({"alias": "  "}, "must not be empty"),
        ({"alias": 5}, "must be a string"),
        ({"mac": "zz:zz"}, "not a MAC"),
        ({"xml": "<disk><target dev='vdb'"}, "malformed device XML"),
        ({"xml": "<!DOCTYPE x [<!ENTITY a 'b'>]><disk/>"}, "DTD"),
        ({"xml": "<disk type='file'/>"}, "cannot tell"),
        ({"alias": "ua-d", "live": False, "persistent": False}, "nothing to detach"),
        ({"alias": "ua-d", "live": "yes"}, "must be True, False or None"),
    ],
)
async def test_invalid_requests(
    fake: FakeHypervisor, svc: DetachService, kwargs: dict[str, object], message: str
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    with pytest.raises(InvalidRequest, match=message):
        await svc.detach("vm", **kwargs)  # type: ignore[arg-type]
    assert fake.requests == []
    assert fake.config_requests == []


@pytest.mark.parametrize("domain", ["", "   ", None, 42, "a\x00b"])
async def test_invalid_domain_refs(svc: DetachService, domain: object) -> None:
    with pytest.raises(InvalidRequest):
        await svc.detach(domain, alias="ua-d")


async def test_hypervisor_refusal_is_typed_with_code(
    fake: FakeHypervisor, svc: DetachService
) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    fake.fail_next["detach_live"] = BackendError(
        ErrorCode.INTERNAL_ERROR,
        "internal error: unable to execute QEMU command 'device_del': "
        "Bus 'pci.0' does not support hotplugging",
    )
    with pytest.raises(DetachError) as info:
        await svc.detach("vm", alias="ua-d", persistent=False)
    assert info.value.libvirt_code == ErrorCode.INTERNAL_ERROR
    assert "does not support hotplugging" in str(info.value)
    assert len(fake.calls) > 0


async def test_read_only_service_refuses_detach(fake: FakeHypervisor, fast: DetachSettings) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    async with DetachService(backend=fake, settings=fast, read_only=True) as svc:
        with pytest.raises(ReadOnlyConnection):
            await svc.detach("vm", alias="ua-d")
    assert fake.requests == []


async def test_unreachable_daemon_at_open(fake: FakeHypervisor, fast: DetachSettings) -> None:
    fake.daemon_up = False
    svc = DetachService(backend=fake, settings=fast)
    with pytest.raises(ConnectionLost) as info:
        await svc.open()
    assert "Connection refused" in str(info.value)


# -- domain lifecycle --------------------------------------------------------------


@pytest.mark.parametrize("reason", ["destroyed", "shutdown", "migrated", "crashed"])
async def test_domain_stopping_wakes_waiters_at_once(fake: FakeHypervisor, reason: str) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(attempts=8, timeout=30)
    async with DetachService(backend=fake, settings=settings) as svc:
        tasks = [asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))] * 1
        tasks.append(asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False)))
        while not fake.requests:
            await asyncio.sleep(0.001)
        started = time.monotonic()
        fake.stop_domain("vm", reason)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert time.monotonic() - started < 1.0
        for r in results:
            assert isinstance(r, DomainStopped)
            assert r.reason == reason
            assert (r.domain, r.alias) == ("vm", "ua-d")


async def test_transient_domain_vanishing_mid_wait(
    fake: FakeHypervisor, fast: DetachSettings
) -> None:
    fake.add_domain("vm", persistent=False).add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    async with DetachService(backend=fake, settings=fast) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d"))
        while not fake.requests:
            await asyncio.sleep(0.001)
        # Simulate the lifecycle event being lost: only the XML re-check sees it.
        with fake._lock:
            fake.domains.clear()
        with pytest.raises(DomainStopped) as info:
            await task
        assert info.value.reason == "undefined"


# -- daemon restarts (fake) ------------------------------------------------------------


async def test_reconnect_and_reconcile_removed_while_down(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=2, timeout=5, reconnect_timeout=5)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        while not fake.requests:
            await asyncio.sleep(0.001)
        fake.crash()
        fake.complete("vm", "ua-d")  # the unplug finishes while the daemon is down
        await asyncio.sleep(0.05)
        fake.restart()
        result = await asyncio.wait_for(task, 3)
        assert result.confirmed_by == "xml"
        assert len(fake.requests) == 1, "no duplicate request after the reconnect"
        assert svc.reconnects == 1


async def test_reconnect_keeps_waiting_without_resending(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=2, timeout=1.0, reconnect_timeout=5)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        while not fake.requests:
            await asyncio.sleep(0.001)
        fake.crash()
        fake.restart()
        await asyncio.sleep(0.3)
        assert len(fake.requests) == 1
        fake.complete("vm", "ua-d")
        result = await asyncio.wait_for(task, 3)
        assert result.confirmed_by == "event"
        assert result.attempts == 1


async def test_daemon_down_past_the_limit_is_connection_lost(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=2, timeout=5, reconnect_timeout=0.3)
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        while not fake.requests:
            await asyncio.sleep(0.001)
        fake.crash()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(task, 3)
        with pytest.raises(ConnectionLost):
            await svc.detach("vm", alias="ua-d")


async def test_daemon_is_given_up_on_only_after_the_whole_limit(fake: FakeHypervisor) -> None:
    """Rule 7: "if the daemon stays away longer than ``reconnect_timeout``":
    not when the next backoff would cross the bound, but once it was tried at
    the bound (with the backoff as large as the limit, a give-up before the
    bound would come ~half a limit early)."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(
        attempts=2, timeout=5, reconnect_timeout=1.0, reconnect_backoff_max=1.0
    )
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        while not fake.requests:
            await asyncio.sleep(0.001)
        lost_at = time.monotonic()
        fake.crash()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(task, 5)
        assert time.monotonic() - lost_at >= 1.0


# -- the event loop stays free ---------------------------------------------------------


async def test_blocking_calls_do_not_stall_the_loop(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    for i in range(8):
        vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-{i}", unplug=Unplug.now())
    fake.call_latency = 0.3  # each request blocks its thread, like detachDeviceFlags
    async with (
        DetachService(backend=fake, settings=DetachSettings(max_threads=8)) as svc,
        loop_lag() as lag,
    ):
        results = await asyncio.gather(
            *(svc.detach("vm", alias=f"ua-{i}", persistent=False) for i in range(8))
        )
    assert all(r.live for r in results)
    # Eight 0.3 s calls in series on the loop would stall it 2.4 s; threaded,
    # the loop keeps ticking (generous bound: a noisy 2-core box).
    assert lag.worst < 0.25


async def test_reads_handed_to_threads_are_bounded(
    fake: FakeHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 detaches started together queue at most ``max_threads`` reads at a
    time, so their answers (whole domain XMLs) cannot pile up on the loop."""
    vm = fake.add_domain("vm")
    for i in range(200):
        vm.add_disk(f"vd{i}", alias=f"ua-{i}", unplug=Unplug.now())
    loop = asyncio.get_running_loop()
    submit = loop.run_in_executor
    outstanding = peak = 0

    def counting(executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        nonlocal outstanding, peak
        future = submit(executor, func, *args)
        reads = (fake.lookup, fake.domain_xml, fake.detach_config)
        if getattr(func, "__wrapped__", None) in reads:  # live requests have their own path
            outstanding += 1
            peak = max(peak, outstanding)

            def done(_f: asyncio.Future[Any]) -> None:
                nonlocal outstanding
                outstanding -= 1

            future.add_done_callback(done)
        return future

    monkeypatch.setattr(loop, "run_in_executor", counting)
    async with DetachService(backend=fake, settings=DetachSettings(max_threads=4)) as svc:
        results = await asyncio.gather(*(svc.detach("vm", alias=f"ua-{i}") for i in range(200)))
    assert len(results) == 200
    assert 1 <= peak <= 4, peak


async def test_attempt_clock_starts_when_libvirt_has_the_request(fake: FakeHypervisor) -> None:
    """A request that waited for a worker thread still gets its full timeout.

    One worker thread; the first live request blocks it for 1 s (as
    ``detachDeviceFlags`` may), so the second device's request reaches
    libvirt 1 s after it was queued.  Each guest must still get ``timeout``
    from the moment libvirt had its request before a second one: a clock
    started at queueing time would have run out and re-sent at once.
    """
    vm = fake.add_domain("vm")
    for alias in ("ua-a", "ua-b"):
        vm.add_disk(f"vd{alias[-1]}", alias=alias, unplug=Unplug.never())
    blocked: list[str] = []

    def block_the_first_request(method: str) -> None:
        if method == "detach_live" and not blocked:
            blocked.append(method)
            time.sleep(1.0)

    fake.before_call = block_the_first_request
    settings = DetachSettings(attempts=2, timeout=0.5, max_threads=1)
    async with DetachService(backend=fake, settings=settings) as svc:
        outcomes = await asyncio.gather(
            *(svc.detach("vm", alias=a, persistent=False) for a in ("ua-a", "ua-b")),
            return_exceptions=True,
        )
    assert all(isinstance(o, DetachTimeout) for o in outcomes), outcomes
    for alias in ("ua-a", "ua-b"):
        first, second = [r.at for r in fake.requests if r.alias == alias]
        assert second - first >= 0.5 - 0.02, (alias, second - first)


async def test_logs_are_namespaced_and_bound(fake: FakeHypervisor, svc: DetachService) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    with capture_logs() as logs, pytest.raises(DetachTimeout):
        await svc.detach("vm", alias="ua-d", persistent=False)
    sent = [e for e in logs if e["event"] == "aiodetach.detach_sent"]
    assert [e["attempt"] for e in sent] == [1, 2, 3]
    assert all(e["domain"] == "vm" and e["alias"] == "ua-d" for e in sent)
    assert all(e["event"].startswith("aiodetach.") for e in logs)
    assert not any("<domain" in str(v) for e in logs for v in e.values())


async def test_events_stream(fake: FakeHypervisor, svc: DetachService) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.later(0.02))
    seen = []

    async def watch() -> None:
        async for event in svc.events("vm"):
            seen.append(event)
            return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    await svc.detach("vm", alias="ua-d")
    await asyncio.wait_for(watcher, 2)
    assert seen[0].kind == "device-removed"
    assert seen[0].alias == "ua-d"


async def test_service_revives_when_the_daemon_comes_back_later(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.now())
    settings = DetachSettings(attempts=2, timeout=5, reconnect_timeout=0.2)
    async with DetachService(backend=fake, settings=settings) as svc:
        fake.crash()
        await asyncio.sleep(0.4)  # the reconnect gives up
        with pytest.raises(ConnectionLost):
            await svc.detach("vm", alias="ua-d")
        fake.restart()
        result = await svc.detach("vm", alias="ua-d")
        assert result.live
        assert svc.reconnects == 1


async def test_close_wakes_callers_waiting_for_a_reconnect(fake: FakeHypervisor) -> None:
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.manual())
    settings = DetachSettings(attempts=2, timeout=5, reconnect_timeout=30)
    svc = DetachService(backend=fake, settings=settings)
    await svc.open()
    task = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
    while not fake.requests:
        await asyncio.sleep(0.001)
    fake.crash()
    await asyncio.sleep(0.05)
    late = asyncio.create_task(svc.detach("vm", alias="ua-d"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(svc.aclose(), 5)
    for t in (task, late):
        with pytest.raises(ServiceClosed):
            await asyncio.wait_for(t, 5)
    assert svc.pending() == []
