"""A host agent process for the journal's kill tests (a test helper).

``python tests/real/_journal_agent.py URI DOMAIN ALIAS… [--journal PATH]
--requests-log FILE [--timeout S] [--attempts N] [--recover-only]
[--kill-at POINT[:N]]`` opens a :class:`~aiodetach.DetachService` (the
public API), prints one JSON line with what ``open()`` recovered and what is
pending, then detaches the devices concurrently and prints one JSON line per
outcome.

Every live request is appended to ``--requests-log`` *before* it goes to
libvirt, by the lab's request recorder
(:func:`aiodetach_lab.requests.appending_requests`): the file is an upper
bound of what reached QEMU, counted across processes, and survives a SIGKILL.  ``--kill-at`` SIGKILLs the process
itself at a journal fault point (``request.committed``, ``finish.written``…),
the N-th time it is reached (default 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from aiodetach import DetachService, DetachSettings, _journal
from aiodetach_lab.requests import appending_requests


def _kill_at(spec: str) -> None:
    point, _, nth = spec.partition(":")
    left = [int(nth or 1)]

    def fault(name: str) -> None:
        if name == point:
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    _journal.fault = fault


def _emit(payload: dict[str, object]) -> None:
    print(json.dumps(payload), flush=True)


async def run(args: argparse.Namespace) -> int:
    settings = DetachSettings(
        timeout=args.timeout, attempts=args.attempts, journal_sync=args.journal_sync
    )
    svc = DetachService(args.uri, settings=settings, journal=args.journal, log=False)
    async with svc:
        _emit(
            {
                "opened": time.time(),
                "recovered": [r.model_dump() for r in svc.recovered()],
                "pending": [list(p) for p in svc.pending()],
            }
        )
        if args.recover_only:
            return 0

        async def one(alias: str) -> None:
            try:
                result = await svc.detach(args.domain, alias=alias)
            except Exception as exc:
                _emit({"alias": alias, "ok": False, "error": type(exc).__name__})
                return
            _emit({"alias": alias, "ok": True, **result.model_dump()})

        await asyncio.gather(*(one(alias) for alias in args.aliases))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("domain")
    parser.add_argument("aliases", nargs="*")
    parser.add_argument("--journal")
    parser.add_argument("--journal-sync", default="full")
    parser.add_argument("--requests-log", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--attempts", type=int, default=8)
    parser.add_argument("--recover-only", action="store_true")
    parser.add_argument("--kill-at")
    args = parser.parse_args()
    if args.kill_at:
        _kill_at(args.kill_at)
    with appending_requests(args.requests_log):
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
