"""A detach sent right after a native-PCIe hot-plug: "guest is busy", then one unplug.

QEMU 7.2 signals a hot-plug into a q35 root port with native PCIe hotplug as
presence-detect *and* attention-button events; the guest's pciehp logs
"Attention button pressed" / "Powering on due to button press", blinks the
slot's power indicator and enumerates the new device.  While the indicator
blinks, QEMU refuses ``device_del``: "Hot-unplug failed: guest is busy (power
indicator blinking)" (``VIR_ERR_INTERNAL_ERROR`` from ``VIR_FROM_QEMU``).
Measured under TCG: refused from the moment ``attachDeviceFlags`` returns
(~10 ms) until +0.12-0.14 s, accepted from +0.13-0.15 s; the unplug then takes
the usual ~6.3 s.  (With the guest paused during the plug nothing blinks: the
request is accepted at once and QEMU removes the unpowered device in ~50 ms.)
Nothing of ours is pending in the guest then: the refusal means "not yet",
not "in progress".  So it must be retried after a short back-off (~1 s,
growing) without using up an attempt, and the detach then takes one
accepted request and one ~6.3 s unplug -- not a whole ``timeout`` of waiting
for an event that no request of ours can produce, followed by a re-send.
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from aiodetach import DetachSettings
from aiodetach_lab import domains as _lab

from ._support import (
    NATIVE_PCIE_UNPLUG,
    Guest,
    button_presses,
    cancels,
    connection,
    guest,
    pciehp_lines,
    recording_service,
    virtio_disk,
)

pytestmark = pytest.mark.slow

SETTINGS = DetachSettings(timeout=20, attempts=8)
HOT = _lab.DiskSpec("vdc", "virtio", alias="ua-hot1")
BUSY_MARKERS = ("guest is busy", "power indicator")
MAX_REFUSALS = 4
"""A back-off of ~1 s, growing, meets a blinking window of a few seconds a few times at most."""


@pytest.fixture(scope="module")
def native(libvirtd: str) -> Iterator[Guest]:
    with guest(
        libvirtd,
        machine="q35",
        native_pcie_hotplug=True,
        disks=[virtio_disk("vdb", "ua-disk1")],
        kernel_log=True,
        hotplug_ports=2,
    ) as g:
        yield g


async def _guest_saw_the_plug(g: Guest, offset: int) -> float:
    """Seconds until pciehp logged the hot-plug's "Attention button pressed"."""
    started = time.monotonic()
    while button_presses(g.serial_text()[offset:]) < 1:
        if time.monotonic() - started > 30:
            raise TimeoutError("the guest never logged the hot-plug's attention-button press")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def _powering_off(log: str) -> int:
    return sum(1 for _slot, msg in pciehp_lines(log) if msg == "Powering off due to button press")


async def test_busy_refusals_right_after_hotplug_cost_no_attempt(native: Guest) -> None:
    path = _lab.disk_image(HOT, native.lab.workdir, native.name)
    hot_xml = ET.tostring(_lab.disk_xml(HOT, path), encoding="unicode")
    assert HOT.alias is not None
    offset = len(native.serial_text())

    async with recording_service(native.uri, SETTINGS) as (svc, backend):
        with connection(native.uri) as conn:
            dom = conn.lookupByName(native.name)
            plugged_at = time.monotonic()
            dom.attachDeviceFlags(hot_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            attach_took = time.monotonic() - plugged_at
        # The guest reacts to the plug within milliseconds (its log line is
        # there when attachDeviceFlags returns); waiting for it only makes sure
        # the power indicator is blinking when the request goes out.
        seen_after = await _guest_saw_the_plug(native, offset)
        # At once: the blinking lasts ~0.13-0.15 s (measured), not seconds.
        started = time.monotonic()
        # Only a bound so that a broken build cannot hang the suite.
        async with asyncio.timeout(3 * SETTINGS.timeout + 10):
            result = await svc.detach(native.name, alias=HOT.alias, live=True, persistent=False)
        elapsed = time.monotonic() - started
        # Let a second unplug (if any was started) show in the guest's log.
        await asyncio.sleep(1.0)
    log = native.serial_text()[offset:]

    print(
        f"\nattachDeviceFlags(LIVE) took {attach_took:.3f} s; the guest's button-press line "
        f"was seen {seen_after:.3f} s after it returned; detach called then"
    )
    print("live requests (seconds after the hot-plug call returned):")
    for r in backend.requests:
        answer = r.error or "accepted"
        print(
            f"  +{r.at - plugged_at - attach_took:6.3f} s  code={r.code} origin={r.origin}  {answer}"
        )
    print(f"result after {elapsed:.3f} s (detach call to result): {result!r}")
    print("guest pciehp lines:")
    for slot, msg in pciehp_lines(log):
        print(f"  Slot({slot}): {msg}")

    accepted, refused = backend.accepted(), backend.refused()
    assert refused, (
        "the first request was not refused: the slot had stopped blinking before it was "
        f"sent, so the case under test did not happen: {backend.requests}"
    )
    for r in refused:
        assert r.error is not None
        assert any(m in r.error for m in BUSY_MARKERS), r
        assert (r.code, r.origin) == (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU), r
    assert len(accepted) == 1, backend.requests
    assert all(r.at < accepted[0].at for r in refused), "a request after the accepted one"
    assert len(refused) <= MAX_REFUSALS, f"a storm of {len(refused)} refused requests"
    # No whole attempt waited out: one short back-off plus one ~6.3 s unplug.
    assert elapsed < SETTINGS.timeout, f"{elapsed:.1f} s: a whole timeout was wasted"
    assert result.attempts == 1, f"a refusal while the slot blinks used up an attempt: {result}"
    assert (result.live, result.persistent) == (True, False), result
    assert result.confirmed_by == "event", result
    assert elapsed >= NATIVE_PCIE_UNPLUG - 1.5, elapsed
    # One press is QEMU's own hot-plug signal ("Powering on ..."), one is the unplug's.
    assert (button_presses(log), _powering_off(log), cancels(log)) == (2, 1, 0), log
    assert not native.has_alias(HOT.alias), "the hot-plugged disk is still in the live XML"
