"""An unplug's records say when the attempt's window ends (a progress display
shows the time left in the attempt from it), on the fake hypervisor."""

from __future__ import annotations

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachTimeout
from aiodetach.instrumentation import Record, UnplugRecord
from aiodetach.testing import FakeHypervisor, Unplug


async def test_request_sent_carries_the_window_end_and_later_steps_none() -> None:
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-never", unplug=Unplug.never())
    seen: list[UnplugRecord] = []

    def hook(record: Record) -> None:
        if isinstance(record, UnplugRecord):
            seen.append(record)

    settings = DetachSettings(attempts=2, timeout=0.3)
    async with DetachService("fake:///", backend=fake, settings=settings, hooks=[hook]) as svc:
        with pytest.raises(DetachTimeout):
            await svc.detach("vm", alias="ua-never", persistent=False)
    sent = [r for r in seen if r.kind == "request_sent"]
    assert [r.attempt for r in sent] == [1, 2]
    for record in sent:
        assert record.deadline is not None
        # The window starts when libvirt answered, just before the record.
        assert 0 < record.deadline - record.time <= 0.3
    assert sent[1].deadline is not None
    assert sent[0].deadline is not None
    assert sent[1].deadline > sent[0].deadline
    timed_out = [r for r in seen if r.kind == "attempt_timed_out"]
    assert timed_out
    assert all(r.deadline is None for r in timed_out)
    assert all(r.deadline is None for r in seen if r.kind in ("started", "ended", "timed_out"))
