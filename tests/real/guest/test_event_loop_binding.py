"""BUG: a DetachService given its own LibvirtBackend does not bind libvirt's events.

``DetachService.open()`` calls ``install_event_loop()`` only when it built the
backend itself (``self._real``).  A caller passing ``backend=LibvirtBackend(uri)``
(or a subclass, e.g. to count requests, as the real-QEMU tests do) gets:

* in a fresh process: ``open()`` fails, "could not initialize domain event
  timer" (no libvirt event implementation is registered at all);
* after an earlier service on another, now closed, loop: ``open()`` works but
  the events stay bound to the dead loop, so DEVICE_REMOVED never arrives and
  every detach ends by timeout + XML re-check (``confirmed_by == "xml"``).

Each case runs in its own interpreter, so the result does not depend on what
other tests registered before.  The suite works around it in
``_support.recording_service`` by calling ``install_event_loop()`` first.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from aiodetach import DetachService, DetachSettings
    from aiodetach_lab import domains as _lab
    from aiodetach._libvirt import LibvirtBackend

    uri, mode = sys.argv[1], sys.argv[2]

    async def plain():
        async with DetachService(uri):
            pass

    async def own_backend(name):
        settings = DetachSettings(timeout=2, attempts=1)
        async with DetachService(uri, backend=LibvirtBackend(uri), settings=settings) as svc:
            if name is None:
                return "opened"
            result = await svc.detach(name, alias="ua-scsi1", persistent=False)
            return result.confirmed_by

    if mode == "fresh":
        print(asyncio.run(own_backend(None)))
    else:
        asyncio.run(plain())
        disks = [_lab.DiskSpec("sda", "scsi", alias="ua-scsi1")]
        with _lab.throwaway_domain(uri, disks=disks) as dom:
            print(asyncio.run(own_backend(dom.name)))
    """
)


def _run(uri: str, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, uri, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_service_with_own_libvirt_backend_opens_in_a_fresh_process(libvirtd: str) -> None:
    proc = _run(libvirtd, "fresh")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip().endswith("opened")


def test_service_with_own_libvirt_backend_gets_events_on_a_second_loop(libvirtd: str) -> None:
    proc = _run(libvirtd, "second-loop")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip().splitlines()[-1] == "event", proc.stdout[-500:]
