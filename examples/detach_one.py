"""Detach one device from a running domain and print what happened.

python examples/detach_one.py vm-1 ua-disk1 [qemu:///system]
"""

from __future__ import annotations

import asyncio
import sys

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import DetachError, DetachTimeout, DomainStopped


async def main(domain: str, alias: str, uri: str) -> int:
    settings = DetachSettings(attempts=4, timeout=10)
    async with DetachService(uri, settings=settings) as svc:
        try:
            result = await svc.detach(domain, alias=alias)
        except DetachTimeout as exc:
            print(f"still attached after {exc.attempts} requests: {exc}")
            return 1
        except DomainStopped as exc:
            print(f"the domain stopped ({exc.reason}) before the guest confirmed")
            return 1
        except DetachError as exc:
            print(f"{type(exc).__name__}: {exc} (libvirt code {exc.libvirt_code})")
            return 1
    print(
        f"{result.device} detached from {result.domain_name}: "
        f"live={result.live} persistent={result.persistent}, "
        f"{result.attempts} request(s), confirmed by {result.confirmed_by}, "
        f"{result.elapsed:.3f} s"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    uri = sys.argv[3] if len(sys.argv) > 3 else "qemu:///system"
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], uri)))
