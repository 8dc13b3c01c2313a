"""Public names that were renamed keep working under their former name."""

from __future__ import annotations

import aiodetach.testing
from aiodetach import DetachService, DetachSettings
from aiodetach.testing import FakeHypervisor, GuestUnplug, Unplug


def test_guest_unplug_is_the_fakes_unplug_under_its_new_name() -> None:
    assert Unplug is GuestUnplug
    assert {"GuestUnplug", "Unplug"} <= set(aiodetach.testing.__all__)
    assert GuestUnplug.later(0.05) == Unplug("later", 0.05)


async def test_a_device_planned_with_the_former_name_is_detached(fake: FakeHypervisor) -> None:
    vm = fake.add_domain("vm")
    vm.add_disk("vdb", alias="ua-old", unplug=Unplug.now())
    vm.add_disk("vdc", alias="ua-new", unplug=GuestUnplug.now())
    async with DetachService(backend=fake, settings=DetachSettings(timeout=1.0)) as svc:
        for alias in ("ua-old", "ua-new"):
            result = await svc.detach("vm", alias=alias)
            assert result.confirmed_by == "event"
    assert len(fake.requests) == 2


def test_the_blocking_facade_and_its_error_are_public() -> None:
    import aiodetach
    import aiodetach.errors

    assert "BlockingDetachService" in aiodetach.__all__
    assert aiodetach.BlockingDetachService.__module__ == "aiodetach._blocking"
    assert "CalledFromEventLoop" in aiodetach.errors.__all__
    assert issubclass(aiodetach.errors.CalledFromEventLoop, aiodetach.errors.DetachError)
    assert issubclass(aiodetach.errors.CalledFromEventLoop, RuntimeError)
