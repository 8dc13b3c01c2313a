"""The seed's bug, reproduced and beaten: blind re-sends vs aiodetach on native PCIe hotplug.

A q35 guest with native PCIe hotplug (Linux pciehp) takes ~6.3 s to release a
virtio-blk disk: the unplug request is an attention-button press, and Linux
waits 5 s (a second press cancels) before powering the slot off.

*Blind retry* is the behaviour aiodetach replaced: send the detach, then re-send
every N seconds while the device is still in the live XML; a libvirt error on
a re-send ends that detach as a failure (that is what the old code did), and a
total time budget bounds it.  A *relentless* variant ignores those errors and
keeps re-sending every second, to see whether a re-send ever reaches the guest
(a second attention-button press inside the 5 s window cancels the unplug).
*aiodetach* registers for DEVICE_REMOVED, sends once and waits
(``DetachService.detach`` with ``timeout=20``).

Every device gets its own fresh virtio-blk disk (one guest holds them all, one
PCIe root port each) and is detached one at a time.  Besides what each approach
*reports*, the benchmark records the ground truth: when the disk really left
the live XML, and pciehp's own lines in the guest's serial log ("Attention
button pressed", "Button cancel"), which say whether a re-send ever
interrupted an unplug.

Run alone: ``python benchmarks/bench_seed_bug.py [--quick] [--devices K]
[--interval 1 --interval 3 ...] [--send alias|flags] [--no-relentless] [--json FILE]``.
A runner can import :func:`run` (returns the rows) or :func:`main`.
The exit status is 1 if aiodetach sent more than one request for a
successful unplug, failed, or a guest log shows a cancelled unplug on its side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt
import structlog

from _common import Row, met
from aiodetach import DetachService, DetachSettings, install_event_loop
from aiodetach._libvirt import LibvirtBackend
from aiodetach.errors import DetachError
from aiodetach_lab import domains as _lab
from aiodetach_lab import guest as _guest
from aiodetach_lab.requests import recording_requests

URI = os.environ.get("AIODETACH_BENCH_URI", "qemu:///system")
BOOT_TIMEOUT = 120.0
SETTLE_TIMEOUT = 15.0  # after a verdict, how long to wait for the disk to really go
_PCIEHP = re.compile(r"pciehp: Slot\(([^)]*)\): (.*)$")


# ----------------------------------------------------------------- results


@dataclass
class DeviceRun:
    """One device detached by one approach."""

    approach: str
    alias: str
    requests: int = 0  # detach requests sent, refused ones included
    refusals: list[str] = field(default_factory=list)  # libvirt's messages
    reported_ok: bool = False
    verdict: str = ""
    reported_after: float = 0.0  # seconds from the first request to the verdict
    removed_after: float | None = None  # ground truth: left the live XML (None: never)
    presses: int = 0  # pciehp "Attention button pressed" lines during this detach
    cancels: int = 0  # pciehp "Button cancel" / "Action canceled" lines


@dataclass(frozen=True)
class SeedBugRow:
    """One line of the table: one approach over K devices."""

    approach: str
    devices: int
    requests_per_device: str
    refused_resends: int
    success_rate: str
    median_time: str
    max_time: str
    really_removed: str
    median_real_removal: str
    presses_cancels: str
    ok_requests: int  # requests sent for the successful detaches (aiodetach: must be = successes)
    successes: int
    runs: list[DeviceRun] = field(default_factory=list)


def _fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f} s"


def summarize(approach: str, runs: Sequence[DeviceRun]) -> SeedBugRow:
    n = len(runs)
    counts = [r.requests for r in runs]
    ok = [r for r in runs if r.reported_ok]
    ok_times = [r.reported_after for r in ok]
    removed = [r.removed_after for r in runs if r.removed_after is not None]
    mean = statistics.mean(counts) if counts else 0.0
    return SeedBugRow(
        approach=approach,
        devices=n,
        requests_per_device=f"{mean:.2f} ({min(counts, default=0)}-{max(counts, default=0)})",
        refused_resends=sum(len(r.refusals) for r in runs),
        success_rate=f"{len(ok)}/{n} ({100 * len(ok) / n:.0f} %)" if n else "—",
        median_time=_fmt(statistics.median(ok_times) if ok_times else None),
        max_time=_fmt(max(ok_times) if ok_times else None),
        really_removed=f"{len(removed)}/{n}",
        median_real_removal=_fmt(statistics.median(removed) if removed else None),
        presses_cancels=f"{sum(r.presses for r in runs)} / {sum(r.cancels for r in runs)}",
        ok_requests=sum(r.requests for r in ok),
        successes=len(ok),
        runs=list(runs),
    )


def table(rows: Sequence[SeedBugRow]) -> str:
    head = [
        "approach",
        "devices",
        "requests/device mean (min-max)",
        "re-sends refused",
        "reported success",
        "median time to detach",
        "max time to detach",
        "really removed",
        "median real removal",
        "guest button presses / cancels",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.approach,
            str(r.devices),
            r.requests_per_device,
            str(r.refused_resends),
            r.success_rate,
            r.median_time,
            r.max_time,
            r.really_removed,
            r.median_real_removal,
            r.presses_cancels,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------- guest


@dataclass
class _Guest:
    name: str
    serial_log: Path
    disk_xml: dict[str, str]  # alias -> device XML


def _aliases(n: int, tag: str) -> list[str]:
    return [f"ua-{tag}{i}" for i in range(n)]


def _targets(n: int) -> Iterator[str]:
    for i in range(n):
        yield f"vd{chr(ord('b') + i)}" if i < 25 else f"vda{chr(ord('a') + i - 25)}"


@contextlib.contextmanager
def native_pcie_guest(uri: str, aliases: Sequence[str]) -> Iterator[_Guest]:
    """A booted q35 guest with native PCIe hotplug and one virtio-blk disk per alias.

    The name is the lab's default (prefix + this PID), so a concurrent test
    session's leftover cleanup leaves it alone while this process lives.
    """
    image = _guest.build_guest_image()
    disk_xml: dict[str, str] = {}

    def build(name: str, workdir: Path) -> str:
        staged = _lab.stage_guest_image(image, workdir)
        for alias, target in zip(aliases, _targets(len(aliases)), strict=True):
            spec = _lab.DiskSpec(target, "virtio", alias=alias, size_mib=1)
            path = _lab.disk_image(spec, workdir, name)
            disk_xml[alias] = ET.tostring(_lab.disk_xml(spec, path), encoding="unicode")
        return _guest.guest_domain_xml(
            name,
            staged,
            serial_log=workdir / "serial.log",
            machine="q35",
            native_pcie_hotplug=True,
            devices=list(disk_xml.values()),
            hotplug_ports=0,
            extra_cmdline=("loglevel=7",),  # pciehp's KERN_INFO lines on the console
        )

    with _lab.throwaway_domain(uri, build_xml=build) as lab:
        log = lab.workdir / "serial.log"
        _guest.wait_for_ready(log, BOOT_TIMEOUT)
        yield _Guest(lab.name, log, disk_xml)


def _serial_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _guest_lines(path: Path, offset: int) -> tuple[int, int]:
    """(button presses, cancels) pciehp logged past ``offset``."""
    with path.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    presses = cancels = 0
    for line in text.splitlines():
        match = _PCIEHP.search(line)
        if not match:
            continue
        msg = match.group(2).strip()
        if msg == "Attention button pressed":
            presses += 1
        elif msg == "Button cancel" or msg.startswith("Action canceled"):
            cancels += 1
    return presses, cancels


def _present(dom: libvirt.virDomain, alias: str) -> bool:
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirtd's own output
    return any(a.get("name") == alias for a in root.iterfind("devices/*/alias"))


def _wait_gone(dom: libvirt.virDomain, alias: str, t0: float, until: float) -> float | None:
    """Poll the live XML until ``alias`` is gone (seconds since ``t0``) or ``until``."""
    while True:
        if not _present(dom, alias):
            return time.monotonic() - t0
        if time.monotonic() >= until:
            return None
        time.sleep(0.05)


# ----------------------------------------------------------- blind retry


def blind_retry(
    dom: libvirt.virDomain,
    alias: str,
    device_xml: str,
    *,
    interval: float,
    budget: float,
    send: str,
    run: DeviceRun,
    stop_on_error: bool = True,
) -> float:
    """The replaced behaviour: re-send every ``interval`` s while the device is there.

    A libvirt error on a re-send ends the detach as a failure (as the old code
    did) unless ``stop_on_error`` is False: then it is noted and the re-sends go
    on, to see whether relentless re-sends ever reach the guest (a second
    attention-button press would cancel the unplug).  Fills ``run``; returns
    the monotonic time of the first request.
    """

    def request() -> None:
        run.requests += 1
        if send == "flags":
            # Blocks up to 5 s inside libvirt, then returns 0 even if the guest is not done.
            dom.detachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        else:
            dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    t0 = time.monotonic()
    try:
        request()
    except libvirt.libvirtError as exc:
        run.refusals.append(str(exc.get_error_message()))
        run.verdict = "error on the first request"
        run.reported_after = time.monotonic() - t0
        return t0
    last = time.monotonic()
    while True:
        time.sleep(0.05)  # polling the XML this often is generous to the baseline
        now = time.monotonic()
        if not _present(dom, alias):
            run.reported_ok = True
            run.verdict = "removed"
            run.reported_after = now - t0
            return t0
        if now - t0 >= budget:
            run.verdict = f"gave up after {budget:g} s"
            run.reported_after = now - t0
            return t0
        if now - last >= interval:
            try:
                request()
            except libvirt.libvirtError as exc:
                msg = str(exc.get_error_message())
                run.refusals.append(msg)
                if stop_on_error:
                    run.verdict = f"FAILED on re-send: {msg}"
                    run.reported_after = time.monotonic() - t0
                    return t0
            last = time.monotonic()


def run_blind(
    uri: str,
    guest: _Guest,
    aliases: Sequence[str],
    interval: float,
    budget: float,
    send: str,
    stop_on_error: bool = True,
) -> list[DeviceRun]:
    label = f"blind retry every {interval:g} s ({send})"
    if not stop_on_error:
        label = f"blind retry every {interval:g} s ({send}), errors ignored"
    runs: list[DeviceRun] = []
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(guest.name)
        for alias in aliases:
            run = DeviceRun(label, alias)
            offset = _serial_size(guest.serial_log)
            t0 = blind_retry(
                dom,
                alias,
                guest.disk_xml[alias],
                interval=interval,
                budget=budget,
                send=send,
                run=run,
                stop_on_error=stop_on_error,
            )
            run.removed_after = _wait_gone(dom, alias, t0, time.monotonic() + SETTLE_TIMEOUT)
            time.sleep(0.2)  # the guest's last lines reach the serial file
            run.presses, run.cancels = _guest_lines(guest.serial_log, offset)
            _progress(run)
            runs.append(run)
    finally:
        conn.close()
    return runs


# --------------------------------------------------------------- aiodetach


async def _aiodetach_runs(
    uri: str, guest: _Guest, aliases: Sequence[str], wait_s: float
) -> list[DeviceRun]:
    label = f"aiodetach (timeout={wait_s:g} s)"
    runs: list[DeviceRun] = []
    # A service given its own backend does not bind libvirt's events itself.
    impl = install_event_loop()
    backend = LibvirtBackend(uri)
    settings = DetachSettings(timeout=wait_s, attempts=8)
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(guest.name)
        with recording_requests() as log:
            async with DetachService(uri, backend=backend, settings=settings) as svc:
                for alias in aliases:
                    run = DeviceRun(label, alias)
                    offset = _serial_size(guest.serial_log)
                    before = len(log.requests)
                    t0 = time.monotonic()
                    try:
                        result = await svc.detach(guest.name, alias=alias, persistent=False)
                    except DetachError as exc:
                        run.verdict = f"{type(exc).__name__}: {exc}"
                    else:
                        run.reported_ok = True
                        run.verdict = f"removed, confirmed by {result.confirmed_by}"
                    run.reported_after = time.monotonic() - t0
                    answers = log.requests[before:]
                    run.requests = len(answers)
                    run.refusals = [r.error for r in answers if r.error is not None]
                    run.removed_after = await asyncio.to_thread(
                        _wait_gone, dom, alias, t0, time.monotonic() + SETTLE_TIMEOUT
                    )
                    await asyncio.sleep(0.2)
                    run.presses, run.cancels = _guest_lines(guest.serial_log, offset)
                    _progress(run)
                    runs.append(run)
        await impl.settle()
    finally:
        conn.close()
    return runs


# -------------------------------------------------------------------- run


def _progress(run: DeviceRun) -> None:
    removed = "never" if run.removed_after is None else f"{run.removed_after:.2f} s"
    print(
        f"  {run.approach:<34} {run.alias:<8} requests={run.requests} "
        f"verdict after {run.reported_after:.2f} s: {run.verdict}; really removed: {removed}; "
        f"guest: {run.presses} press(es), {run.cancels} cancel(s)",
        file=sys.stderr,
        flush=True,
    )


def run(
    devices: int = 4,
    intervals: Sequence[float] = (1.0, 3.0, 8.0),
    *,
    uri: str = URI,
    budget: float = 30.0,
    send: str = "alias",
    timeout: float = 20.0,
    relentless: float | None = 1.0,
) -> list[SeedBugRow]:
    """Boot one native-PCIe q35 guest and return one row per approach.

    ``relentless``: also run a blind retry at that interval that ignores
    libvirt's errors and keeps re-sending (None: skip it).
    """
    _lab.ensure_libvirtd(uri)
    groups = [(f"b{i}-", iv, True) for i, iv in enumerate(intervals)]
    if relentless is not None:
        groups.append(("r-", relentless, False))
    blind_aliases = {tag: _aliases(devices, tag) for tag, _iv, _stop in groups}
    ours = _aliases(devices, "a-")
    everything = [a for tag, _iv, _stop in groups for a in blind_aliases[tag]] + ours
    rows: list[SeedBugRow] = []
    with native_pcie_guest(uri, everything) as guest:
        for tag, interval, stop in groups:
            runs = run_blind(uri, guest, blind_aliases[tag], interval, budget, send, stop)
            rows.append(summarize(runs[0].approach, runs))
        runs = asyncio.run(_aiodetach_runs(uri, guest, ours, timeout))
        rows.append(summarize(runs[0].approach, runs))
    return rows


def aiodetach_ok(rows: Sequence[SeedBugRow]) -> bool:
    """aiodetach's promise here: every unplug succeeds, one request each, none cancelled."""
    mine = [r for r in rows if r.approach.startswith("aiodetach")]
    return bool(mine) and all(
        r.successes == r.devices
        and r.ok_requests == r.successes
        and r.presses_cancels.endswith("/ 0")
        for r in mine
    )


def _generic(message: str, alias: str) -> str:
    return message.replace(alias, "<alias>")


def _configure_logging() -> None:
    # structlog's unconfigured default prints aiodetach's debug lines to stdout.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 devices, N in {1, 3} s")
    parser.add_argument("--devices", type=int, help="devices per approach (default 4)")
    parser.add_argument(
        "--interval",
        type=float,
        action="append",
        help="blind re-send interval in seconds, repeatable (default 1, 3 and 8)",
    )
    parser.add_argument("--budget", type=float, default=30.0, help="blind retry time budget")
    parser.add_argument(
        "--send",
        choices=("alias", "flags"),
        default="alias",
        help="blind retry request: detachDeviceAlias or detachDeviceFlags(xml)",
    )
    parser.add_argument(
        "--no-relentless",
        action="store_true",
        help="skip the blind retry that ignores errors and keeps re-sending every 1 s",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    _configure_logging()
    devices = args.devices or (2 if args.quick else 4)
    intervals = args.interval or ([1.0, 3.0] if args.quick else [1.0, 3.0, 8.0])
    started = time.monotonic()
    groups = len(intervals) + (1 if args.no_relentless else 2)
    print(
        f"booting a q35 guest with native PCIe hotplug and {devices * groups} virtio-blk disks…",
        file=sys.stderr,
        flush=True,
    )
    relentless = None if args.no_relentless else 1.0
    rows = run(devices, intervals, budget=args.budget, send=args.send, relentless=relentless)
    print("\n## The seed's bug, reproduced and beaten (q35, native PCIe hotplug)\n")
    print(table(rows))
    refusals = sorted(
        {_generic(m, run_.alias) for r in rows for run_ in r.runs for m in run_.refusals}
    )
    print()
    print(
        f"- {devices} fresh virtio-blk disks per approach, detached one at a time; took "
        f"{time.monotonic() - started:.0f} s in all."
    )
    print(
        "- libvirt's answers to refused requests: "
        + ("; ".join(f"`{m}`" for m in refusals) or "none")
    )
    print(
        '- "really removed": the disk left the live XML (polled up to '
        f"{SETTLE_TIMEOUT:g} s after the verdict), whatever the approach reported."
    )
    ok = aiodetach_ok(rows)
    print(f"- aiodetach: one request per successful unplug, no cancel: {'yes' if ok else 'NO'}")
    if args.json:
        # The runner's common row format (benchmarks/_common.Row).
        Path(args.json).write_text(json.dumps([asdict(r) for r in common_rows(rows)], indent=1))
    return 0 if ok else 1


def common_rows(rows: Sequence[SeedBugRow]) -> list[Row]:
    """The table in benchmarks/run.py's format: one row per approach."""
    out = []
    for r in rows:
        ours = r.approach.startswith("aiodetach")
        out.append(
            Row(
                benchmark=f"seed bug, q35 native PCIe, {r.devices} disks: {r.approach}",
                aiodetach=(
                    f"{r.requests_per_device} requests/device, reported success "
                    f"{r.success_rate}, median {r.median_time}"
                ),
                comparison=(
                    f"really removed {r.really_removed} (median {r.median_real_removal}); "
                    f"re-sends refused: {r.refused_resends}"
                ),
                ratio="—",
                target="1 request per successful unplug, 100 % success" if ours else "—",
                met=met(r.ok_requests == r.successes == r.devices) if ours else "n/a",
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
