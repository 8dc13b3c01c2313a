"""How a live unplug ends, in the terms its callers, the journal and the hooks use.

The machine (`aiodetach._machine`) ends with an `End` kind; this
module turns it into what each party gets: the callers a `LiveDone` or
a typed error naming the domain and alias, the journal its outcome (or none,
when the guest's unplug may still be running), the hooks their outcome word.
Pure functions of values, so the driver's end stays one short step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from ._closing import leaves_unplug_running
from ._journal import JournalOutcome
from ._machine_io import End, Ending
from .errors import DetachFailed, DetachTimeout, DomainStopped
from .instrumentation._records import UnplugOutcome, outcome_of

__all__ = ["Abandoned", "LiveDone", "ended_outcome", "journal_outcome", "outcome", "settle"]


@dataclass(frozen=True, slots=True)
class LiveDone:
    """How a live unplug ended well: requests sent, and how removal was learnt."""

    sent: int
    confirmed_by: Literal["event", "xml"]


class Abandoned(Exception):
    """Nobody waits for this unplug any more, and nobody came back for it."""


def outcome(
    end: End, *, domain: str, alias: str, sent: int, busy_refusals: int, timeout: float
) -> tuple[BaseException | None, LiveDone | None, tuple[str, dict[str, Any]] | None]:
    """The callers' result or error, and the step record that says so (if any)."""
    how = end.how
    if how is Ending.REMOVED:
        assert end.confirmed_by is not None
        done = LiveDone(sent, end.confirmed_by)
        return None, done, ("removed", {"confirmed_by": end.confirmed_by})
    if how is Ending.FAILED:
        error: BaseException = DetachFailed(
            "the guest rejected the unplug (DEVICE_REMOVAL_FAILED); not retried",
            domain=domain,
            alias=alias,
        )
        return error, None, ("removal_failed", {})
    if how is Ending.STOPPED:
        what = "disappeared" if end.reason == "undefined" else f"stopped ({end.reason})"
        error = DomainStopped(
            f"the domain {what} before the guest released the device",
            domain=domain,
            alias=alias,
            reason=end.reason,
        )
        return error, None, ("domain_stopped", {"reason": end.reason})
    if how is Ending.TIMEOUT:
        busy = f", {busy_refusals} refused as busy" if busy_refusals else ""
        error = DetachTimeout(
            f"the guest did not release the device after {sent} request(s) of "
            f"{timeout:g} s each{busy}",
            domain=domain,
            alias=alias,
            attempts=sent,
            timeout=timeout,
        )
        return error, None, ("timed_out", {})
    if how is Ending.ABANDONED:
        return Abandoned(), None, None
    if how is Ending.CANCELLED:
        return asyncio.CancelledError(), None, None
    assert isinstance(end.error, BaseException)
    return end.error, None, None


def journal_outcome(
    error: BaseException | None, done: LiveDone | None
) -> tuple[JournalOutcome, str | None] | None:
    """The journal row's outcome (and how removal was learnt), or None.

    What leaves the guest's unplug possibly still running is *not* an
    outcome (see `aiodetach._closing`): such a row stays unfinished and
    the next ``open()`` takes it up.
    """
    if error is None:
        assert done is not None
        return "removed", done.confirmed_by
    if isinstance(error, Abandoned):
        return "abandoned", None
    if leaves_unplug_running(error):
        return None
    found = outcome_of(error)
    if found == "failed" or found == "timeout" or found == "stopped":
        return found, None
    return "error", None


def ended_outcome(error: BaseException | None) -> tuple[UnplugOutcome, BaseException | None]:
    """The ``ended`` record's outcome, and the error it carries."""
    if error is None:
        return "removed", None
    if isinstance(error, (Abandoned, asyncio.CancelledError)):
        return "abandoned", None  # nobody came back, or the service closed
    found = outcome_of(error)
    return ("error" if found == "cancelled" else found), error


def settle(
    mine: asyncio.Future[LiveDone], error: BaseException | None, done: LiveDone | None
) -> None:
    """Hand one caller how the unplug ended (the service closing: cancelled)."""
    if mine.done():
        return
    if error is None:
        assert done is not None
        mine.set_result(done)
    elif isinstance(error, asyncio.CancelledError):
        mine.cancel()
    else:
        mine.set_exception(error)
