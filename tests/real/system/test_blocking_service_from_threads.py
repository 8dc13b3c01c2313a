"""The blocking facade against a real libvirtd + QEMU, OS-less guests, from
many threads at once: 32 threads detach 32 SCSI disks (their unplugs complete
inside QEMU), 8 threads detach one virtio-blk disk (never acknowledged by an
OS-less guest) and share one unplug, one request, until the guest is
destroyed under them."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest

from aiodetach import BlockingDetachService, DetachResult, DetachSettings
from aiodetach.errors import DomainStopped
from aiodetach.instrumentation import DetachRecord, Record, UnplugRecord
from aiodetach_lab import domains as _lab
from aiodetach_lab.requests import RequestLog

WAIT = 300.0  # bounds waits for conditions against a hang only (a slow, shared machine)
GUESTS = 4
DISKS_EACH = 8


class Steps:
    """A hook counting (kind, alias) of every record, with waits on conditions."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str | None]] = Counter()
        self.cond = threading.Condition()

    def __call__(self, record: Record) -> None:
        if isinstance(record, (UnplugRecord, DetachRecord)):
            with self.cond:
                self.counts[(record.kind, record.alias)] += 1
                self.cond.notify_all()

    def wait_joined(self, alias: str, n: int) -> None:
        def on() -> int:
            return self.counts[("unplug_started", alias)] + self.counts[("unplug_joined", alias)]

        with self.cond:
            assert self.cond.wait_for(
                lambda: on() >= n and self.counts[("request_sent", alias)] >= 1, WAIT
            )


def _scsi(guest: int) -> tuple[_lab.DiskSpec, ...]:
    return tuple(
        _lab.DiskSpec(f"sd{chr(ord('a') + i)}", "scsi", alias=f"ua-g{guest}-d{i}")
        for i in range(DISKS_EACH)
    )


@pytest.fixture
def guests(libvirtd: str) -> Iterator[list[_lab.LabDomain]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(_lab.throwaway_domain(libvirtd, disks=_scsi(g)))
            for g in range(GUESTS)
        ]


@pytest.fixture
def pci_guest(libvirtd: str) -> Iterator[_lab.LabDomain]:
    disks = (_lab.DiskSpec("vdb", "virtio", alias="ua-shared"),)
    with _lab.throwaway_domain(libvirtd, disks=disks) as dom:
        yield dom


def test_32_threads_on_32_disks_and_8_threads_on_one(
    libvirtd: str,
    guests: list[_lab.LabDomain],
    pci_guest: _lab.LabDomain,
    sent: RequestLog,
) -> None:
    steps = Steps()
    settings = DetachSettings(attempts=2, timeout=120.0)
    jobs = [(dom.name, f"ua-g{g}-d{i}") for g, dom in enumerate(guests) for i in range(DISKS_EACH)]
    assert len(jobs) == 32
    start = threading.Barrier(40)
    with BlockingDetachService(libvirtd, settings=settings, hooks=[steps]) as svc:

        def detach(domain: str, alias: str) -> DetachResult | BaseException:
            start.wait(WAIT)
            try:
                return svc.detach(domain, alias=alias)
            except BaseException as exc:  # the test looks at it
                return exc

        with ThreadPoolExecutor(max_workers=40) as pool:
            own = [pool.submit(detach, dom, alias) for dom, alias in jobs]
            shared = [pool.submit(detach, pci_guest.name, "ua-shared") for _ in range(8)]
            results = [f.result(WAIT) for f in own]
            # The eight share one unplug, one request; an OS-less guest never
            # answers it: destroying the guest ends it for all of them at once.
            steps.wait_joined("ua-shared", 8)
            conn = libvirt.open(libvirtd)
            try:
                conn.lookupByName(pci_guest.name).destroy()
            finally:
                conn.close()
            stopped = [f.result(WAIT) for f in shared]

    assert all(isinstance(r, DetachResult) for r in results), results
    assert [r.alias for r in results if isinstance(r, DetachResult)] == [a for _, a in jobs]
    assert all(
        r.live and r.persistent and r.attempts == 1 for r in results if isinstance(r, DetachResult)
    )
    assert all(type(e) is DomainStopped for e in stopped), stopped
    assert {(e.domain, e.alias, e.reason) for e in stopped if isinstance(e, DomainStopped)} == {
        (pci_guest.name, "ua-shared", "destroyed")
    }
    assert len(sent.matching("ua-shared")) == 1
    assert Counter(r.alias for r in sent.requests if r.alias != "ua-shared") == Counter(
        {alias: 1 for _, alias in jobs}
    )
