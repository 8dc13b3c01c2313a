"""A re-send's row has no answer time until libvirt answers it (docs/journal.md,
"Maybe sent").

A restart counts the last request's window from its recorded answer, or from
the restart itself when the process died inside the call.  The row of an
unplug's second request must therefore not keep the first one's answer time
while the second is inside libvirt (queued behind a job, say): a process
killed there would count the second request's window from the first answer,
long over, and re-send into it at once.  On the fake hypervisor.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from _probes import until
from aiodetach import DetachService
from aiodetach.testing import FakeHypervisor, GuestUnplug

from ._journal_support import journal_rows, journal_settings


async def test_a_resend_inside_libvirt_has_no_answer_time(
    fake: FakeHypervisor, tmp_path: Path
) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-d", unplug=GuestUnplug.never())
    journal = tmp_path / "j.db"
    settings = journal_settings(attempts=2, timeout=0.3)
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        caller = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        await until(lambda: len(fake.requests) == 1, 10, "the first request")
        await until(lambda: journal_rows(journal)[0]["answered_at"] is not None, 10, "its answer")
        fake.hold_job("vm")  # the re-send waits inside libvirt
        await until(lambda: journal_rows(journal)[0]["sent"] == 2, 10, "the re-send noted")
        row = journal_rows(journal)[0]
        assert row["answered_at"] is None, "the first request's answer time was kept"
        fake.release_job("vm")
        await asyncio.gather(caller, return_exceptions=True)
    assert len(fake.requests) == 2
    assert journal_rows(journal)[0]["answered_at"] is not None
