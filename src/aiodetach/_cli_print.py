"""What the ``aiodetach`` command prints: results, errors, dry runs and a
batch's lines, as text for a person or as `aiodetach._cli_json`'s
objects under ``--json``; and how it leaves a reader that went away.

Kept apart from `aiodetach._cli` (what the commands do) so each reads
as one thing.  Errors go to stderr as text, and to stdout as well under
``--json`` (a script reads one stream).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ._cli_args import UsageError
from ._cli_json import (
    BatchDetached,
    BatchFailed,
    DetachFailure,
    DetachSuccess,
    DryRun,
    error_info,
    line,
    result_info,
)
from ._cli_tally import Tally
from ._many import DetachOutcome
from ._result import DetachResult
from .errors import DetachError

__all__ = [
    "print_dry_run",
    "print_error",
    "print_outcome",
    "print_result",
    "print_usage_error",
    "printable",
    "quiet_stdout",
]


def print_result(result: DetachResult, as_json: bool, uri: str) -> None:
    if as_json:
        print(line(DetachSuccess(uri=uri, **result_info(result).model_dump())))
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


def print_error(
    exc: DetachError,
    as_json: bool,
    *,
    code: int,
    uri: str | None = None,
    tally: Tally | None = None,
) -> None:
    if as_json:
        attempts, elapsed = tally.of(exc) if tally is not None else (None, None)
        info = error_info(exc, attempts=attempts, elapsed=elapsed)
        print(line(DetachFailure(exit_code=code, uri=uri, **info.model_dump())))
    else:
        print(printable(f"error: {type(exc).__name__}: {exc}"), file=sys.stderr)
        if exc.persistent_done:
            print(
                "note: the device was already removed from the persistent definition",
                file=sys.stderr,
            )


def print_dry_run(plan: DryRun, as_json: bool) -> None:
    if as_json:
        print(line(plan))
        return
    state = "running" if plan.running else "not running"
    print(f"dry run: {plan.domain_name} ({plan.domain_uuid}) on {plan.uri}, {state}")
    for name, half in (("live", plan.live), ("persistent", plan.persistent)):
        if half is None:
            print(f"  {name:<10}  not touched")
            continue
        print(f"  {name:<10}  {half.device}  alias {half.alias or '-'}  ({half.identity or '-'})")
        print(f"  {'':<10}  would call {half.request}")
    print("nothing was changed")


def print_outcome(outcome: DetachOutcome, *, as_json: bool, uri: str, tally: Tally) -> None:
    """One device of a batch: a JSON line as it ends, or a line of text."""
    uri = outcome.request.uri or uri
    if as_json:
        where: dict[str, Any] = {
            "index": outcome.index,
            "request": outcome.request.model_dump(exclude_none=True),
            "uri": uri,
        }
        payload: BatchDetached | BatchFailed
        if outcome.result is not None:
            payload = BatchDetached(**where, **result_info(outcome.result).model_dump())
        else:
            assert outcome.error is not None
            attempts, elapsed = tally.of(outcome.error)
            failure = error_info(outcome.error, attempts=attempts, elapsed=elapsed)
            payload = BatchFailed(**where, **failure.model_dump())
        print(line(payload), flush=True)
        return
    on = "" if outcome.request.uri is None else f" on {uri}"
    if outcome.result is not None:
        r = outcome.result
        print(
            f"ok     {outcome.request.describe()}{on}: {r.attempts} request(s), {r.elapsed:.3f} s"
        )
    else:
        print(
            f"FAILED {outcome.request.describe()}{on}: {type(outcome.error).__name__}: "
            f"{outcome.error}"
        )


def print_usage_error(exc: UsageError, as_json: bool) -> None:
    if as_json:
        failure = DetachFailure(
            exit_code=2,
            uri=None,
            error="UsageError",
            message=exc.message,
            domain=None,
            alias=None,
            libvirt_code=None,
            persistent_done=False,
            attempts=None,
            elapsed=None,
        )
        print(line(failure), flush=True)
    exc.parser.print_usage(sys.stderr)
    print(printable(f"{exc.parser.prog}: error: {exc.message}"), file=sys.stderr)


def printable(text: str) -> str:
    """``text`` as any stream can write it: an argument that was not valid in
    the locale's encoding reaches Python as lone surrogates, which a strict
    stream refuses (the message about it must not fail in turn)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quiet_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush at exit must
    not fail again on the closed pipe ("Exception ignored … BrokenPipeError")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file (a test's capture): nothing will flush into a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
