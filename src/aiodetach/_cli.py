"""The ``aiodetach`` command.

The only place in the package that configures structlog.  Progress lines
("attempt 2 of 8…") on stderr are drawn from hook records
(`aiodetach._progress`), not from log event names, so renaming a log
call cannot break them; on a terminal a live display moves while a guest is
waited for (`aiodetach._progress_live`), and SIGINT/SIGTERM end with a
report per device (`aiodetach._interrupts`);
with ``--json`` the library's log events go to stderr as JSON lines.
Results go to stdout.  Each error class has its own exit status so scripts
can branch on it.  ``--metrics-port`` serves Prometheus metrics while
``detach-many`` or ``watch`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import libvirt
import structlog
from pydantic import ValidationError

from ._cli_args import build_parser, parse_batch, settings_from
from ._completion import script as completion_script
from ._interrupts import Interrupted, interruptible, report
from ._progress import Display, ProgressLines, open_display
from ._result import DetachResult
from ._service import DetachService
from ._tracking import Tracker
from .errors import (
    AmbiguousDevice,
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
    JournalError,
    ReadOnlyConnection,
)
from .instrumentation import Hook

__all__ = ["EXIT_CODES", "build_parser", "main", "parse_batch"]

EXIT_CODES: list[tuple[type[DetachError], int]] = [
    (InvalidRequest, 2),
    (DomainNotFound, 3),
    (DeviceNotFound, 4),
    (AmbiguousDevice, 14),
    (DomainNotRunning, 5),  # includes DomainStopped
    (DomainNotPersistent, 5),
    (DetachFailed, 6),
    (DetachTimeout, 7),
    (DetachRefused, 8),
    (ConnectionLost, 9),
    (ReadOnlyConnection, 10),
    (JournalError, 13),
    (DetachError, 11),
]
"""Exit status per error class, most specific first (0: success, 130: interrupted;
``detach-many``: 12 when some devices failed; 13: the journal cannot be used)."""


def exit_code_for(exc: DetachError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 11


# -- output --------------------------------------------------------------------------


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written.  structlog's logger
    factory keeps the stream it is given; holding ``sys.stderr`` itself would
    keep writing into a stream that was replaced and closed (a test's capture,
    a caller that redirected stderr after calling `main()`)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, as_json: bool, verbose: bool, stream: Any = None) -> None:
    """The library's structlog events on stderr: JSON lines with ``--json``
    (info and up, debug with -v); otherwise key=value lines, warnings only
    unless -v (progress comes from the hooks, see `aiodetach._progress`)."""
    level = 10 if verbose else (20 if as_json else 30)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, stream or _Stderr())),
        cache_logger_on_first_use=False,
    )


def _service(
    args: argparse.Namespace,
    hooks: list[Hook],
    *,
    read_only: bool = False,
) -> DetachService:
    """The service of a command.  Progress: the hooks' lines, or with
    ``--json`` the library's log events as JSON lines (the logging hook)."""
    as_json = bool(getattr(args, "json", False))
    journal = getattr(args, "journal", None)
    return DetachService(
        args.uri,
        settings=None if read_only else settings_from(args),
        read_only=read_only,
        hooks=hooks,
        log=as_json or args.verbose,
        **({"journal": journal} if journal is not None else {}),
    )


class _Metrics:
    """``--metrics-port``: Prometheus metrics served over HTTP while a command runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.hooks: list[Hook] = []
        self.registry: Any = None
        self._server: Any = None
        self._port: int | None = args.metrics_port
        self._addr: str = args.metrics_addr

    def __enter__(self) -> _Metrics:
        if self._port is None:
            return self
        try:
            import prometheus_client
        except ImportError:
            raise InvalidRequest(
                "--metrics-port needs prometheus-client: pip install 'aiodetach[prometheus]'"
            ) from None
        from .instrumentation import prometheus_hook

        self.registry = registry = prometheus_client.CollectorRegistry()
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        self.hooks.append(prometheus_hook(registry))
        self._server, _thread = prometheus_client.start_http_server(
            self._port, addr=self._addr, registry=registry
        )
        host, port = self._server.server_address[:2]
        print(f"serving Prometheus metrics on http://{host}:{port}/metrics", file=sys.stderr)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# -- commands ------------------------------------------------------------------------


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
        + ("; resumed from the journal" if result.resumed else "")
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


@contextlib.asynccontextmanager
async def _showing(display: Display | None, args: argparse.Namespace) -> AsyncIterator[None]:
    """The progress display for the block, with the log lines drawn above it
    (not through it); stderr again for what is printed after."""
    if display is None:
        yield
        return
    configure_logging(as_json=args.json, verbose=args.verbose, stream=display)
    try:
        async with display:
            yield
    finally:
        configure_logging(as_json=args.json, verbose=args.verbose)


async def _detach(args: argparse.Namespace, xml: str | None, tracker: Tracker) -> int:
    display = None if args.json else open_display(tracker, sys.stderr, total=1, batch=False)
    hooks: list[Hook] = [tracker] + ([display] if display is not None else [])
    async with _service(args, hooks) as svc, _showing(display, args):
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


async def _detach_many(args: argparse.Namespace, text: str, tracker: Tracker) -> int:
    requests = parse_batch(text)
    display = (
        open_display(tracker, sys.stderr, total=len(requests), batch=True, force=args.progress)
        if args.progress or not args.json
        else None
    )
    hooks: list[Hook] = [tracker] + ([display] if display is not None else [])
    with _Metrics(args) as metrics:
        async with _service(args, hooks + metrics.hooks) as svc, _showing(display, args):
            outcomes = await svc.detach_many(
                requests, concurrency=args.concurrency, per_domain=args.per_domain
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
    with _Metrics(args) as metrics:
        return await _watch_events(args, metrics)


async def _watch_events(args: argparse.Namespace, metrics: _Metrics) -> int:
    seen: Any = None
    if metrics.registry is not None:
        from prometheus_client import Counter

        seen = Counter(
            "aiodetach_watched_events",
            "Device events seen by aiodetach watch, by kind.",
            ["kind"],
            registry=metrics.registry,
        )
        for kind in ("device-removed", "device-removal-failed", "domain-stopped"):
            seen.labels(kind)
    hooks: list[Hook] = [] if args.json else [ProgressLines(sys.stderr)]
    async with _service(args, hooks + metrics.hooks, read_only=True) as svc:
        if not args.json:
            print(f"watching device events on {args.uri} (Ctrl-C to stop)", file=sys.stderr)
        async for event in svc.events(args.domain):
            if seen is not None:
                seen.labels(event.kind).inc()
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


def _run(
    work: Coroutine[Any, Any, int],
    tracker: Tracker,
    requests: Sequence[Mapping[str, Any]],
    as_json: bool,
) -> int:
    """Run a command; on SIGINT/SIGTERM, once it closed, say per device what
    happened (`aiodetach._interrupts`) and exit 130/143."""
    try:
        return asyncio.run(interruptible(work, tracker))
    except Interrupted as exc:
        return report(tracker, requests, exc.signum, as_json=as_json)


def _named(text: str) -> list[dict[str, Any]]:
    """The batch's requests as written, for an interrupt's report (none if
    the batch does not parse: it was refused before anything started)."""
    try:
        return parse_batch(text)
    except DetachError:
        return []


DEMO_MOVED = (
    "the demo is part of aiodetach's development lab, not of the library: in a clone of\n"
    "aiodetach's repository run `bash examples/demo.sh` (it installs libvirt, QEMU and\n"
    "the lab, then runs `.venv/bin/aiodetach-lab demo`)"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    configure_logging(as_json=as_json, verbose=args.verbose)
    if args.command == "completion":
        print(completion_script(parser, args.shell), end="")
        return 0
    # The command line is the application: it owns libvirt's process-wide
    # error handler (the library never sets it), and reports errors itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    tracker = Tracker()  # what happened per device: for the display and an interrupt
    try:
        if args.command == "detach":
            xml = Path(args.xml_file).read_text() if args.xml_file else None
            named = {
                "domain": args.domain,
                "alias": args.alias,
                "target": args.target,
                "mac": args.mac,
                "xml_file": args.xml_file,
            }
            return _run(_detach(args, xml, tracker), tracker, [named], as_json)
        if args.command == "detach-many":
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            return _run(_detach_many(args, text, tracker), tracker, _named(text), as_json)
        if args.command == "watch":
            return asyncio.run(_watch(args))
        print(f"aiodetach demo: {DEMO_MOVED}", file=sys.stderr)
        return 2
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
