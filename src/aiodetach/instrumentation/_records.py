"""What aiodetach tells its hooks: one frozen record per step.

Three record types, because a detach has three owners of steps:

- `DetachRecord`: one caller's ``detach()`` call, from its start to its
  result or error.  Identified by ``detach_id``.
- `UnplugRecord`: a device's live unplug.  One unplug exists per
  device at a time and every caller of that device is *joined* to it, so its
  steps (a request sent, an attempt timed out, the device removed) belong to
  all of them.  Identified by ``unplug_id``; a caller's ``unplug_started`` /
  ``unplug_joined`` record names the unplug it waits on, which is how a hook
  relates the two (the OpenTelemetry hook puts an unplug's steps on the span
  of every caller joined at that moment).
- `ConnectionRecord`: the service's libvirt connection (lost,
  reconnected, …), for every detach on that URI.

Times are ``time.monotonic()`` seconds; ``elapsed`` counts from the start of
the record's owner (the call, the unplug).  Records are built on the event
loop thread only, and handed to hooks there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from .._result import DetachResult
from ..errors import DetachFailed, DetachTimeout, DomainStopped

__all__ = [
    "ConnectionRecord",
    "ConnectionStep",
    "DetachRecord",
    "DetachStep",
    "Hook",
    "Outcome",
    "Record",
    "UnplugOutcome",
    "UnplugRecord",
    "UnplugStep",
    "outcome_of",
]

DetachStep = Literal[
    "started",  # the call began (every call, even one with invalid arguments)
    "persistent_detached",  # removed from the persistent definition
    "persistent_joined",  # another caller's config detach of this device counts as ours
    "persistent_missing_ignored",  # not in the persistent definition; a live detach follows
    "timeout_below_slot_minimum",  # timeout shorter than the device's slot can release in (slot)
    "unplug_started",  # this call started the device's live unplug (unplug_id)
    "unplug_joined",  # this call joined the device's live unplug in flight (unplug_id)
    "finished",  # result or error (outcome)
]

UnplugStep = Literal[
    "started",  # a new unplug of the device (pending unplugs + 1)
    "recovered",  # taken up from the journal after a restart of this process (resumed=True)
    "request_sent",  # a live detach request reached libvirt (accepted or refused)
    "request_not_sent",  # it failed in the client before reaching libvirtd: sent again once back
    "in_progress",  # libvirt refused it: an unplug is already in progress (waiting for it)
    "busy_backoff",  # "guest is busy" before any request was accepted: sending again later
    "job_held",  # another job (a migration) held the domain past libvirt's wait: sent again
    "stale_event_ignored",  # an event from before our request: the device is still there
    "attempt_timed_out",  # no DEVICE_REMOVED within timeout: re-reading the live XML
    "paused",  # the window ran out on a paused domain: waiting for it to run again
    "resumed",  # the domain runs again: the guest gets a full timeout
    "guest_reset",  # libvirt's REBOOT while our request was pending: looking shortly
    "request_voided",  # the reset voided it (still attached): sent again, no attempt used
    "waiting_for_reconnect",  # libvirtd went away while waiting
    "removed",  # the device is gone (confirmed_by "event" or "xml")
    "removal_failed",  # DEVICE_REMOVAL_FAILED: the guest said no
    "domain_stopped",  # the domain stopped (reason)
    "timed_out",  # still attached after every attempt
    "ended",  # the unplug is over (outcome; pending unplugs - 1)
]

ConnectionStep = Literal[
    "connected",  # the service opened its connection
    "lost",  # the connection dropped (reason)
    "reconnecting",  # a new request after the daemon was given up on
    "reconnected",  # back, events subscribed again (reconnects)
    "dead",  # the daemon stayed away longer than reconnect_timeout (reason)
    "closed",  # the service closed
]

Outcome = Literal["removed", "failed", "timeout", "stopped", "error", "cancelled"]
"""How a detach call ended: ``removed`` (a result), ``failed``
([`DetachFailed`][aiodetach.errors.DetachFailed]), ``timeout``
([`DetachTimeout`][aiodetach.errors.DetachTimeout]), ``stopped``
([`DomainStopped`][aiodetach.errors.DomainStopped]), ``cancelled`` (the caller's own
cancellation or deadline) or ``error`` (any other error)."""

UnplugOutcome = Literal["removed", "failed", "timeout", "stopped", "error", "abandoned"]
"""How an unplug ended; ``abandoned``: every caller left and none came back
(or the service closed under it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DetachRecord:
    """A step of one ``detach()`` call."""

    kind: DetachStep
    detach_id: int
    """Unique in the process (a fleet's services share the counter)."""
    uri: str
    domain: str
    """As the caller named it until the domain was looked up, then its name."""
    alias: str | None
    """The live alias once known, else what the caller named (or None)."""
    time: float
    elapsed: float
    """Seconds since the call started."""
    unplug_id: int | None = None
    """``unplug_started`` / ``unplug_joined``: the live unplug this call waits on."""
    result: DetachResult | None = None
    """``finished``: the result of a successful call."""
    error: BaseException | None = None
    """``finished``: what the call raised (a ``DetachError``, or ``CancelledError``)."""
    outcome: Outcome | None = None
    """``finished``: the outcome, as the Prometheus hook labels it."""
    resumed: bool = False
    """``unplug_joined``: the unplug joined was taken up from the journal (a
    request sent by an earlier run of this process)."""
    slot: str | None = None
    """``timeout_below_slot_minimum``: the device's slot kind (``"native-pcie"``)."""
    minimum: float | None = None
    """``timeout_below_slot_minimum``: seconds such a slot cannot release in."""
    timeout: float | None = None
    """``timeout_below_slot_minimum``: the ``timeout`` in force."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnplugRecord:
    """A step of a device's live unplug, shared by every caller joined to it."""

    kind: UnplugStep
    unplug_id: int
    uri: str
    domain: str
    domain_uuid: str
    alias: str
    attempt: int
    """The attempt under way, from 1 to ``attempts`` (busy refusals use none up)."""
    attempts: int
    """Attempts allowed (``DetachSettings.attempts``)."""
    sent: int
    """Requests that counted so far (what ``DetachResult.attempts`` reports)."""
    callers: int
    """Callers joined to the unplug now (0: it waits for one to come back)."""
    time: float
    elapsed: float
    """Seconds since the unplug started."""
    confirmed_by: Literal["event", "xml"] | None = None
    """``removed``: libvirt's event, or the live XML re-read (the event was lost)."""
    reason: str | None = None
    """``domain_stopped``: libvirt's detail; ``in_progress``: libvirt's message;
    ``stale_event_ignored``: the event's kind."""
    timeout: float | None = None
    """``attempt_timed_out``: the window that ran out, in seconds."""
    delay: float | None = None
    """``busy_backoff``: seconds until the request is sent again."""
    busy_refusals: int = 0
    """"guest is busy" refusals so far."""
    resumed: bool = False
    """The unplug was taken up from the journal after a restart of this
    process: its first request(s) were sent by the process before."""
    deadline: float | None = None
    """While the attempt's window runs (the request is in the guest and no
    answer came yet): when it ends, on the ``time`` clock; None otherwise.
    What a progress display needs to show the time left in this attempt."""
    outcome: UnplugOutcome | None = None
    """``ended``: how the unplug ended."""
    error: BaseException | None = None
    """``ended``: the error it ended with, if any."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRecord:
    """A step of the service's libvirt connection."""

    kind: ConnectionStep
    uri: str
    time: float
    reason: str | None = None
    reconnects: int = 0
    """Re-opens after a loss so far."""


Record: TypeAlias = DetachRecord | UnplugRecord | ConnectionRecord
Hook: TypeAlias = Callable[[Record], object]
"""A hook is any callable taking a record; what it returns is ignored.

It is called synchronously on the event loop thread, so it must be quick and
must not block; one that raises is logged (once per hook and step) and
ignored: it never changes a detach's outcome."""


def outcome_of(error: BaseException | None) -> Outcome:
    """The `Outcome` of a call that raised ``error`` (None: success)."""
    if error is None:
        return "removed"
    if isinstance(error, DetachFailed):
        return "failed"
    if isinstance(error, DetachTimeout):
        return "timeout"
    if isinstance(error, DomainStopped):
        return "stopped"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "error"
    if not isinstance(error, Exception):  # CancelledError
        return "cancelled"
    return "error"
