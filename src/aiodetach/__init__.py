"""aiodetach: detach devices from libvirt/QEMU guests correctly, on asyncio.

The public surface is what ``__all__`` lists; modules whose names start with
``_`` are internal.  Errors live in [`aiodetach.errors`][aiodetach.errors], the fake
hypervisor for tests in [`aiodetach.testing`][aiodetach.testing].
"""

from __future__ import annotations

from ._blocking import BlockingDetachService
from ._eventloop import install_event_loop
from ._fleet import DetachFleet
from ._many import DetachOutcome, DetachRequest
from ._result import DetachResult, Recovered
from ._service import DetachService, DeviceEvent
from ._settings import DetachSettings
from ._version import __version__
from .errors import DetachError

__all__ = [
    "BlockingDetachService",
    "DetachError",
    "DetachFleet",
    "DetachOutcome",
    "DetachRequest",
    "DetachResult",
    "DetachService",
    "DetachSettings",
    "DeviceEvent",
    "Recovered",
    "__version__",
    "install_event_loop",
]
