"""Run the ``aiodetach`` command against the fake hypervisor (a test helper).

``python tests/unit/_cli_on_fake.py detach-many FILE …`` is ``aiodetach
detach-many FILE …`` with every service on one :class:`FakeHypervisor` (a
fake, not libvirt) holding domain ``vm``: ``ua-ok0`` … ``ua-ok5`` released
after 0.05-0.3 s, ``ua-lost`` released without an event, ``ua-never`` never
released, and domain ``other``.  ``detach-many`` lines naming a host (``uri``)
whose URI contains ``other`` go to a second fake, ``OTHER_URI``'s, which
holds a domain ``vm`` too (disks ``ua-ok0`` and ``ua-ok1``, released at once).  With ``AIODETACH_FAKE_EVENTS=1`` the fake
also reports, every 20 ms while connected, a DEVICE_REMOVED of ``ua-x`` on
``other`` and then on ``vm`` (what ``watch`` has to filter).  With
``AIODETACH_FAKE_NO_RICH=1`` rich cannot be imported (the CLI without its
``cli`` extra); with ``AIODETACH_FAKE_SLOW_CLOSE=1`` closing the connection
hangs; ``AIODETACH_FAKE_JOURNAL_BUSY_WAIT=S`` waits S seconds, not 10, for
a journal another process holds.  The CLI itself
has no fake mode: this script swaps the service
class it uses, so the tests drive the real command line, output and exit
codes in a subprocess (and in a pseudo-terminal).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from aiodetach import DetachFleet, DetachService, _cli
from aiodetach.testing import FakeHypervisor, Unplug

OK = [f"ua-ok{i}" for i in range(6)]
VM_UUID = "3a1f7c52-0b6e-4d84-9e0f-5c2d1b7a9e61"
OTHER_URI = "fake://other/system"


def build() -> FakeHypervisor:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm", uuid=VM_UUID)
    fake.add_domain("other")
    for i, alias in enumerate(OK):
        vm.add_disk(f"vd{chr(ord('b') + i)}", alias=alias, unplug=Unplug.later(0.05 * (i + 1)))
    vm.add_disk("vdx", alias="ua-lost", unplug=Unplug.later(0.05, emit_event=False))
    vm.add_disk("vdy", alias="ua-never", unplug=Unplug.never())
    return fake


def build_other() -> FakeHypervisor:
    """The second host: a domain ``vm`` of its own (not the first host's)."""
    fake = FakeHypervisor(OTHER_URI)
    vm = fake.add_domain("vm")
    for i in range(2):
        vm.add_disk(f"vd{chr(ord('b') + i)}", alias=f"ua-ok{i}", unplug=Unplug.now())
    return fake


def fake_classes(
    fake: FakeHypervisor, other: FakeHypervisor
) -> tuple[type[DetachService], type[DetachFleet]]:
    """The CLI's service and fleet classes on the fakes (``other``: the hosts
    whose URI contains "other")."""

    class OnFake(DetachService):
        def __init__(self, uri: str | None = "fake:///system", **kwargs: Any) -> None:
            backend = other if uri is not None and "other" in uri else fake
            super().__init__(uri, backend=backend, **kwargs)

    class FleetOnFakes(DetachFleet):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(
                backend_factory=lambda uri: other if "other" in uri else fake, **kwargs
            )

    return OnFake, FleetOnFakes


def main() -> int:
    if os.environ.get("AIODETACH_FAKE_NO_RICH") == "1":
        sys.modules["rich"] = None  # type: ignore[assignment]  # as if not installed
    fake = build()
    other = build_other()
    if os.environ.get("AIODETACH_FAKE_SLOW_CLOSE") == "1":
        _slow_close(fake)
    if busy := os.environ.get("AIODETACH_FAKE_JOURNAL_BUSY_WAIT"):
        from aiodetach import _journal

        _journal.BUSY_WAIT = float(busy)  # a held journal fails sooner than 10 s
    service, fleet = fake_classes(fake, other)
    _cli.DetachService = service  # type: ignore[attr-defined]
    _cli.DetachFleet = fleet  # type: ignore[attr-defined]
    stop = threading.Event()
    if os.environ.get("AIODETACH_FAKE_EVENTS") == "1":
        threading.Thread(target=_report_removals, args=(fake, stop), daemon=True).start()
    try:
        return _cli.main(sys.argv[1:])
    finally:
        stop.set()
        fake.cancel_timers()
        other.cancel_timers()


def _slow_close(fake: FakeHypervisor) -> None:
    """Closing the connection hangs (a libvirtd that does not answer): what a
    second Ctrl-C is for."""
    from aiodetach import _connection

    _connection.CLOSE_GRACE = 600.0  # the close waits for it, not 2 s

    def hang(name: str) -> None:
        if name == "close":
            threading.Event().wait(600)

    fake.before_call = hang


def _report_removals(fake: FakeHypervisor, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        if fake.sink is not None:
            fake.emit_removed("other", "ua-x")
            fake.emit_removed("vm", "ua-x")


if __name__ == "__main__":
    sys.exit(main())
