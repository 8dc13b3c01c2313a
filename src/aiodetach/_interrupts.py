"""Ctrl-C and SIGTERM in the CLI: close cleanly, then say what was done.

An interrupted detach is not "nothing happened": the persistent definition
may already be changed, and a live request may be pending in the guest (it
may still remove the device after we left).  So the first SIGINT or SIGTERM
cancels the command; its ``async with`` closes the service (``aclose``:
nothing is left running); then `report` says per device what happened,
from the hook records the `aiodetach._tracking.Tracker` kept, and the
command exits 130 (SIGINT) or 143 (SIGTERM).  A second signal while it closes
exits at once: an operator pressing Ctrl-C twice wants out, not another wait.

Signal handlers are process-wide state: only the command installs them (the
library never does), on its own loop, and removes them when it is done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from ._cli_json import Interrupted as InterruptedLine
from ._cli_json import InterruptedSummary, line
from ._tracking import Call, DeviceState, Tracker

__all__ = ["EXIT_STATUS", "Interrupted", "interrupted_json", "interruptible", "report"]

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""128 + the signal's number, as shells report a command a signal ended."""

STATE_TEXT: dict[DeviceState, str] = {
    "removed": "removed",
    "failed": "failed",
    "request_outstanding": "request outstanding in the guest (it may still remove it)",
    "persistent_changed": "persistent definition changed; no live request sent",
    "unchanged": "started; nothing changed",
    "not_started": "not started",
}

SHORT: dict[DeviceState, str] = {
    "removed": "removed",
    "failed": "failed",
    "request_outstanding": "request outstanding",
    "persistent_changed": "persistent definition changed only",
    "unchanged": "unchanged",
    "not_started": "not started",
}


class Interrupted(Exception):
    """The command was cancelled by a signal (its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


async def interruptible(work: Awaitable[int], tracker: Tracker) -> int:
    """Await ``work`` (a command), cancelled by the first SIGINT/SIGTERM.

    Raises `Interrupted` once ``work`` has unwound (its services
    closed); a second signal meanwhile ends the process at once.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    got: list[int] = []

    def on_signal(signum: int) -> None:
        if got:
            _exit_now(signum)
        got.append(signum)
        name = signal.Signals(signum).name
        tracker.notice(f"interrupted ({name}): closing; press Ctrl-C again to exit at once")
        task.cancel()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            return await task
        except asyncio.CancelledError:
            if not got or not task.cancelled():
                raise
            raise Interrupted(got[0]) from None
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _exit_now(signum: int) -> None:
    """No cleanup, no waiting: flush what was written, and go."""
    try:
        sys.stderr.write("interrupted again: exiting now\n")
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(EXIT_STATUS.get(signal.Signals(signum), 130))


# -- what happened, per device --------------------------------------------------------


def _matches(call: Call, request: Mapping[str, Any], exact: bool) -> bool:
    if call.named_domain != request.get("domain"):
        return False
    return not exact or call.named_alias == request.get("alias")


def devices(
    tracker: Tracker, requests: Sequence[Mapping[str, Any]]
) -> list[tuple[Mapping[str, Any] | None, Call | None]]:
    """Each request (in order) with the call that ran it, if one started.

    A call is known by the domain and alias it was asked for (its first
    record); a request naming its device otherwise (target, MAC, XML) takes
    the first unclaimed call of its domain.  Calls no request claims (none in
    practice) are listed after.
    """
    free = list(tracker.calls.values())
    pairs: list[tuple[Mapping[str, Any] | None, Call | None]] = []
    for request in requests:
        found = next((c for c in free if _matches(c, request, exact=True)), None)
        if found is None and request.get("alias") is None:
            found = next((c for c in free if _matches(c, request, exact=False)), None)
        if found is not None:
            free.remove(found)
        pairs.append((request, found))
    pairs.extend((None, call) for call in free)
    return pairs


def _request_text(request: Mapping[str, Any]) -> str:
    named = " ".join(
        f"{key}={request[key]}"
        for key in ("alias", "target", "mac", "xml_file")
        if request.get(key) is not None
    )
    return f"{request.get('domain')} {named}".strip()


def _line(tracker: Tracker, request: Mapping[str, Any] | None, call: Call | None) -> str:
    if call is None:
        assert request is not None
        return f"{_request_text(request)}: {STATE_TEXT['not_started']}"
    state = tracker.state(call)
    text = STATE_TEXT[state]
    view = tracker.unplug_of(call)
    if state == "removed" and call.finished:
        parts = [p for p, on in (("live", call.live), ("persistent", call.persistent)) if on]
        text += f" ({' + '.join(parts) or 'nothing to do'})"
    elif state == "failed" and call.error is not None:
        text += f": {type(call.error).__name__}: {call.error}"
    elif state == "request_outstanding" and view is not None:
        text += f"; requests sent {view.sent}"
        if call.persistent_changed:
            text += "; persistent definition changed"
    return f"{call.domain}/{call.alias or '-'}: {text}"


def report(
    tracker: Tracker, requests: Sequence[Mapping[str, Any]], signum: int, *, as_json: bool
) -> int:
    """Say what happened per device (stdout; a summary line on stderr
    without ``--json``); the exit status."""
    code = EXIT_STATUS.get(signal.Signals(signum), 130)
    pairs = devices(tracker, requests)
    if as_json:
        for obj in interrupted_json(tracker, pairs, signum, code):
            print(line(obj))
        sys.stdout.flush()
        return code
    for request, call in pairs:
        print(_line(tracker, request, call))
    counts = _counts(tracker, pairs)
    summary = ", ".join(f"{n} {SHORT[state]}" for state, n in counts.items() if n)
    print(
        f"interrupted by {signal.Signals(signum).name}, closed: {summary or 'nothing started'}",
        file=sys.stderr,
    )
    sys.stdout.flush()
    return code


def _counts(
    tracker: Tracker, pairs: Sequence[tuple[Mapping[str, Any] | None, Call | None]]
) -> dict[DeviceState, int]:
    counts: dict[DeviceState, int] = dict.fromkeys(STATE_TEXT, 0)
    for _request, call in pairs:
        counts[tracker.state(call) if call is not None else "not_started"] += 1
    return counts


def interrupted_json(
    tracker: Tracker,
    pairs: Sequence[tuple[Mapping[str, Any] | None, Call | None]],
    signum: int,
    code: int,
) -> list[InterruptedLine | InterruptedSummary]:
    """The JSON objects of an interrupted command (docs/cli.md, "Interrupted
    commands"; the models are `aiodetach._cli_json`'s, as every ``--json``
    object): one ``interrupted`` per device in request order, then one
    ``interrupted_summary``."""
    out: list[InterruptedLine | InterruptedSummary] = []
    for request, call in pairs:
        given = request or {}
        sent = 0
        view = tracker.unplug_of(call) if call is not None else None
        if view is not None:
            sent = view.sent
        if call is not None and call.finished and call.ok:
            sent = call.attempts
        error = call.error if call is not None else None
        out.append(
            InterruptedLine(
                request=dict(request) if request is not None else None,
                domain=call.domain if call is not None else given.get("domain"),
                alias=call.alias if call is not None else given.get("alias"),
                state=tracker.state(call) if call is not None else "not_started",
                persistent_changed=bool(call and call.persistent_changed),
                requests_sent=sent,
                error=type(error).__name__ if error is not None else None,
                message=error.message if error is not None else None,
            )
        )
    name = signal.Signals(signum).name
    out.append(
        InterruptedSummary(
            signal="SIGTERM" if name == "SIGTERM" else "SIGINT",
            exit_code=code,
            devices=len(pairs),
            states={str(state): n for state, n in _counts(tracker, pairs).items()},
        )
    )
    return out
