"""Every error a caller can cause names the domain and the alias it was given.

Found by a fresh-context adversary: errors raised before the device was found
(domain lookup, the live/persistent checks, an XML read) or by the connection
(ConnectionLost to waiters) left out the alias the caller had named.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import (
    ConnectionLost,
    DetachError,
    DomainNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    DomainStopped,
    HypervisorError,
)
from aiodetach.testing import FakeHypervisor, Unplug

CASES: dict[str, type[DetachError]] = {
    "no such domain": DomainNotFound,
    "live=True on a shut-off domain": DomainNotRunning,
    "persistent=True on a transient domain": DomainNotPersistent,
    "the XML read fails": HypervisorError,
    "libvirtd gone for good": ConnectionLost,
}


@pytest.mark.parametrize("case", list(CASES))
async def test_error_names_domain_and_alias(fake: FakeHypervisor, case: str) -> None:
    vm = fake.add_domain(
        "vm",
        running=case != "live=True on a shut-off domain",
        persistent=case != "persistent=True on a transient domain",
    )
    vm.add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    kwargs: dict[str, Any] = {}
    if case == "live=True on a shut-off domain":
        kwargs = {"live": True}
    elif case == "persistent=True on a transient domain":
        kwargs = {"persistent": True}
    elif case == "the XML read fails":
        fake.fail_next["domain_xml"] = BackendError(ErrorCode.INTERNAL_ERROR, "boom")
    settings = DetachSettings(
        attempts=2, timeout=5, reconnect_timeout=0.3, reconnect_backoff_max=0.05
    )
    domain = "nope" if case == "no such domain" else "vm"
    async with DetachService(backend=fake, settings=settings) as svc:
        task = asyncio.create_task(svc.detach(domain, alias="ua-d", **kwargs))
        if case == "libvirtd gone for good":
            while not fake.requests:
                await asyncio.sleep(0.005)
            fake.crash()
        with pytest.raises(CASES[case]) as info:
            await task
    assert (info.value.domain, info.value.alias) == (domain, "ua-d")
    assert "ua-d" in str(info.value)


async def test_stop_during_the_state_read_keeps_libvirts_reason(fake: FakeHypervisor) -> None:
    """The domain is destroyed while the state is read after a window: the
    caller learns libvirt's detail ("destroyed"), not a generic "stopped"."""
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    lookups = 0

    def destroy_during_state_read(name: str) -> None:
        nonlocal lookups
        if name == "lookup":
            lookups += 1
            if lookups == 2:
                fake.stop_domain("vm", "destroyed")
                time.sleep(0.05)

    fake.before_call = destroy_during_state_read
    async with DetachService(backend=fake, settings=DetachSettings(timeout=0.2)) as svc:
        with pytest.raises(DomainStopped) as info:
            await svc.detach("vm", alias="ua-d", persistent=False)
    assert info.value.reason == "destroyed"
