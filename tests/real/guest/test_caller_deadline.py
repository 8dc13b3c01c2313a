"""A caller with a short deadline of its own, retrying, must not multiply unplugs.

A native-PCIe (pciehp) unplug takes ~6.3 s: Linux acts on the attention-button
press only after a 5 s cancel window.  A caller that bounds each call with a
1 s deadline (``asyncio.timeout``, ``asyncio.wait_for``, or cancelling its task)
and calls again at once must still cause exactly ONE live request to libvirt:
the unplug it started goes on after the caller's cancellation, and the next
call for that device picks it up instead of sending ``device_del`` again (a
re-send is refused by QEMU 7.2, "already in the process of unplug" / "guest is
busy", or, around 6 s, accepted and pressing the button a second time).  The
guest sees one button press and no cancel, and the final call returns success.

Service settings are the defaults (timeout=20, attempts=8), pinned here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from aiodetach import DetachResult, DetachService, DetachSettings
from aiodetach.errors import DetachError
from aiodetach_lab.requests import RequestLog

from ._support import (
    NATIVE_PCIE_UNPLUG,
    Guest,
    button_presses,
    cancels,
    guest,
    recording_service,
    virtio_disk,
)

pytestmark = pytest.mark.slow

DEADLINE = 1.0
"""The caller's own bound on each call, well under the ~6.3 s unplug."""

MAX_TRIES = 40
"""Bound on the caller's loop: 40 calls of 1 s, far more than the unplug needs."""

SETTINGS = DetachSettings(timeout=20, attempts=8)  # the defaults, pinned against env

STYLES = ("asyncio.timeout", "asyncio.wait_for", "task.cancel")
ALIASES = {style: f"ua-disk{i}" for i, style in enumerate(STYLES, start=1)}
TARGETS = {style: f"vd{chr(ord('b') + i)}" for i, style in enumerate(STYLES)}


@pytest.fixture(scope="module")
def native(libvirtd: str) -> Iterator[Guest]:
    disks = [virtio_disk(TARGETS[s], ALIASES[s]) for s in STYLES]
    with guest(
        libvirtd, machine="q35", native_pcie_hotplug=True, disks=disks, kernel_log=True
    ) as g:
        yield g


Tries = list[tuple[float, str]]  # (seconds since the first call, what happened)


async def _with_timeout(call: Callable[[], Awaitable[DetachResult]]) -> DetachResult:
    async with asyncio.timeout(DEADLINE):
        return await call()


async def _with_wait_for(call: Callable[[], Awaitable[DetachResult]]) -> DetachResult:
    return await asyncio.wait_for(call(), DEADLINE)


async def _retry_on_deadline(
    style: str, call: Callable[[], Awaitable[DetachResult]], tries: Tries, t0: float
) -> DetachResult | None:
    bounded = _with_timeout if style == "asyncio.timeout" else _with_wait_for
    for _ in range(MAX_TRIES):
        try:
            result = await bounded(call)
        except TimeoutError:
            tries.append((time.monotonic() - t0, "deadline"))
            continue  # at once: no sleep
        except DetachError as err:
            tries.append((time.monotonic() - t0, f"error {err!r}"))
            return None
        tries.append((time.monotonic() - t0, "result"))
        return result
    return None


async def _cancel_then_call_again(
    call: Callable[[], Awaitable[DetachResult]], tries: Tries, t0: float
) -> DetachResult | None:
    task = asyncio.ensure_future(call())
    await asyncio.sleep(DEADLINE)
    if task.done():  # cannot happen with a ~6 s unplug; recorded if it does
        tries.append((time.monotonic() - t0, "first call finished before the cancel"))
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        tries.append((time.monotonic() - t0, "cancelled"))
    except DetachError as err:
        tries.append((time.monotonic() - t0, f"error {err!r}"))
        return None
    try:
        # Not the caller's deadline: only a bound so a broken build cannot hang.
        async with asyncio.timeout(3 * SETTINGS.timeout):
            result = await call()
    except (TimeoutError, DetachError) as err:
        tries.append((time.monotonic() - t0, f"error {err!r}"))
        return None
    tries.append((time.monotonic() - t0, "result"))
    return result


def _report(style: str, tries: Tries, backend: RequestLog, t0: float, log: str) -> None:
    print(f"\n[{style}] calls:")
    for at, what in tries:
        print(f"  +{at:6.3f} s  {what}")
    print(f"[{style}] live requests that reached libvirt:")
    for r in backend.requests:
        print(f"  +{r.at - t0:6.3f} s  {r.alias}  {r.error or 'accepted'}")
    print(f"[{style}] guest: {button_presses(log)} button press(es), {cancels(log)} cancel(s)")


@pytest.mark.parametrize("style", STYLES)
async def test_retrying_caller_with_short_deadline_sends_one_request(
    native: Guest, style: str
) -> None:
    alias = ALIASES[style]
    assert native.has_alias(alias)
    offset = len(native.serial_text())
    tries: Tries = []
    async with recording_service(native.uri, SETTINGS) as (svc, backend):

        def call(svc: DetachService = svc) -> Awaitable[DetachResult]:
            return svc.detach(native.name, alias=alias)

        t0 = time.monotonic()
        if style == "task.cancel":
            result = await _cancel_then_call_again(call, tries, t0)
        else:
            result = await _retry_on_deadline(style, call, tries, t0)
        total = time.monotonic() - t0
        if result is not None and result.live:
            # Let a second unplug (if any was started) show in the guest's log.
            await asyncio.sleep(1.0)
    log = native.serial_text()[offset:]
    _report(style, tries, backend, t0, log)
    print(f"[{style}] result after {total:.3f} s: {result!r}")

    deadlines = sum(1 for _at, what in tries if what in ("deadline", "cancelled"))
    assert deadlines >= 1, f"the caller's deadline never fired, nothing was tested: {tries}"
    answers = [(round(r.at - t0, 3), r.error or "accepted") for r in backend.requests]
    assert [(r.alias, r.error) for r in backend.requests] == [(alias, None)], (
        f"{len(backend.requests)} live requests reached libvirt, expected exactly one: {answers}"
    )
    assert result is not None, f"no result after {len(tries)} calls: {tries}"
    assert result.live, result
    assert result.alias == alias, result
    assert result.attempts == 1, result
    assert result.confirmed_by is not None, result
    # One unplug, so it ends ~6.3 s after the first call (generous for a slow machine).
    assert total >= NATIVE_PCIE_UNPLUG - 1.5, total
    assert total < 3 * SETTINGS.timeout, total
    assert (button_presses(log), cancels(log)) == (1, 0), log
    assert not native.has_alias(alias), f"{alias} still in the live XML"
    assert not native.has_alias(alias, inactive=True), f"{alias} still in the persistent XML"
