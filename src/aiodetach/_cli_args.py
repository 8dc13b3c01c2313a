"""The ``aiodetach`` command's arguments: its options, and the batch file format.

Kept apart from `aiodetach._cli` (what the commands do and print) so
that each reads as one thing.  Every value is checked here, by the option's
own type, so a bad one is an argparse-style usage error (exit 2) naming the
option, never a traceback from deep inside a run (a port of 70000 used to
reach the socket layer as an ``OverflowError``).

The options follow virsh where virsh has one: a global ``-c/--connect``,
``$LIBVIRT_DEFAULT_URI``, ``-v`` before or after the subcommand, and
``--live``/``--config``/``--persistent``/``--current`` with virsh's meanings.

"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from ._cli_batch import parse_batch
from ._completion import add_completion_command
from ._settings import DetachSettings
from ._version import __version__

__all__ = [
    "DEFAULT_URI",
    "UsageError",
    "build_parser",
    "default_uri",
    "halves_asked",
    "parse_batch",
    "read_text",
    "settings_from",
    "subparser",
    "uri_of",
    "wants_json",
]

DEFAULT_URI = "qemu:///system"
"""The URI when neither ``-c``/``--uri`` nor ``$LIBVIRT_DEFAULT_URI`` names one."""

MAX_TIMEOUT = 86400.0
"""Seconds per attempt at most: a day is already no detach; larger values
overflow the timers of threads and event loops."""


class UsageError(Exception):
    """A bad command line: reported as argparse does (usage, then the
    message naming the option, exit 2), and as a JSON object under ``--json``."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """Raises `UsageError` instead of exiting: the caller decides how
    to report it (``--json`` wants it on stdout too).  Subparsers are of the
    same class, so theirs are raised the same way."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in ``--help``, except for options whose absence means
    "the library's default" (None): their help says what that is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def default_uri(environ: Mapping[str, str] | None = None) -> str:
    """``$LIBVIRT_DEFAULT_URI`` if set and not empty, else :data:`DEFAULT_URI`."""
    env = os.environ if environ is None else environ
    return env.get("LIBVIRT_DEFAULT_URI", "").strip() or DEFAULT_URI


def uri_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The host of a command, as virsh picks it: ``-c/--connect`` (or the
    subcommand's ``--uri``), else ``$LIBVIRT_DEFAULT_URI``, else
    :data:`DEFAULT_URI`.  Naming two different hosts is a usage error."""
    connect = getattr(args, "connect", None)
    uri = getattr(args, "uri", None)
    if connect is not None and uri is not None and connect != uri:
        parser.error(f"-c/--connect {connect!r} and --uri {uri!r} name different hosts")
    return uri or connect or default_uri()


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of a subcommand (its usage errors show its own usage)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for JSON, even one argparse rejects
    (its usage error must be JSON too).  Options end at ``--``.  As argparse
    reads it: a prefix (``--js``) or a value (``--json=yes``, itself an error)
    still names ``--json``, whose usage error must then be JSON as well."""
    for arg in argv:
        if arg == "--":
            return False
        name = arg.partition("=")[0]
        if len(name) >= len("--j") and "--json".startswith(name):
            return True
    return False


def read_text(parser: argparse.ArgumentParser, option: str, path: str) -> str:
    """A file (``-``: stdin) as UTF-8 text; anything else is a usage error.
    A byte order mark (what Windows editors write first) is no part of the
    text: left in, it became part of the first line's domain name."""
    if path == "-" and sys.stdin is None:  # started with stdin closed (``<&-``)
        parser.error(f"argument {option}: cannot read '-': stdin is closed")
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        else:
            data = Path(path).read_bytes()
        text = data if isinstance(data, str) else data.decode("utf-8")
        return text.removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        parser.error(
            f"argument {option}: {path!r} is not UTF-8 text "
            f"(byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        )
    except OSError as exc:
        parser.error(f"argument {option}: cannot read {path!r}: {exc.strerror or exc}")


def settings_from(args: argparse.Namespace) -> DetachSettings:
    overrides: dict[str, Any] = {}
    if args.attempts is not None:
        overrides["attempts"] = args.attempts
    if args.timeout is not None:
        overrides["timeout"] = args.timeout
    return DetachSettings(**overrides)


def halves_asked(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[bool | None, bool | None]:
    """``(live, persistent)`` for `DetachService.detach` from virsh's
    flags and aiodetach's ``--no-live``/``--no-persistent`` (None: "as the
    domain is").  ``--current`` is resolved later, against the domain's state.

    virsh's meanings: ``--live`` the running guest only; ``--config`` the
    persistent definition only; both: both; ``--persistent`` the persistent
    definition, and the running guest if it runs.  With none of them
    aiodetach does both halves the domain has (virsh's default is
    ``--current``: the running guest only, if it runs).
    """
    live_flag, config, persistent_flag = args.live, args.config, args.persistent
    if args.current and (
        live_flag or config or persistent_flag or args.no_live or args.no_persistent
    ):
        parser.error("--current cannot be combined with another choice of definitions")
    if live_flag and args.no_live:
        parser.error("--live and --no-live contradict each other")
    if (config or persistent_flag) and args.no_persistent:
        parser.error("--config/--persistent and --no-persistent contradict each other")
    live: bool | None = None
    persistent: bool | None = None
    if live_flag:
        live = True
    elif args.no_live or config:
        live = False
    if config or persistent_flag:
        persistent = True
    elif args.no_persistent or live_flag:
        persistent = False
    if live is False and persistent is False:
        parser.error("nothing to detach: neither the running guest nor the persistent definition")
    return live, persistent


# -- value types: each names what it wants; argparse names the option ---------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds, got {text!r}"
        )
    return value


def _text(what: str) -> Callable[[str], str]:
    """A non-empty string without NUL (which no C string carries)."""

    def parse(text: str) -> str:
        if not text.strip() or "\x00" in text:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}")
        return text

    parse.__name__ = what
    return parse


_PORT = _int_in(0, 65535)
_POSITIVE = _int_in(1, 1_000_000)
_ATTEMPTS = _int_in(1, 1000)


# -- the parser --------------------------------------------------------------------------


def _uri_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--uri",
        type=_text("URI"),
        default=argparse.SUPPRESS,
        help=f"libvirt URI, as -c/--connect (default: -c, else $LIBVIRT_DEFAULT_URI, "
        f"else {DEFAULT_URI}; now {default_uri()})",
    )


def _verbose_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: absent after the subcommand leaves the global -v as it was.
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug events too"
    )


def _settings_options(parser: argparse.ArgumentParser) -> None:
    defaults = DetachSettings.model_fields
    parser.add_argument(
        "--attempts",
        type=_ATTEMPTS,
        help=f"live requests at most (default {defaults['attempts'].default}, "
        "or $AIODETACH_ATTEMPTS)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        help=f"seconds per attempt (default {defaults['timeout'].default:g}, "
        "or $AIODETACH_TIMEOUT)",
    )


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=_PORT,
        metavar="PORT",
        help="serve Prometheus metrics on this port while running, 0: any free port "
        "(needs aiodetach[prometheus])",
    )
    parser.add_argument(
        "--metrics-addr",
        type=_text("address"),
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics server binds",
    )


def _journal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal",
        type=_text("path"),
        metavar="PATH",
        help="SQLite journal of the live requests sent: a re-run after this process was "
        "killed joins the unplugs still pending instead of re-sending (exit 13 if unusable)",
    )


def _halves_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "which definitions",
        "aiodetach's default (none of these): the running guest if it runs AND the "
        "persistent definition if it has one, so the saved definition changes too "
        "(virsh's default is --current)",
    )
    group.add_argument("--live", action="store_true", help="the running guest only")
    group.add_argument("--config", action="store_true", help="the persistent definition only")
    group.add_argument(
        "--persistent",
        action="store_true",
        help="the persistent definition, and the running guest if it runs",
    )
    group.add_argument(
        "--current",
        action="store_true",
        help="the running guest if it runs, else the persistent definition",
    )
    group.add_argument("--no-live", action="store_true", help="not the running guest (as --config)")
    group.add_argument(
        "--no-persistent",
        action="store_true",
        help="not the persistent definition: the running guest, if it runs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aiodetach",
        description="Detach devices from libvirt/QEMU guests, waiting for the guest.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"aiodetach {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug events too")
    parser.add_argument(
        "-c",
        "--connect",
        type=_text("URI"),
        metavar="URI",
        help=f"libvirt URI of the host (default: $LIBVIRT_DEFAULT_URI, else {DEFAULT_URI}; "
        f"now {default_uri()})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        made = sub.add_parser(name, formatter_class=_Help, **kwargs)
        _verbose_option(made)
        return made

    detach = command("detach", help="detach one device and wait until it is gone")
    detach.add_argument(
        "domain", type=_text("domain"), help="domain name, UUID or ID (ID: as virsh, first)"
    )
    which = detach.add_mutually_exclusive_group(required=True)
    which.add_argument("--alias", help="device alias, e.g. ua-disk1 or virtio-disk1")
    which.add_argument("--target", help="disk target dev, e.g. vdb")
    which.add_argument("--mac", help="interface MAC address")
    which.add_argument("--xml-file", type=_text("path"), help="file with the device XML")
    _uri_option(detach)
    _halves_options(detach)
    _settings_options(detach)
    detach.add_argument("--json", action="store_true", help="JSON result on stdout")
    detach.add_argument(
        "--dry-run",
        action="store_true",
        help="show which device of each definition would be detached and the requests "
        "that would be sent; change nothing (a read-only connection)",
    )
    _journal_option(detach)

    many = command(
        "detach-many", help="detach a list of devices (file or stdin) with bounded concurrency"
    )
    many.add_argument(
        "file",
        nargs="?",
        default="-",
        help="one request per line: JSON, or 'DOMAIN alias=… [live=false] [uri=…]'; "
        "- = stdin; a line's uri sends it to that host",
    )
    _uri_option(many)
    many.add_argument(
        "--concurrency", type=_POSITIVE, default=16, help="detaches in flight at most"
    )
    many.add_argument(
        "--per-domain", type=_POSITIVE, default=4, help="detaches in flight per domain at most"
    )
    _settings_options(many)
    many.add_argument(
        "--json", action="store_true", help="one JSON line per device as it ends, then a summary"
    )
    many.add_argument("--progress", action="store_true", help="progress bar even if not a tty")
    _journal_option(many)
    _metrics_options(many)

    watch = command("watch", help="stream device-removed / removal-failed events")
    watch.add_argument(
        "domain", nargs="?", type=_text("domain"), help="only this domain (name or UUID)"
    )
    _uri_option(watch)
    watch.add_argument("--json", action="store_true", help="one JSON line per event")
    _metrics_options(watch)

    add_completion_command(sub)

    demo = command("demo", help="how to run the demo (it lives in the repository's lab)")

    demo.add_argument("--uri", help=argparse.SUPPRESS)  # the options it had, still accepted
    demo.add_argument("--no-booted", action="store_true", help=argparse.SUPPRESS)
    return parser
