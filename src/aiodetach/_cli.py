"""The ``aiodetach`` command.

The only place in the package that configures structlog: the library logs
namespaced events; here they become progress lines ("attempt 2 of 8…") on
stderr, or JSON lines with ``--json``.  Results go to stdout.  Each error
class has its own exit status so scripts can branch on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from . import __version__
from ._many import DetachOutcome
from ._result import DetachResult
from ._service import DetachService
from ._settings import DetachSettings
from .errors import (
    ConnectionLost,
    DetachError,
    DetachFailed,
    DetachRefused,
    DetachTimeout,
    DeviceNotFound,
    DomainNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    InvalidRequest,
    ReadOnlyConnection,
)

__all__ = ["EXIT_CODES", "main"]

EXIT_CODES: list[tuple[type[DetachError], int]] = [
    (InvalidRequest, 2),
    (DomainNotFound, 3),
    (DeviceNotFound, 4),
    (DomainNotRunning, 5),  # includes DomainStopped
    (DomainNotPersistent, 5),
    (DetachFailed, 6),
    (DetachTimeout, 7),
    (DetachRefused, 8),
    (ConnectionLost, 9),
    (ReadOnlyConnection, 10),
    (DetachError, 11),
]
"""Exit status per error class, most specific first (0: success, 130: interrupted;
``detach-many``: 12 when some devices failed)."""


def exit_code_for(exc: DetachError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 11


# -- logging -------------------------------------------------------------------------

_PROGRESS: dict[str, Callable[[MutableMapping[str, Any]], str]] = {
    "aiodetach.persistent_detached": lambda e: "removed from the persistent definition",
    "aiodetach.persistent_missing_ignored": lambda e: (
        "not in the persistent definition (live only): ignored"
    ),
    "aiodetach.detach_sent": lambda e: (
        f"attempt {e['attempt']} of {e['attempts']}: live detach request sent"
    ),
    "aiodetach.detach_joined": lambda e: "joined a detach of this device already in flight",
    "aiodetach.unplug_in_progress": lambda e: "an unplug is already in progress: waiting for it",
    "aiodetach.busy_backoff": lambda e: (
        f"the guest is busy (slot still settling): sending again in {e['delay']:g} s"
    ),
    "aiodetach.stale_event_ignored": lambda e: (
        "ignored an event from before our request: the device is still attached"
    ),
    "aiodetach.attempt_timed_out": lambda e: (
        f"attempt {e['attempt']} of {e['attempts']}: no DEVICE_REMOVED within "
        f"{e['timeout']:g} s; re-reading the live XML"
    ),
    "aiodetach.removed_without_event": lambda e: (
        "the live XML shows the device gone (its event was lost)"
    ),
    "aiodetach.detach_timeout": lambda e: (
        f"gave up: the device is still attached after {e['attempts']} attempt(s)"
    ),
    "aiodetach.removal_failed": lambda e: "DEVICE_REMOVAL_FAILED: the guest rejected the unplug",
    "aiodetach.domain_stopped": lambda e: f"the domain stopped ({e.get('reason')})",
    "aiodetach.connection_lost": lambda e: f"lost the connection to libvirtd ({e.get('reason')})",
    "aiodetach.reconnected": lambda e: "reconnected to libvirtd",
    "aiodetach.detached": lambda e: (
        f"detached in {e['elapsed']:.3f} s after {e['attempts']} request(s)"
    ),
}


def _progress_renderer(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    name = str(event.get("event"))
    fmt = _PROGRESS.get(name)
    where = f"{event.get('domain', '')}/{event.get('alias') or event.get('device', '')}"
    text = fmt(event) if fmt else name
    return f"[{where}] {text}"


def configure_logging(*, as_json: bool, verbose: bool, stream: Any = None) -> None:
    """Progress lines (or JSON lines) on stderr; debug events only with -v."""
    level = 10 if verbose else 20
    renderer: Any = structlog.processors.JSONRenderer() if as_json else _progress_renderer
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


# -- commands ------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> DetachSettings:
    overrides: dict[str, Any] = {}
    if args.attempts is not None:
        overrides["attempts"] = args.attempts
    if args.timeout is not None:
        overrides["timeout"] = args.timeout
    return DetachSettings(**overrides)


def _print_result(result: DetachResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": True, **result.model_dump()}))
        return
    parts = []
    if result.live:
        parts.append(f"live (confirmed by {result.confirmed_by})")
    if result.persistent:
        parts.append("persistent")
    print(
        f"{result.domain_name}: {result.device} detached: {' + '.join(parts) or 'nothing'}; "
        f"{result.attempts} request(s), {result.elapsed:.3f} s"
    )


def _print_error(exc: DetachError, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "ok": False,
                    "error": type(exc).__name__,
                    "message": exc.message,
                    "domain": exc.domain,
                    "alias": exc.alias,
                    "libvirt_code": exc.libvirt_code,
                }
            )
        )
    else:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)


async def _detach(args: argparse.Namespace, xml: str | None) -> int:
    async with DetachService(args.uri, settings=_settings(args)) as svc:
        result = await svc.detach(
            args.domain,
            alias=args.alias,
            target=args.target,
            mac=args.mac,
            xml=xml,
            live=args.live,
            persistent=args.persistent,
        )
    _print_result(result, args.json)
    return 0


def parse_batch(text: str) -> list[dict[str, Any]]:
    """Batch lines: a JSON object, or ``DOMAIN key=value …`` (``#`` comments).

    Keys are those of :class:`aiodetach.DetachRequest`; ``live``/``persistent``
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


class _ProgressBar:
    """One redrawn stderr line: [#####-----] 37/100 ok=35 failed=2."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.ok = self.failed = 0

    def update(self, outcome: DetachOutcome, done: int, total: int) -> None:
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
        if self.enabled:
            width = 30
            filled = width * done // max(total, 1)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r[{bar}] {done}/{total} ok={self.ok} failed={self.failed}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def _detach_many(args: argparse.Namespace, text: str) -> int:
    requests = parse_batch(text)
    bar = _ProgressBar(
        len(requests), enabled=(not args.json and sys.stderr.isatty()) or args.progress
    )
    async with DetachService(args.uri, settings=_settings(args)) as svc:
        outcomes = await svc.detach_many(
            requests,
            concurrency=args.concurrency,
            per_domain=args.per_domain,
            on_progress=bar.update,
        )
    for outcome in outcomes:
        if args.json:
            payload: dict[str, Any] = {"request": outcome.request.model_dump(exclude_none=True)}
            if outcome.result is not None:
                payload |= {"ok": True, **outcome.result.model_dump()}
            elif outcome.error is not None:
                payload |= {
                    "ok": False,
                    "error": type(outcome.error).__name__,
                    "message": outcome.error.message,
                    "libvirt_code": outcome.error.libvirt_code,
                }
            print(json.dumps(payload))
        elif outcome.result is not None:
            r = outcome.result
            print(
                f"ok     {outcome.request.describe()}: {r.attempts} request(s), {r.elapsed:.3f} s"
            )
        else:
            print(
                f"FAILED {outcome.request.describe()}: {type(outcome.error).__name__}: "
                f"{outcome.error}"
            )
    failed = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes) - failed} detached, {failed} failed", file=sys.stderr)
    return 0 if failed == 0 else 12


async def _watch(args: argparse.Namespace) -> int:
    async with DetachService(args.uri, read_only=True) as svc:
        if not args.json:
            print(f"watching device events on {args.uri} (Ctrl-C to stop)", file=sys.stderr)
        async for event in svc.events(args.domain):
            if args.json:
                print(
                    json.dumps(
                        {
                            "kind": event.kind,
                            "domain_uuid": event.domain_uuid,
                            "domain": event.domain_name,
                            "alias": event.alias,
                            "detail": event.detail,
                            "timestamp": event.timestamp,
                        }
                    ),
                    flush=True,
                )
            else:
                detail = f" ({event.detail})" if event.detail else ""
                print(
                    f"{event.kind:<22} {event.domain_name:<24} {event.alias or '-'}{detail}",
                    flush=True,
                )
    return 0


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

    watch = sub.add_parser("watch", help="stream device-removed / removal-failed events")
    watch.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    watch.add_argument("--uri", default="qemu:///system")
    watch.add_argument("--json", action="store_true")

    demo = sub.add_parser(
        "demo", help="a real detach demo on a throwaway QEMU guest (sets up libvirtd)"
    )
    demo.add_argument("--uri", default="qemu:///system")
    demo.add_argument(
        "--no-booted",
        action="store_true",
        help="skip the booted Linux guest part (OS-less guest only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    stream = sys.stdout if args.command == "demo" else None
    configure_logging(as_json=as_json, verbose=args.verbose, stream=stream)
    try:
        if args.command == "detach":
            xml = Path(args.xml_file).read_text() if args.xml_file else None
            return asyncio.run(_detach(args, xml))
        if args.command == "detach-many":
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            return asyncio.run(_detach_many(args, text))
        if args.command == "watch":
            return asyncio.run(_watch(args))
        from ._demo import run_demo

        return asyncio.run(run_demo(args.uri, booted=not args.no_booted))
    except DetachError as exc:
        _print_error(exc, as_json)
        return exit_code_for(exc)
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
