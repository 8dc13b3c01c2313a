"""A request that never reached libvirtd is not an attempt (docs/protocol.md, rule 7).

libvirt's client checks its socket before it writes a call: "client socket is
closed" (the daemon closed this connection: an admin's ``virt-admin
client-disconnect``, a daemon-side idle timeout, a restart) means the call was
never sent.  Such a request is not counted, the connection is re-made, and the
request goes out once it is back, within the same ``attempts``.  A connection
failure that may have come after the call reached libvirtd (*maybe sent*) is
waited out as a sent request instead: re-sending at once could interrupt the
unplug it started.  On the fake hypervisor.
"""

from __future__ import annotations

import asyncio

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.backend import BackendError, ErrorCode, ErrorDomain
from aiodetach.errors import DetachTimeout
from aiodetach.testing import FakeHypervisor, GuestUnplug

SETTINGS = DetachSettings(attempts=1, timeout=1.0, reconnect_backoff_max=0.05)


def _socket_closed() -> BackendError:
    return BackendError(
        ErrorCode.INTERNAL_ERROR, "internal error: client socket is closed", origin=ErrorDomain.RPC
    )


def _reply_lost() -> BackendError:
    return BackendError(
        ErrorCode.SYSTEM_ERROR,
        "End of file while reading data: Input/output error",
        origin=ErrorDomain.RPC,
    )


async def test_a_request_failed_in_the_client_goes_out_once_back() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=GuestUnplug.later(0.05))
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.fail_next["detach_live"] = _socket_closed()
        result = await svc.detach("vm", alias="ua-d", persistent=False)
        assert svc.reconnects == 1
    # One attempt was allowed, and it was spent on the request that reached
    # the daemon: the one that failed in the client did not count.
    assert (result.attempts, result.confirmed_by) == (1, "event")
    assert [r.alias for r in fake.requests] == ["ua-d"]
    assert fake.calls.count("detach_live") == 2


async def test_a_request_whose_reply_was_lost_is_waited_out_not_resent() -> None:
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    dom.add_disk("sdb", alias="ua-d", unplug=GuestUnplug.never())
    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.fail_next["detach_live"] = _reply_lost()
        with pytest.raises(DetachTimeout) as caught:
            await svc.detach("vm", alias="ua-d", persistent=False)
        assert svc.reconnects == 1
    # Maybe sent: it counts, and nothing was sent on top of it.
    assert caught.value.attempts == 1
    assert fake.calls.count("detach_live") == 1


async def test_a_batch_on_closed_connections_is_all_sent_once() -> None:
    """The issue's case: the extra connections were closed by the daemon while
    idle, and a batch of six with ``attempts=1``: each request that failed in
    the client is sent again once the connection is back, and every device
    leaves with one request that reached the daemon."""
    fake = FakeHypervisor()
    dom = fake.add_domain("vm")
    for i in range(6):
        # At once: the fake drops an unplug still pending when its client
        # closes, which a real guest would not.
        dom.add_disk(f"sd{chr(98 + i)}", alias=f"ua-d{i}", unplug=GuestUnplug.now())
    closed = 0

    def before(name: str) -> None:
        nonlocal closed
        if name == "detach_live" and closed < 5:
            closed += 1
            raise _socket_closed()

    async with DetachService(backend=fake, settings=SETTINGS) as svc:
        fake.before_call = before
        results = await asyncio.gather(
            *(svc.detach("vm", alias=f"ua-d{i}", persistent=False) for i in range(6))
        )
    assert closed == 5
    assert [r.attempts for r in results] == [1] * 6
    assert sorted(r.alias for r in fake.requests) == [f"ua-d{i}" for i in range(6)]
