"""The unplug machine's vocabulary: its phases, the inputs it is handed and
the actions it asks for (see `aiodetach._machine`).

Plain frozen values with no behaviour, so that a driver, a table of rules and
a model can all speak to the machine in the same terms.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BUSY_BACKOFF_MAX",
    "JOB_RETRY_GAP",
    "RESET_HOLD",
    "RESET_HOLD_LIMIT",
    "RESET_SETTLE",
    "STOP_EVENT_WAIT",
    "Abort",
    "Action",
    "Answered",
    "ConnectionDown",
    "End",
    "Ending",
    "Event",
    "Input",
    "Joined",
    "Left",
    "LoseConnection",
    "Outcome",
    "Phase",
    "ReadFailed",
    "ReadState",
    "ReadXml",
    "ReconnectFailed",
    "Reconnected",
    "Report",
    "Resumed",
    "Send",
    "StateRead",
    "Stopped",
    "Timer",
    "Verdict",
    "WaitReconnect",
    "WaitUntil",
    "XmlRead",
]

BUSY_BACKOFF_MAX = 5.0
"""Cap of the "guest is busy" back-off, in seconds (the blink lasts ~5 s)."""
STOP_EVENT_WAIT = 2.0
"""How long a request refused as "not running" waits for the domain's STOPPED
event when its state does not say why it stopped (libvirt emits the event at
the moment it fails the call; measured within milliseconds)."""
JOB_RETRY_GAP = 1.0
"""A request refused because another job holds the domain is sent again at
once (libvirt's own wait for the job, 30 s, is the wait); one refused sooner
than this is sent again this long after (a backend that does not wait)."""

RESET_SETTLE = 1.0
"""After a guest reset, how long to wait for a ``DEVICE_REMOVED`` before
looking at the live XML (at most a quarter of ``timeout``): on ACPI hotplug
a reset completes a pending unplug and the event follows it (measured
0.13 s); on native PCIe it voids the unplug and no event ever comes."""

RESET_HOLD = 5.0
"""QEMU refuses ``device_del`` on a native-PCIe slot for 5 s after it took
one ("already in the process of unplug"), even once a reset voided it: a
re-send is tried no later than that."""

RESET_HOLD_LIMIT = 2 * RESET_HOLD
"""How long after the voided request such refusals still mean "not taken"
(QEMU's own clock may lag ours); later ones are an unplug in progress again."""


class Phase(enum.Enum):
    QUEUED = "queued"  # the next request is due (nothing of this attempt in libvirt)
    SENDING = "sending"  # the request is in its worker thread
    WAITING = "waiting"  # libvirt has it; the attempt's window runs
    RECHECKING = "rechecking"  # the window ran out: reading state, then live XML
    PAUSED = "paused"  # the domain is paused: no clock runs
    BACKING_OFF = "backing-off"  # "guest is busy" before any request of ours was accepted
    RECONNECTING = "reconnecting"  # the connection is down: waiting for it, then a look
    CONFIRMING = "confirming"  # an early verdict: is the device gone from the live XML?
    VERIFYING = "verifying"  # refused as "no such alias": is the device gone?
    STOPPING = "stopping"  # refused as "not running": why (its STOPPED event, its state)?
    IDLE = "idle"  # nobody waits and the next step is due: kept a while for a caller
    DONE = "done"


class Verdict(enum.Enum):
    REMOVED = "removed"  # DEVICE_REMOVED
    FAILED = "failed"  # DEVICE_REMOVAL_FAILED
    GONE = "gone"  # absent from the live XML (its event was lost)


class Outcome(enum.Enum):
    """How libvirt answered a request (classified in `aiodetach._errors_map`)."""

    SENT = "sent"  # accepted
    SKIPPED = "skipped"  # not handed to libvirt: nobody wanted it, or decided meanwhile
    NOT_SENT = "not-sent"  # failed inside the client before reaching libvirtd
    MAYBE_SENT = "maybe-sent"  # the connection failed under it: may have reached libvirtd
    BUSY = "busy"  # "guest is busy (power indicator blinking)"
    IN_PROGRESS = "in-progress"  # "already in the process of unplug"
    ALIAS_MISSING = "alias-missing"  # libvirt knows no device of that alias
    NOT_RUNNING = "not-running"  # the domain is not running
    NO_DOMAIN = "no-domain"  # the domain is gone (a transient one, say)
    JOB_HELD = "job-held"  # another job (a migration) kept the domain past libvirt's wait
    JOURNAL_FAILED = "journal-failed"  # the request could not be journalled: not sent
    REFUSED = "refused"  # any other refusal: fatal, with its error


class Ending(enum.Enum):
    REMOVED = "removed"  # the device is gone (confirmed_by says how it was learnt)
    FAILED = "failed"  # DEVICE_REMOVAL_FAILED
    TIMEOUT = "timeout"  # still attached after every attempt
    STOPPED = "stopped"  # the domain stopped (reason)
    ABANDONED = "abandoned"  # nobody waits, and nothing of ours is pending or nobody came back
    ERROR = "error"  # a fatal error (error: the driver's own description of it)
    CANCELLED = "cancelled"  # the service closed under it


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True, slots=True)
class Joined:
    """A caller waits for this unplug (the first, or one asking again)."""


@dataclass(frozen=True, slots=True)
class Left:
    """A caller stopped waiting (its result, its error or its cancellation)."""


@dataclass(frozen=True, slots=True)
class Event:
    """A verdict about the device: ``in_libvirt`` says whether a request of
    ours was inside libvirt when it arrived (then it may be that request's)."""

    verdict: Verdict
    in_libvirt: bool = False


@dataclass(frozen=True, slots=True)
class Stopped:
    """The domain stopped (libvirt's detail: destroyed, shutdown, migrated, …)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Resumed:
    """libvirt's RESUMED for the domain."""


@dataclass(frozen=True, slots=True)
class Rebooted:
    """libvirt's REBOOT for the domain: the guest was reset (``virDomainReset``,
    or the guest rebooted itself).  A pending native-PCIe unplug is void after
    it; on ACPI hotplug the reset completes it."""


@dataclass(frozen=True, slots=True)
class ConnectionDown:
    """The connection to libvirtd was lost (events from now on may be lost)."""


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The connection is back (events subscribed again)."""


@dataclass(frozen=True, slots=True)
class ReconnectFailed:
    """The connection stayed away (``error``: the driver's, ended with as is)."""

    error: object


@dataclass(frozen=True, slots=True)
class Answered:
    """libvirt (or the worker thread) answered the request.

    ``reconnected``: the connection was lost or re-made while the request was
    out, so events about it may have been lost.  ``error``: the driver's
    description of a refusal, handed back in `End`.
    """

    outcome: Outcome
    error: object = None
    reason: str = ""
    reconnected: bool = False


@dataclass(frozen=True, slots=True)
class StateRead:
    """The domain's state: ``inactive`` (shut off), ``missing`` (undefined).
    ``reason``: why an inactive one is shut off (``"migrated"``, …; libvirt's
    shutoff reason, "" when unknown)."""

    state: Literal["running", "paused", "inactive", "missing"]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class XmlRead:
    """The live XML read: whether it still holds the alias."""

    present: bool


@dataclass(frozen=True, slots=True)
class ReadFailed:
    """A state or XML read failed for good (``error``: ended with as is)."""

    error: object


@dataclass(frozen=True, slots=True)
class Timer:
    """The wait armed by the `WaitUntil` carrying ``token`` is over."""

    token: int


@dataclass(frozen=True, slots=True)
class Abort:
    """The service closes."""


Input = (
    Joined
    | Left
    | Event
    | Stopped
    | Resumed
    | Rebooted
    | ConnectionDown
    | Reconnected
    | ReconnectFailed
    | Answered
    | StateRead
    | XmlRead
    | ReadFailed
    | Timer
    | Abort
)


# ----------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class Send:
    """Hand the live request to a worker thread (answer: `Answered`)."""


@dataclass(frozen=True, slots=True)
class ReadState:
    """Read the domain's state (answer: `StateRead` or `ReadFailed`)."""


@dataclass(frozen=True, slots=True)
class ReadXml:
    """Read the live XML (answer: `XmlRead` or `ReadFailed`)."""


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Hand back `Timer` (``token``) at ``when``, unless another wait
    replaced it.  ``window``: an attempt's window (the driver parks it on one
    timer shared by every waiting unplug)."""

    when: float
    token: int
    window: bool = False


@dataclass(frozen=True, slots=True)
class WaitReconnect:
    """Hand back `Reconnected` or `ReconnectFailed`."""


@dataclass(frozen=True, slots=True)
class LoseConnection:
    """Tell the connection it is lost (it starts a reconnect if that is news)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    """A step for the hooks' records (``field``: one extra field, if any)."""

    kind: str
    field: str | None = None
    value: object = None


@dataclass(frozen=True, slots=True)
class End:
    """The unplug is over."""

    how: Ending
    confirmed_by: Literal["event", "xml"] | None = None
    reason: str = ""
    error: object = None


Action = Send | ReadState | ReadXml | WaitUntil | WaitReconnect | LoseConnection | Report | End
