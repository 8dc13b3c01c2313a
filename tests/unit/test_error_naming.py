"""Every error a caller can cause names the domain and the alias it was given.

Found by a fresh-context adversary: errors raised before the device was found
(domain lookup, the live/persistent checks, an XML read) or by the connection
(ConnectionLost to waiters) left out the alias the caller had named.  Callers
joined to one unplug each get their own exception object and traceback.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.backend import BackendError, ErrorCode
from aiodetach.errors import (
    ConnectionLost,
    DetachError,
    DetachTimeout,
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


async def _until(cond: Any, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition never came"
        await asyncio.sleep(0.005)


async def test_callers_joined_to_one_unplug_do_not_share_one_exception_object() -> None:
    """Two callers of one device whose unplug times out: each should get an
    exception object of its own (a note or attribute one caller adds, or its
    traceback, must not show up in the other's)."""
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.never())
    settings = DetachSettings(timeout=0.1, attempts=1)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        one = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        two = asyncio.create_task(svc.detach("vm", alias="ua-d", persistent=False))
        e1, e2 = await asyncio.gather(one, two, return_exceptions=True)
    assert isinstance(e1, DetachTimeout)
    assert isinstance(e2, DetachTimeout)
    assert len(fake.requests) == 1
    e1.add_note("seen by caller one")
    assert "seen by caller one" not in getattr(e2, "__notes__", [])
    assert e1 is not e2


async def test_a_callers_traceback_is_not_replaced_by_another_callers() -> None:
    """Two different callers of one unplug that fails: the traceback caller
    one holds should go through caller one's code, not caller two's."""
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d", unplug=Unplug.reject())
    async with DetachService(backend=fake, log=False) as svc:

        async def caller_one() -> BaseException:
            try:
                await svc.detach("vm", alias="ua-d", persistent=False)
            except DetachError as exc:
                return exc
            raise AssertionError("no error")

        async def caller_two() -> BaseException:
            try:
                await svc.detach("vm", alias="ua-d", persistent=False)
            except DetachError as exc:
                return exc
            raise AssertionError("no error")

        e1, _e2 = await asyncio.gather(caller_one(), caller_two())
    names = [f.name for f in traceback.extract_tb(e1.__traceback__)]
    assert "caller_one" in names, names


async def test_errors_are_typed_and_name_domain_and_alias() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("vda", alias="ua-r", unplug=Unplug.reject())
    dom.add_disk("vdb", alias="ua-t", unplug=Unplug.never())
    dom.add_disk("vdc", alias="ua-s", unplug=Unplug.manual())
    settings = DetachSettings(timeout=0.1, attempts=2)
    async with DetachService(backend=fake, settings=settings, log=False) as svc:
        tasks = {
            a: asyncio.create_task(svc.detach("vm", alias=a)) for a in ("ua-r", "ua-t", "ua-s")
        }
        await _until(lambda: len(fake.requests) >= 3)
        fake.stop_domain("vm")
        out = {a: await asyncio.gather(t, return_exceptions=True) for a, t in tasks.items()}
    for alias, (err,) in out.items():
        assert isinstance(err, DetachError), err
        assert err.domain == "vm", err
        assert err.alias == alias, err
