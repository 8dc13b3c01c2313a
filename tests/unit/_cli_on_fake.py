"""Run the ``aiodetach`` command against the fake hypervisor (a test helper).

``python tests/unit/_cli_on_fake.py detach-many FILE …`` is ``aiodetach
detach-many FILE …`` with every service on one :class:`FakeHypervisor` (a
fake, not libvirt) holding domain ``vm``: ``ua-ok0`` … ``ua-ok5`` released
after 0.05-0.3 s, ``ua-lost`` released without an event, ``ua-never`` never
released.  The CLI itself has no fake mode: this script swaps the service
class it uses, so the tests drive the real command line, output and exit
codes in a subprocess (and in a pseudo-terminal).
"""

from __future__ import annotations

import sys
from typing import Any

from aiodetach import DetachService, _cli
from aiodetach.testing import FakeHypervisor, Unplug

OK = [f"ua-ok{i}" for i in range(6)]


def build() -> FakeHypervisor:
    fake = FakeHypervisor()
    vm = fake.add_domain("vm")
    for i, alias in enumerate(OK):
        vm.add_disk(f"vd{chr(ord('b') + i)}", alias=alias, unplug=Unplug.later(0.05 * (i + 1)))
    vm.add_disk("vdx", alias="ua-lost", unplug=Unplug.later(0.05, emit_event=False))
    vm.add_disk("vdy", alias="ua-never", unplug=Unplug.never())
    return fake


def main() -> int:
    fake = build()

    class OnFake(DetachService):
        def __init__(self, uri: str = "fake:///system", **kwargs: Any) -> None:
            super().__init__(uri, backend=fake, **kwargs)

    _cli.DetachService = OnFake  # type: ignore[attr-defined]
    try:
        return _cli.main(sys.argv[1:])
    finally:
        fake.cancel_timers()


if __name__ == "__main__":
    sys.exit(main())
