"""Detach many devices across domains (and hosts) with bounded concurrency.

Runs against the *fake* hypervisor so it works anywhere; swap
``backend_factory`` out (or pass real URIs) to use libvirt.

    python examples/host_evacuation.py
"""

from __future__ import annotations

import asyncio
import logging

import structlog

from aiodetach import DetachFleet, DetachOutcome, DetachSettings
from aiodetach.testing import FakeHypervisor, GuestUnplug


async def main() -> None:
    hosts = {uri: FakeHypervisor(uri) for uri in ("fake://host-a", "fake://host-b")}
    requests = []
    for uri, hv in hosts.items():
        for d in range(5):
            vm = hv.add_domain(f"vm-{d}")
            for i in range(4):
                # Most guests answer within 50 ms; one per host ignores us.
                plan = GuestUnplug.never() if (d, i) == (4, 3) else GuestUnplug.later(0.05)
                vm.add_disk(f"vd{chr(98 + i)}", alias=f"ua-disk{i}", unplug=plan)
                requests.append({"uri": uri, "domain": f"vm-{d}", "alias": f"ua-disk{i}"})

    def progress(outcome: DetachOutcome, done: int, total: int) -> None:
        status = "ok" if outcome.ok else type(outcome.error).__name__
        print(f"[{done:>2}/{total}] {outcome.request.uri} {outcome.request.describe()}: {status}")

    settings = DetachSettings(attempts=2, timeout=0.5)
    async with DetachFleet(settings=settings, backend_factory=hosts.__getitem__) as fleet:
        outcomes = await fleet.detach_many(requests, concurrency=8, on_progress=progress)
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} detached, {len(failed)} failed")
    for hv in hosts.values():
        hv.cancel_timers()


if __name__ == "__main__":
    # An application configures logging; the library never does.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main())
