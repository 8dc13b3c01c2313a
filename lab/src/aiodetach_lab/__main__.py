"""``aiodetach-lab``: the lab's command line (``python -m aiodetach_lab``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aiodetach-lab", description="aiodetach's hypervisor lab (development only)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="a real detach demo on throwaway QEMU guests (starts libvirtd if needed)"
    )
    demo.add_argument("--uri", default="qemu:///system")
    demo.add_argument(
        "--no-booted",
        action="store_true",
        help="skip the booted Linux guest part (OS-less guest only)",
    )
    libvirtd = sub.add_parser("libvirtd", help="make sure a libvirtd answers (start one if not)")
    libvirtd.add_argument("--uri", default="qemu:///system")
    sub.add_parser("guest-image", help="build (or find cached) the tiny Linux guest image")
    cleanup = sub.add_parser("cleanup", help="remove lab domains left by crashed runs")
    cleanup.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args(argv)

    from . import domains

    try:
        if args.command == "demo":
            from aiodetach._cli import configure_logging

            from .demo import run_demo

            configure_logging(as_json=False, verbose=False, stream=sys.stdout)
            return asyncio.run(run_demo(args.uri, booted=not args.no_booted))
        if args.command == "libvirtd":
            took = domains.ensure_libvirtd(args.uri)
            print(f"libvirtd answers at {args.uri} ({took:.1f} s)")
            return 0
        if args.command == "guest-image":
            from .guest import build_guest_image

            image = build_guest_image()
            print(f"{image.kernel}\n{image.initrd}")
            return 0
        removed = domains.cleanup_leftovers(args.uri)
        print(f"removed {removed} leftover lab domain(s)")
        return 0
    except (domains.LabError, KeyboardInterrupt) as exc:
        # The lab's errors are one line for a person at a terminal; ^C is quiet.
        if isinstance(exc, KeyboardInterrupt):
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
