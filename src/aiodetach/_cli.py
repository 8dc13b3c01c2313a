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

The arguments, checked to the last value, are `aiodetach._cli_args`'s
(a bad one is a usage error, never a traceback); what ``--json`` prints is
`aiodetach._cli_json`'s models, documented from themselves, printed
by `aiodetach._cli_print`;
``--dry-run``, ``--current`` and domain IDs are `aiodetach._cli_domain`'s.
``detach-many`` runs on a `DetachFleet`, so a line naming a host goes
to that host and to no other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, TextIO, cast

import libvirt
import structlog
from pydantic import ValidationError

from ._cli_args import (
    UsageError,
    build_parser,
    halves_asked,
    parse_batch,
    read_text,
    settings_from,
    subparser,
    uri_of,
    wants_json,
)
from ._cli_domain import current_halves, look_up, preview, resolve_domain
from ._cli_json import BatchSummary, WatchEvent, line
from ._cli_metrics import Metrics as _Metrics
from ._cli_print import (
    print_dry_run,
    print_error,
    print_outcome,
    print_result,
    print_usage_error,
    quiet_stdout,
)
from ._cli_tally import Tally
from ._completion import script as completion_script
from ._fleet import DetachFleet
from ._interrupts import EXIT_STATUS, Interrupted, interruptible, report
from ._many import DetachOutcome
from ._progress import Display, ProgressLines, open_display
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
        # A dry run (read-only) must not lock nor take up a journal.
        **({"journal": journal} if journal is not None and not read_only else {}),
    )


# -- commands ------------------------------------------------------------------------


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


async def _detach(args: argparse.Namespace, xml: str | None, tracker: Tracker, tally: Tally) -> int:
    live, persistent = args.halves
    display = (
        None
        if args.json or args.dry_run
        else open_display(tracker, sys.stderr, total=1, batch=False)
    )
    hooks: list[Hook] = [tracker, tally]
    if display is not None:
        hooks.append(display)
    async with _service(args, hooks, read_only=args.dry_run) as svc:
        domain = await resolve_domain(svc, args.domain)
        if args.current:
            live, persistent = await current_halves(svc, domain)
        selector = {"alias": args.alias, "target": args.target, "mac": args.mac, "xml": xml}
        if args.dry_run:
            plan = await preview(svc, domain, live=live, persistent=persistent, **selector)
            print_dry_run(plan, args.json)
            return 0
        async with _showing(display, args):
            result = await svc.detach(domain, live=live, persistent=persistent, **selector)
    print_result(result, args.json, args.uri)
    return 0


def _fleet(args: argparse.Namespace, hooks: list[Hook]) -> DetachFleet:
    """``detach-many``'s hosts: every line goes to the host it names (its
    ``uri``), the others to the command's (``-c``/``--uri``); each host gets
    its own service, opened on its first line."""
    journal = getattr(args, "journal", None)
    return DetachFleet(
        settings=settings_from(args),
        default_uri=args.uri,
        hooks=hooks,
        log=args.json or args.verbose,
        journal=journal,
    )


async def _detach_many(args: argparse.Namespace, text: str, tracker: Tracker, tally: Tally) -> int:
    requests = parse_batch(text)
    display = (
        open_display(tracker, sys.stderr, total=len(requests), batch=True, force=args.progress)
        if args.progress or not args.json
        else None
    )
    hooks: list[Hook] = [tracker, tally]
    if display is not None:
        hooks.append(display)
    outcomes: list[DetachOutcome] = []
    with _Metrics(args) as metrics:
        # JSON lines as each device ends (scripts follow a long batch); text
        # lines once the display is gone, in the batch's order.
        async with (
            _fleet(args, hooks + metrics.hooks) as fleet,
            _showing(display, args),
            contextlib.aclosing(
                fleet.detach_iter(
                    requests, concurrency=args.concurrency, per_domain=args.per_domain
                )
            ) as stream,
        ):
            async for outcome in stream:
                outcomes.append(outcome)
                if args.json:
                    print_outcome(outcome, as_json=args.json, uri=args.uri, tally=tally)
    if not args.json:
        for outcome in sorted(outcomes, key=lambda o: o.index):
            print_outcome(outcome, as_json=args.json, uri=args.uri, tally=tally)
    failed = sum(not o.ok for o in outcomes)
    code = 0 if failed == 0 else 12
    if args.json:
        summary = BatchSummary(
            total=len(outcomes), detached=len(outcomes) - failed, failed=failed, exit_code=code
        )
        print(line(summary), flush=True)
    else:
        print(f"{len(outcomes) - failed} detached, {failed} failed", file=sys.stderr)
    return code


async def _watch(args: argparse.Namespace) -> int:
    with _Metrics(args, _watched_events) as metrics:
        return await _watch_events(args, metrics)


def _watched_events(registry: Any) -> Any:
    from prometheus_client import Counter

    seen = Counter(
        "aiodetach_watched_events",
        "Device events seen by aiodetach watch, by kind.",
        ["kind"],
        registry=registry,
    )
    for kind in ("device-removed", "device-removal-failed", "domain-stopped"):
        seen.labels(kind)
    return seen


async def _watch_events(args: argparse.Namespace, metrics: _Metrics) -> int:
    seen: Any = metrics.own
    hooks: list[Hook] = [] if args.json else [ProgressLines(sys.stderr)]
    async with _service(args, hooks + metrics.hooks, read_only=True) as svc:
        if not args.json:
            print(f"watching device events on {args.uri} (Ctrl-C to stop)", file=sys.stderr)
        domain = None if args.domain is None else await resolve_domain(svc, args.domain)
        if domain is not None:
            await look_up(svc, domain)
        async for event in svc.events(domain):
            if seen is not None:
                seen.labels(event.kind).inc()
            if args.json:
                shown = WatchEvent(
                    kind=event.kind,
                    domain_uuid=event.domain_uuid,
                    domain=event.domain_name,
                    alias=event.alias,
                    detail=event.detail,
                    timestamp=event.timestamp,
                )
                print(line(shown), flush=True)
            else:
                detail = f" ({event.detail})" if event.detail else ""
                print(
                    f"{event.kind:<22} {event.domain_name:<24} {event.alias or '-'}{detail}",
                    flush=True,
                )
    return 0


def _interruptibly(
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
        code = EXIT_STATUS.get(signal.Signals(exc.signum), 130)
        return _told(code, partial(report, tracker, requests, exc.signum, as_json=as_json))


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
    arguments = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(arguments)
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            # Started with it closed (``2>&-``), Python has None there: what
            # would be written is lost, the exit status must not be (it was 1).
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    try:
        return _run(arguments)
    except UsageError as exc:
        return _told(2, partial(print_usage_error, exc, as_json))
    except BrokenPipeError:
        # The reader went away (`aiodetach watch --json | head -1`): what it
        # wanted it has; say nothing, as cat and grep do.
        quiet_stdout()
        return 0


def _told(code: int, say: Callable[[], object]) -> int:
    """Say how a command failed (or was interrupted), and exit ``code`` even
    if the reader of stdout went away: that costs the reader the words, not
    the script its status (``aiodetach detach … --json | true`` must not turn
    a DomainNotFound into 0; only a command that succeeded exits 0 so)."""
    try:
        say()
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
    return code


def _run(arguments: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version: printed, and done
        return exc.code if isinstance(exc.code, int) else 0
    args.uri = uri_of(args, parser)
    if args.command == "detach":
        args.halves = halves_asked(args, parser)
    as_json = bool(getattr(args, "json", False))
    configure_logging(as_json=as_json, verbose=args.verbose)
    if args.command == "completion":
        print(completion_script(parser, args.shell), end="")
        return 0
    # The command line is the application: it owns libvirt's process-wide
    # error handler (the library never sets it), and reports errors itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    tally = Tally()
    tracker = Tracker()  # what happened per device: for the display and an interrupt
    try:
        if args.command == "detach":
            command = subparser(parser, args.command)
            xml = read_text(command, "--xml-file", args.xml_file) if args.xml_file else None
            given = ("domain", "alias", "target", "mac", "xml_file")  # as given: no nulls
            named = {key: getattr(args, key) for key in given if getattr(args, key) is not None}
            work = _detach(args, xml, tracker, tally)
            return _interruptibly(work, tracker, [named], as_json)
        if args.command == "detach-many":
            text = read_text(subparser(parser, args.command), "FILE", args.file)
            work = _detach_many(args, text, tracker, tally)
            return _interruptibly(work, tracker, _named(text), as_json)
        if args.command == "watch":
            # No report (it changed nothing); closed, and 130/143 as any command.
            try:
                return asyncio.run(interruptible(_watch(args), tracker))
            except Interrupted as exc:
                return EXIT_STATUS.get(signal.Signals(exc.signum), 130)
        print(f"aiodetach demo: {DEMO_MOVED}", file=sys.stderr)
        return 2
    except DetachError as exc:
        code = exit_code_for(exc)
        return _told(code, partial(print_error, exc, as_json, code=code, uri=args.uri, tally=tally))
    except ValidationError as exc:
        invalid = InvalidRequest(f"invalid settings: {exc}")
        return _told(2, lambda: print_error(invalid, as_json, code=2, uri=args.uri))
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        # The metrics server's address, a file that cannot be read…
        unusable = InvalidRequest(str(exc))
        return _told(2, lambda: print_error(unusable, as_json, code=2, uri=args.uri))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
