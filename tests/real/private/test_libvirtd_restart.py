"""libvirtd SIGKILLed and restarted under pending detaches (real daemon, real QEMU).

The daemon is a private one (:mod:`aiodetach_lab.daemon`), never the system's.
Guests have no OS, so PCI (virtio-blk) unplugs stay pending until the test
acknowledges them the way a guest OS does (ACPI eject register, see
``aiodetach_lab.daemon.eject_command``): through libvirt while it is up, or straight on
QEMU's monitor while libvirtd is dead, an unplug completing "while the daemon
was down", whose DEVICE_REMOVED nobody ever receives.
"""

from __future__ import annotations

import asyncio
import time
import uuid as _uuid
from typing import Any

import pytest

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach.errors import ConnectionLost, DetachError, DetachTimeout
from aiodetach_lab.daemon import PrivateLibvirtd, eject_command, pci_slots, qmp
from aiodetach_lab.domains import DiskSpec

from .._real import domains_removed, guest_ejects, live_xml, record_requests, until

TIMEOUT = 8.0  # attempts of domains 3-4, which must time out
LONG_TIMEOUT = 600.0  # attempts of domains 0-2, which must not
DOMAINS = 5
DISKS = 10
FIGURES: dict[str, Any] = {}


def _disks(n: int) -> list[DiskSpec]:
    return [DiskSpec(f"vd{chr(ord('b') + j)}", "virtio", f"ua-d{j}") for j in range(n)]


async def test_sigkill_and_restart_with_50_pending_detaches(
    private_libvirtd: PrivateLibvirtd, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = private_libvirtd
    sent = record_requests(monkeypatch)
    tag = _uuid.uuid4().hex[:6]
    names = [f"rr-{tag}-{i}" for i in range(DOMAINS)]
    disks = _disks(DISKS)
    aliases = [d.alias or "" for d in disks]
    # Domain 2 has one more disk, detached only after the reconnect: its unplug has
    # no re-check to end it (a 600 s window), so only an event on the new
    # connection can confirm it.
    late = _disks(DISKS + 1)[-1].alias or ""
    uuids = [
        await asyncio.to_thread(daemon.define, name, _disks(DISKS + 1) if i == 2 else disks)
        for i, name in enumerate(names)
    ]
    with domains_removed(daemon.uri, uuids):
        slots = [pci_slots(await asyncio.to_thread(live_xml, daemon.uri, u)) for u in uuids]
        # Group roles, by domain:
        #   0, 1  guest releases the devices while libvirtd is dead (the restarted
        #         daemon may replay the removals as events, or the re-check after the
        #         reconnect finds them gone: either confirms each device once)
        #   2     guest releases them after the reconnect (an event on the new
        #         connection or the re-check, whichever comes first)
        #   3     guest releases them after the second request (confirmed in the
        #         second attempt, by its event or by the re-read that ends it)
        #   4     guest never releases them (DetachTimeout after exactly `attempts` requests)
        # Domains 0-2 go through a service whose attempts outlast the test, so their
        # single request holds however long the kill, restart and re-checks take on a
        # slow machine; domains 3-4 through one with short attempts.  Both services
        # share the daemon, so both must notice the kill and reconnect.
        common: dict[str, Any] = {
            "attempts": 2,
            "reconnect_timeout": 30.0,
            "reconnect_backoff_max": 0.5,
        }
        patient = DetachSettings(timeout=LONG_TIMEOUT, **common)
        brisk = DetachSettings(timeout=TIMEOUT, **common)
        async with (
            DetachService(daemon.uri, settings=patient) as svc_patient,
            DetachService(daemon.uri, settings=brisk) as svc_brisk,
        ):
            services = (svc_patient, svc_brisk)
            tasks = {
                (i, alias): asyncio.create_task(
                    (svc_patient if i <= 2 else svc_brisk).detach(names[i], alias=alias)
                )
                for i in range(DOMAINS)
                for alias in aliases
            }
            # The log holds a request once libvirt answered it: all 50 reached
            # libvirtd before the kill, so none may be sent again.
            await until(lambda: len(sent.requests) == DOMAINS * DISKS, 20, "50 requests sent")
            assert [r for r in sent.requests if r.error is not None] == []
            pending_at_kill = sum(len(s.pending()) for s in services)
            assert pending_at_kill == DOMAINS * DISKS
            assert not any(t.done() for t in tasks.values())

            killed_at = time.monotonic()
            await asyncio.to_thread(daemon.kill)
            for i in (0, 1):
                sock = daemon.monitor_socket(names[i])
                commands: list[str | tuple[str, dict[str, object]]] = [
                    ("human-monitor-command", {"command-line": eject_command(slots[i][a])})
                    for a in aliases
                ]
                await asyncio.to_thread(qmp, sock, *commands)
            down_for = time.monotonic() - killed_at
            restart_s = await asyncio.to_thread(daemon.start)
            answered_at = time.monotonic()
            await until(
                lambda: all(s.reconnects == 1 for s in services), 20, "both services to reconnect"
            )
            reconnected_at = time.monotonic()
            # No wait for the re-checks after the reconnect: the restarted daemon may
            # replay the removals it missed, and then a domain's unplugs end by event
            # before any re-check, which a correct library never makes.

            late_task = asyncio.create_task(svc_patient.detach(names[2], alias=late))
            await until(lambda: len(sent.of(uuids[2], late)) == 1, 20, "the late request")
            await asyncio.to_thread(
                guest_ejects, daemon.uri, uuids[2], [slots[2][a] for a in [*aliases, late]]
            )

            def second_sent() -> bool:
                return all(len(sent.of(uuids[3], a)) == 2 for a in aliases)

            await until(second_sent, TIMEOUT + 30, "second requests of domain 3")
            await asyncio.to_thread(
                guest_ejects, daemon.uri, uuids[3], [slots[3][a] for a in aliases]
            )
            async with asyncio.timeout(3 * TIMEOUT + 30):
                outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
                late_result = await late_task
            assert all(s.pending() == [] for s in services)
            assert all(s.reconnects == 1 for s in services)

        results = dict(zip(tasks, outcomes, strict=True))
        lost = [k for k, r in results.items() if not isinstance(r, DetachResult | DetachError)]
        # Timings first, so a failure below still shows how long the outage took.
        FIGURES.update(
            pending_at_kill=pending_at_kill,
            daemon_down_s=round(down_for, 3),
            restart_s=round(restart_s, 3),
            reconnect_after_restart_s=round(reconnected_at - answered_at, 3),
            kill_to_reconnected_s=round(reconnected_at - killed_at, 3),
        )
        print("restart timings:", FIGURES)
        assert lost == []
        assert (late_result.attempts, late_result.confirmed_by) == (1, "event")
        assert len(sent.of(uuids[2], late)) == 1
        for (i, alias), outcome in results.items():
            uuid = uuids[i]
            requests = sent.of(uuid, alias)
            if i == 4:
                assert isinstance(outcome, DetachTimeout), (i, alias, outcome)
                assert outcome.attempts == 2
            else:
                assert isinstance(outcome, DetachResult), (i, alias, outcome)
                assert outcome.attempts == len(requests)
                assert outcome.attempts == (2 if i == 3 else 1), (i, alias, outcome)
                assert outcome.confirmed_by in ("event", "xml"), (i, alias, outcome)
            assert len(requests) == (2 if i >= 3 else 1), (i, alias, requests)
        # No duplicate: a second request only after the first was waited out in full,
        # the reconnect included (the outage did not restart or shorten the wait).
        duplicated = sum(
            1
            for (i, alias) in results
            for a, b in zip(sent.of(uuids[i], alias), sent.of(uuids[i], alias)[1:], strict=False)
            if b - a < TIMEOUT - 0.05
        )
        assert duplicated == 0
        for i, uuid in enumerate(uuids):
            xml = await asyncio.to_thread(live_xml, daemon.uri, uuid)
            present = [a for a in [*aliases, late] if f"'{a}'" in xml]
            assert present == (aliases if i == 4 else []), (i, present)
        FIGURES.update(
            lost=len(lost),
            duplicated=duplicated,
            confirmed_by_xml=sum(
                1 for r in outcomes if isinstance(r, DetachResult) and r.confirmed_by == "xml"
            ),
        )
        print("restart figures:", FIGURES)


async def test_daemon_that_stays_down_gives_connection_lost(
    private_libvirtd: PrivateLibvirtd, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = private_libvirtd
    sent = record_requests(monkeypatch)
    name = f"rd-{_uuid.uuid4().hex[:6]}"
    disks = _disks(3)
    uuid = await asyncio.to_thread(daemon.define, name, disks)
    with domains_removed(daemon.uri, [uuid]):
        settings = DetachSettings(
            attempts=3, timeout=60.0, reconnect_timeout=1.0, reconnect_backoff_max=0.2
        )
        try:
            async with DetachService(daemon.uri, settings=settings) as svc:
                tasks = [asyncio.create_task(svc.detach(name, alias=d.alias or "")) for d in disks]
                await until(lambda: len(sent.requests) == 3, 10, "3 requests sent")
                started = time.monotonic()  # the service cannot notice the loss before
                await asyncio.to_thread(daemon.kill)
                async with asyncio.timeout(15):
                    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                waited = time.monotonic() - started
                assert all(isinstance(o, ConnectionLost) for o in outcomes), outcomes
                assert all("did not come back" in str(o) for o in outcomes)
                # Not before the last reconnect the window allows: the service gives
                # up once its next backoff (at most reconnect_backoff_max, 0.2 s)
                # would end past reconnect_timeout (1 s).  The timeout above bounds
                # it from above, with no wall-clock guess about a loaded machine.
                assert waited >= 1.0 - 0.2, waited
                assert svc.pending() == []
                # Later calls fail at once with the same typed error, not a hang.
                async with asyncio.timeout(2):
                    with pytest.raises(ConnectionLost):
                        await svc.detach(name, alias="ua-d0")
            assert len(sent.requests) == 3
        finally:
            if daemon.pid is None:
                await asyncio.to_thread(daemon.start)
