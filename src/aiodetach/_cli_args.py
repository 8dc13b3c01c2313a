"""The ``aiodetach`` command's arguments: its options, and the batch file format.

Kept apart from `aiodetach._cli` (what the commands do and print) so
that each reads as one thing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._completion import add_completion_command
from ._settings import DetachSettings
from ._version import __version__
from .errors import InvalidRequest

__all__ = ["build_parser", "parse_batch", "settings_from"]


def settings_from(args: argparse.Namespace) -> DetachSettings:
    overrides: dict[str, Any] = {}
    if args.attempts is not None:
        overrides["attempts"] = args.attempts
    if args.timeout is not None:
        overrides["timeout"] = args.timeout
    return DetachSettings(**overrides)


def parse_batch(text: str) -> list[dict[str, Any]]:
    """Batch lines: a JSON object, or ``DOMAIN key=value …`` (``#`` comments).

    Keys are those of [`aiodetach.DetachRequest`][aiodetach.DetachRequest]; ``live``/``persistent``
    take true/false.
    """
    requests: list[dict[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("{", "[")):
            try:
                loaded = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"line {number}: invalid JSON: {exc}") from None
            if not isinstance(loaded, dict):
                raise InvalidRequest(f"line {number}: expected a JSON object")
            requests.append(loaded)
            continue
        domain, *pairs = line.split()
        item: dict[str, Any] = {"domain": domain}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise InvalidRequest(f"line {number}: expected key=value, got {pair!r}")
            if key in ("live", "persistent"):
                if value.lower() not in ("true", "false"):
                    raise InvalidRequest(f"line {number}: {key} must be true or false")
                item[key] = value.lower() == "true"
            else:
                item[key] = value
        requests.append(item)
    return requests


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port while running (needs aiodetach[prometheus])",
    )
    parser.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics server binds (default 127.0.0.1)",
    )


def _journal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal",
        metavar="PATH",
        help="SQLite journal of the live requests sent: a re-run after this process was "
        "killed joins the unplugs still pending instead of re-sending (exit 13 if unusable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiodetach",
        description="Detach devices from libvirt/QEMU guests, waiting for the guest.",
    )
    parser.add_argument("--version", action="version", version=f"aiodetach {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug events too")
    sub = parser.add_subparsers(dest="command", required=True)

    detach = sub.add_parser("detach", help="detach one device and wait until it is gone")
    detach.add_argument("domain", help="domain name or UUID")
    which = detach.add_mutually_exclusive_group(required=True)
    which.add_argument("--alias", help="device alias, e.g. ua-disk1 or virtio-disk1")
    which.add_argument("--target", help="disk target dev, e.g. vdb")
    which.add_argument("--mac", help="interface MAC address")
    which.add_argument("--xml-file", help="file with the device XML")
    detach.add_argument("--uri", default="qemu:///system")
    detach.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="detach from the running guest (default: if it runs)",
    )
    detach.add_argument(
        "--persistent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="detach from the persistent definition (default: if it has one)",
    )
    detach.add_argument("--attempts", type=int, help="live requests at most (default 8)")
    detach.add_argument("--timeout", type=float, help="seconds per attempt (default 20)")
    detach.add_argument("--json", action="store_true", help="JSON result on stdout")
    _journal_option(detach)

    many = sub.add_parser(
        "detach-many", help="detach a list of devices (file or stdin) with bounded concurrency"
    )
    many.add_argument(
        "file",
        nargs="?",
        default="-",
        help="one request per line: JSON, or 'DOMAIN alias=… [live=false]'; - = stdin",
    )
    many.add_argument("--uri", default="qemu:///system")
    many.add_argument("--concurrency", type=int, default=16)
    many.add_argument("--per-domain", type=int, default=4)
    many.add_argument("--attempts", type=int, help="live requests at most (default 8)")
    many.add_argument("--timeout", type=float, help="seconds per attempt (default 20)")
    many.add_argument("--json", action="store_true", help="one JSON line per device")
    many.add_argument("--progress", action="store_true", help="progress bar even if not a tty")
    _journal_option(many)
    _metrics_options(many)

    watch = sub.add_parser("watch", help="stream device-removed / removal-failed events")
    watch.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    watch.add_argument("--uri", default="qemu:///system")
    watch.add_argument("--json", action="store_true")
    _metrics_options(watch)

    add_completion_command(sub)

    demo = sub.add_parser("demo", help="how to run the demo (it lives in the repository's lab)")
    demo.add_argument("--uri", help=argparse.SUPPRESS)  # the options it had, still accepted
    demo.add_argument("--no-booted", action="store_true", help=argparse.SUPPRESS)
    return parser
