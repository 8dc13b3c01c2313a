"""The live unplug's rules, as a table over the pure machine (aiodetach._machine).

No loop, no threads, no clock: each row starts the machine in a phase (a
short script of inputs at given times), hands it one input, and says which
actions must come out and where the machine must be.  Every rule of
docs/protocol.md that the live half carries is one or more rows; the rule is
named in the row's id.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import aiodetach._machine as machine_module
import aiodetach._machine_io as machine_io
from aiodetach._machine import UnplugMachine
from aiodetach._machine_io import (
    STOP_EVENT_WAIT,
    Abort,
    Action,
    Answered,
    ConnectionDown,
    End,
    Ending,
    Event,
    Input,
    Joined,
    Left,
    LoseConnection,
    Outcome,
    Phase,
    ReadFailed,
    ReadState,
    ReadXml,
    Rebooted,
    Reconnected,
    ReconnectFailed,
    Report,
    Resumed,
    Send,
    StateRead,
    Stopped,
    Timer,
    Verdict,
    WaitReconnect,
    WaitUntil,
    XmlRead,
)

TIMEOUT = 10.0
ATTEMPTS = 3


@dataclass(frozen=True)
class Limits:
    timeout: float = TIMEOUT
    attempts: int = ATTEMPTS


# --------------------------------------------------------------- set-ups
# Each is a list of (input or "begin", time).  The machine's own tokens are
# looked up when a Timer is due: "timer" stands for "the wait armed now".
Step = tuple[Any, float]

SENDING: list[Step] = [(Joined(), 0.0), ("begin", 0.0)]
WAITING: list[Step] = [*SENDING, (Answered(Outcome.SENT), 1.0)]  # window ends at 11
RECHECK_STATE: list[Step] = [*WAITING, ("timer", 11.0)]
RECHECK_XML: list[Step] = [*RECHECK_STATE, (StateRead("running"), 11.1)]
RESENDING: list[Step] = [*RECHECK_XML, (XmlRead(present=True), 11.2)]  # request 2 out
PAUSED: list[Step] = [*RECHECK_STATE, (StateRead("paused"), 11.1)]
BACKING_OFF: list[Step] = [*SENDING, (Answered(Outcome.BUSY, reason="guest is busy"), 0.5)]
ORPHAN: list[Step] = [*WAITING, (Left(), 2.0)]  # the last caller left, request in libvirt
IDLE_RECHECK: list[Step] = [*ORPHAN, ("timer", 11.0)]  # window over, nobody: idle until 21
LAST_ATTEMPT_STATE: list[Step] = [
    *RESENDING,
    (Answered(Outcome.SENT), 12.0),
    ("timer", 22.0),
    (StateRead("running"), 22.1),
    (XmlRead(present=True), 22.2),
    (Answered(Outcome.SENT), 23.0),
    ("timer", 33.0),
    (StateRead("running"), 33.1),
]
RECONNECTING: list[Step] = [*WAITING, (ConnectionDown(), 3.0)]
STOPPING: list[Step] = [*SENDING, (Answered(Outcome.NOT_RUNNING), 0.5)]  # reading why
# A guest reset 2 s into the window (request taken at 1.0): a look at 4.0.
RESET: list[Step] = [*WAITING, (Rebooted(), 3.0)]
RESET_LOOK_XML: list[Step] = [*RESET, ("timer", 4.0), (StateRead("running"), 4.1)]
# Still attached: the request was void; its re-send is out at 4.2.
VOIDED: list[Step] = [*RESET_LOOK_XML, (XmlRead(present=True), 4.2)]
_HELD = Answered(Outcome.IN_PROGRESS, reason="already in the process of unplug")
# A reset while the guest is paused (noticed at the window's end), then it runs.
RESET_PAUSED: list[Step] = [*PAUSED, (Rebooted(), 11.5), (Resumed(), 12.0)]  # reading state
RESET_RESUMED: list[Step] = [*RESET_PAUSED, (StateRead("running"), 12.1)]  # a look at 13.1
# Another client's unplug is pending: ours refused "in progress" at 1.0, a
# reset at 3.0 voids theirs; still attached, ours goes out at 4.2.
OTHERS_VOIDED: list[Step] = [
    *SENDING,
    (_HELD, 1.0),
    (Rebooted(), 3.0),
    ("timer", 4.0),
    (StateRead("running"), 4.1),
    (XmlRead(present=True), 4.2),
]


def run(steps: list[Step], limits: Limits | None = None) -> tuple[UnplugMachine, list[Action]]:
    m = UnplugMachine(limits or Limits())
    out: list[Action] = []
    for what, now in steps:
        if what == "begin":
            out = m.begin(now)
        elif what == "timer":
            out = m.handle(Timer(m.token), now)
        else:
            out = m.handle(what, now)
    return m, out


@dataclass(frozen=True)
class Row:
    id: str
    given: list[Step]
    input: Any
    at: float
    actions: list[Any]
    """Expected actions in order: an action, or a type when only its kind matters
    (a :class:`WaitUntil`'s token is checked to be the machine's current one)."""
    phase: Phase
    counters: dict[str, Any] = field(default_factory=dict)
    limits: Limits = Limits()


def _stale_removed() -> Report:
    return Report("stale_event_ignored", "reason", "removed")


ROWS = [
    # Rule 2: the request, then the wait for DEVICE_REMOVED.
    Row(
        "r2-first-request-sent",
        [(Joined(), 0.0)],
        "begin",
        0.0,
        [Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r2-window-starts-when-libvirt-answered",
        SENDING,
        Answered(Outcome.SENT),
        4.0,
        [Report("request_sent"), WaitUntil(14.0, 2, window=True)],
        Phase.WAITING,
        {"accepted": True, "deadline": 14.0},
    ),
    Row(
        "r2-removed-event-is-success",
        WAITING,
        Event(Verdict.REMOVED),
        5.0,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r2-removal-failed-is-fatal-never-retried",
        WAITING,
        Event(Verdict.FAILED),
        5.0,
        [End(Ending.FAILED)],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r2-window-over-reads-state-first", WAITING, "timer", 11.0, [ReadState()], Phase.RECHECKING
    ),
    Row(
        "r2-still-running-then-reads-live-xml",
        RECHECK_STATE,
        StateRead("running"),
        11.1,
        [Report("attempt_timed_out", "timeout", TIMEOUT), ReadXml()],
        Phase.RECHECKING,
    ),
    Row(
        "r2-gone-from-xml-is-success-event-lost",
        RECHECK_XML,
        XmlRead(present=False),
        11.2,
        [End(Ending.REMOVED, confirmed_by="xml")],
        Phase.DONE,
    ),
    Row(
        "r2-still-there-uses-an-attempt-and-resends",
        RECHECK_XML,
        XmlRead(present=True),
        11.2,
        [Send()],
        Phase.SENDING,
        {"sent": 2, "used": 1},
    ),
    Row(
        "r2-attempts-used-is-timeout",
        LAST_ATTEMPT_STATE,
        XmlRead(present=True),
        33.2,
        [End(Ending.TIMEOUT)],
        Phase.DONE,
        {"sent": 3, "used": 3},
    ),
    Row(
        "r2-one-attempt-only",
        [
            (Joined(), 0),
            ("begin", 0),
            (Answered(Outcome.SENT), 1),
            ("timer", 11),
            (StateRead("running"), 11),
        ],
        XmlRead(present=True),
        11.5,
        [End(Ending.TIMEOUT)],
        Phase.DONE,
        {"sent": 1},
        Limits(attempts=1),
    ),
    # Rule 2: a verdict is honoured wherever it lands.
    Row(
        "r2-verdict-during-request-waits-for-answer",
        SENDING,
        Event(Verdict.REMOVED, in_libvirt=True),
        0.5,
        [],
        Phase.SENDING,
    ),
    Row(
        "r2-verdict-kept-in-request-ends-at-answer",
        [*SENDING, (Event(Verdict.REMOVED, in_libvirt=True), 0.5)],
        Answered(Outcome.SENT),
        0.6,
        [Report("request_sent"), End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r2-verdict-during-state-read-kept",
        RECHECK_STATE,
        Event(Verdict.FAILED),
        11.05,
        [],
        Phase.RECHECKING,
        {"sent": 1},
    ),
    Row(
        "r2-failed-during-state-read-ends-no-resend",
        [*RECHECK_STATE, (Event(Verdict.FAILED), 11.05)],
        StateRead("running"),
        11.1,
        [End(Ending.FAILED)],
        Phase.DONE,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r2-failed-during-xml-read-no-resend",
        [*RECHECK_XML, (Event(Verdict.FAILED), 11.15)],
        XmlRead(present=True),
        11.2,
        [End(Ending.FAILED)],
        Phase.DONE,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r2-removed-during-xml-read-is-by-event",
        [*RECHECK_XML, (Event(Verdict.REMOVED), 11.15)],
        XmlRead(present=False),
        11.2,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r2-verdict-kept-through-a-failed-read",
        [*RECHECK_XML, (Event(Verdict.REMOVED), 11.15)],
        ReadFailed("ConnectionLost"),
        11.2,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r2-failed-kept-while-resend-queued-for-thread",
        RESENDING,
        Event(Verdict.FAILED),
        11.3,
        [],
        Phase.SENDING,
    ),
    Row(
        "r2-resend-skipped-in-thread-after-verdict",
        [*RESENDING, (Event(Verdict.FAILED), 11.3)],
        Answered(Outcome.SKIPPED),
        11.4,
        [End(Ending.FAILED)],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r2-the-first-verdict-that-counts-is-final",
        [
            *SENDING,
            (Event(Verdict.REMOVED, in_libvirt=True), 0.5),
            (Event(Verdict.FAILED, in_libvirt=True), 0.55),
        ],
        Answered(Outcome.SENT),
        0.6,
        [Report("request_sent"), End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r2-removed-after-a-resend-is-success",
        [*RESENDING, (Answered(Outcome.SENT), 12.0)],
        Event(Verdict.REMOVED),
        13.0,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
        {"sent": 2, "used": 1},
    ),
    # Rule 2: an event from before our request is checked.
    Row(
        "r2-early-removed-during-queue-kept",
        SENDING,
        Event(Verdict.REMOVED),
        0.1,
        [],
        Phase.SENDING,
    ),
    Row(
        "r2-early-removed-confirmed-by-xml-after-answer",
        [*SENDING, (Event(Verdict.REMOVED), 0.1)],
        Answered(Outcome.SENT),
        0.2,
        [Report("request_sent"), WaitUntil, ReadState()],
        Phase.CONFIRMING,
    ),
    Row(
        "r2-early-removed-and-device-gone-is-success",
        [
            *SENDING,
            (Event(Verdict.REMOVED), 0.1),
            (Answered(Outcome.SENT), 0.2),
            (StateRead("running"), 0.3),
        ],
        XmlRead(present=False),
        0.4,
        [End(Ending.REMOVED, confirmed_by="xml")],
        Phase.DONE,
    ),
    Row(
        "r2-early-removed-still-there-ignored-window-goes-on",
        [
            *SENDING,
            (Event(Verdict.REMOVED), 0.1),
            (Answered(Outcome.SENT), 0.2),
            (StateRead("running"), 0.3),
        ],
        XmlRead(present=True),
        0.4,
        [_stale_removed(), WaitUntil(10.2, 6, window=True)],
        Phase.WAITING,
    ),
    Row(
        "r2-early-failed-is-ignored",
        [*SENDING, (Event(Verdict.FAILED), 0.1)],
        Answered(Outcome.SENT),
        0.2,
        [Report("request_sent"), WaitUntil, Report("stale_event_ignored", "reason", "failed")],
        Phase.WAITING,
    ),
    Row(
        "r2-event-while-ours-in-libvirt-counts-at-once",
        [*SENDING, (Event(Verdict.REMOVED, in_libvirt=True), 0.1)],
        Answered(Outcome.SENT),
        0.2,
        [Report("request_sent"), End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r2-real-verdict-replaces-early-one",
        [*SENDING, (Event(Verdict.REMOVED), 0.1), (Event(Verdict.FAILED, in_libvirt=True), 0.15)],
        Answered(Outcome.SENT),
        0.2,
        [Report("request_sent"), End(Ending.FAILED)],
        Phase.DONE,
    ),
    Row(
        "r2-early-one-does-not-replace-real-one",
        [*SENDING, (Event(Verdict.FAILED, in_libvirt=True), 0.1), (Event(Verdict.REMOVED), 0.15)],
        Answered(Outcome.SENT),
        0.2,
        [Report("request_sent"), End(Ending.FAILED)],
        Phase.DONE,
    ),
    Row(
        "r2-real-verdict-during-confirming-ends-after-the-read",
        [
            *SENDING,
            (Event(Verdict.REMOVED), 0.1),
            (Answered(Outcome.SENT), 0.2),
            (Event(Verdict.FAILED), 0.25),
        ],
        StateRead("running"),
        0.3,
        [End(Ending.FAILED)],
        Phase.DONE,
    ),
    Row(
        "r2-window-over-during-a-check-is-rechecked-at-once",
        [
            *SENDING,
            (Event(Verdict.REMOVED), 0.1),
            (Answered(Outcome.SENT), 0.2),  # window ends at 10.2
            (StateRead("running"), 5.0),
        ],
        XmlRead(present=True),
        10.2,
        [_stale_removed(), ReadState()],
        Phase.RECHECKING,
    ),
    # Rule 2: a paused domain.
    Row(
        "r2-paused-no-resend-no-attempt",
        RECHECK_STATE,
        StateRead("paused"),
        11.1,
        [Report("paused"), WaitUntil(21.1, 4)],
        Phase.PAUSED,
        {"used": 0, "sent": 1},
    ),
    Row("r2-resumed-event-reads-state", PAUSED, Resumed(), 15.0, [ReadState()], Phase.PAUSED),
    Row(
        "r2-running-again-gives-a-full-window",
        [*PAUSED, (Resumed(), 15.0)],
        StateRead("running"),
        15.1,
        [Report("resumed"), WaitUntil(25.1, 5, window=True)],
        Phase.WAITING,
        {"used": 0, "sent": 1},
    ),
    Row(
        "r2-pause-looks-every-timeout-when-resumed-lost",
        PAUSED,
        "timer",
        21.1,
        [ReadState()],
        Phase.PAUSED,
    ),
    Row(
        "r2-still-paused-looks-again-later",
        [*PAUSED, ("timer", 21.1)],
        StateRead("paused"),
        21.2,
        [WaitUntil(31.2, 5)],
        Phase.PAUSED,
        {"used": 0},
    ),
    Row(
        "r2-removed-while-paused",
        PAUSED,
        Event(Verdict.REMOVED),
        12.0,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    # Rule 2: "in progress" and "guest is busy".
    Row(
        "r2-in-progress-keeps-waiting",
        RESENDING,
        Answered(Outcome.IN_PROGRESS, reason="already in the process of unplug"),
        12.0,
        [
            Report("request_sent"),
            Report("in_progress", "reason", "already in the process of unplug"),
            WaitUntil(22.0, 5, window=True),
        ],
        Phase.WAITING,
        {"sent": 2},
    ),
    Row(
        "r2-busy-after-ours-accepted-is-in-progress",
        RESENDING,
        Answered(Outcome.BUSY, reason="guest is busy"),
        12.0,
        [Report("request_sent"), Report("in_progress", "reason", "guest is busy"), WaitUntil],
        Phase.WAITING,
        {"sent": 2, "used": 1},
    ),
    Row(
        "r2-busy-before-anything-accepted-backs-off",
        SENDING,
        Answered(Outcome.BUSY, reason="guest is busy"),
        0.5,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), WaitUntil(1.5, 2)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0, "busy_refusals": 1, "handed": False},
    ),
    Row(
        "r2-busy-backoff-grows-by-half",
        [*BACKING_OFF, ("timer", 1.5)],
        Answered(Outcome.BUSY),
        1.6,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.5), WaitUntil(3.1, 4)],
        Phase.BACKING_OFF,
        {"sent": 0, "busy_refusals": 2},
    ),
    Row(
        "r2-busy-backoff-is-a-quarter-of-a-short-timeout",
        [(Joined(), 0), ("begin", 0)],
        Answered(Outcome.BUSY),
        0.0,
        [Report("request_sent"), Report("busy_backoff", "delay", 0.5), WaitUntil(0.5, 2)],
        Phase.BACKING_OFF,
        {},
        Limits(timeout=2.0),
    ),
    Row(
        "r2-busy-backoff-over-sends-again",
        BACKING_OFF,
        "timer",
        1.5,
        [Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r2-busy-for-a-whole-timeout-costs-an-attempt",
        [*BACKING_OFF, ("timer", 1.5)],
        Answered(Outcome.BUSY),
        10.5,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.5), WaitUntil],
        Phase.BACKING_OFF,
        {"used": 1, "busy_since": 10.5},
    ),
    Row(
        "r2-busy-for-every-attempt-is-timeout",
        [
            *BACKING_OFF,
            ("timer", 1.5),
            (Answered(Outcome.BUSY), 10.5),
            ("timer", 12.0),
            (Answered(Outcome.BUSY), 20.5),
            ("timer", 24.0),
        ],
        Answered(Outcome.BUSY),
        30.5,
        [Report("request_sent"), End(Ending.TIMEOUT)],
        Phase.DONE,
        {"used": 3, "sent": 0},
    ),
    Row(
        "r2-early-removed-while-backing-off-is-checked",
        BACKING_OFF,
        Event(Verdict.REMOVED),
        1.0,
        [ReadState()],
        Phase.CONFIRMING,
    ),
    Row(
        "r2-backing-off-resumes-after-a-stale-event",
        [*BACKING_OFF, (Event(Verdict.REMOVED), 1.0), (StateRead("running"), 1.1)],
        XmlRead(present=True),
        1.2,
        [_stale_removed(), WaitUntil(1.5, 5)],
        Phase.BACKING_OFF,
    ),
    Row(
        "r2-busy-backoff-is-at-most-5s",
        [
            (Joined(), 0.0),
            ("begin", 0.0),
            (Answered(Outcome.BUSY), 0.0),  # 1
            ("timer", 1.0),
            (Answered(Outcome.BUSY), 1.0),  # 1.5
            ("timer", 2.5),
            (Answered(Outcome.BUSY), 2.5),  # 2.25
            ("timer", 4.75),
            (Answered(Outcome.BUSY), 4.75),  # 3.375
            ("timer", 8.125),
        ],
        Answered(Outcome.BUSY),
        8.125,
        [Report("request_sent"), Report("busy_backoff", "delay", 5.0), WaitUntil(13.125, 0)],
        Phase.BACKING_OFF,
        {"used": 0, "busy_refusals": 5},
        Limits(timeout=100.0),
    ),
    Row(
        "r2-busy-backoff-is-never-longer-than-timeout",
        [
            (Joined(), 0.0),
            ("begin", 0.0),
            (Answered(Outcome.BUSY), 0.0),  # 0.5 (a quarter of the timeout)
            ("timer", 0.5),
            (Answered(Outcome.BUSY), 0.5),  # 0.75
            ("timer", 1.25),
            (Answered(Outcome.BUSY), 1.25),  # 1.125
            ("timer", 2.375),
            (Answered(Outcome.BUSY), 2.375),  # 1.6875, a timeout of refusals: an attempt
            ("timer", 4.0625),
        ],
        Answered(Outcome.BUSY),
        4.0625,
        [Report("request_sent"), Report("busy_backoff", "delay", 2.0), WaitUntil(6.0625, 0)],
        Phase.BACKING_OFF,
        {"used": 1, "busy_refusals": 5},
        Limits(timeout=2.0),
    ),
    Row(
        "r2-busy-time-is-counted-from-the-first-refusal",
        [(Joined(), 100.0), ("begin", 100.0), (Answered(Outcome.BUSY), 100.5), ("timer", 101.5)],
        Answered(Outcome.BUSY),
        101.6,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.5), WaitUntil(103.1, 0)],
        Phase.BACKING_OFF,
        {"used": 0, "busy_refusals": 2, "busy_since": 100.5},
    ),
    Row(
        "r2-early-removed-kept-through-a-busy-refusal-is-checked",
        [*SENDING, (Event(Verdict.REMOVED), 0.1)],
        Answered(Outcome.BUSY),
        0.5,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), WaitUntil, ReadState()],
        Phase.CONFIRMING,
        {"after": Phase.BACKING_OFF, "sent": 0},
    ),
    Row(
        "r2-early-event-during-the-check-of-another-is-checked-next",
        [
            *BACKING_OFF,
            (Event(Verdict.REMOVED), 1.0),
            (Event(Verdict.FAILED), 1.05),
            (StateRead("running"), 1.1),
        ],
        XmlRead(present=True),
        1.2,
        [_stale_removed(), WaitUntil(1.5, 0), Report("stale_event_ignored", "reason", "failed")],
        Phase.BACKING_OFF,
        {"verdict": None},
    ),
    Row(
        "r2-in-progress-first-then-busy-on-the-resend-is-in-progress",
        [
            *SENDING,
            (Answered(Outcome.IN_PROGRESS, reason="already in the process of unplug"), 1.0),
            ("timer", 11.0),
            (StateRead("running"), 11.1),
            (XmlRead(present=True), 11.2),
        ],
        Answered(Outcome.BUSY, reason="guest is busy"),
        12.0,
        [Report("request_sent"), Report("in_progress", "reason", "guest is busy"), WaitUntil],
        Phase.WAITING,
        {"sent": 2, "used": 1},
    ),
    # Rule 2 / refusals.
    Row(
        "r2-no-such-alias-verifies-gone-is-success",
        [
            *SENDING,
            (Answered(Outcome.ALIAS_MISSING, "DeviceNotFound"), 0.5),
            (StateRead("running"), 0.6),
        ],
        XmlRead(present=False),
        0.7,
        [End(Ending.REMOVED, confirmed_by="xml")],
        Phase.DONE,
    ),
    Row(
        "r2-no-such-alias-but-there-is-the-error",
        [
            *SENDING,
            (Answered(Outcome.ALIAS_MISSING, "DeviceNotFound"), 0.5),
            (StateRead("running"), 0.6),
        ],
        XmlRead(present=True),
        0.7,
        [End(Ending.ERROR, error="DeviceNotFound")],
        Phase.DONE,
    ),
    Row(
        "r2-other-refusal-is-fatal",
        SENDING,
        Answered(Outcome.REFUSED, "DetachRefused"),
        0.5,
        [Report("request_sent"), End(Ending.ERROR, error="DetachRefused")],
        Phase.DONE,
    ),
    Row(
        "r2-journal-failure-is-fatal-and-not-counted",
        SENDING,
        Answered(Outcome.JOURNAL_FAILED, "JournalUnavailable"),
        0.5,
        [End(Ending.ERROR, error="JournalUnavailable")],
        Phase.DONE,
        {"sent": 0},
    ),
    # Rule 3: one unplug per device, and it belongs to the device.
    Row(
        "r3-second-caller-joins-no-request",
        WAITING,
        Joined(),
        2.0,
        [],
        Phase.WAITING,
        {"callers": 2, "sent": 1},
    ),
    Row(
        "r3-caller-gone-before-thread-nothing-sent",
        [*SENDING, (Left(), 0.1)],
        Answered(Outcome.SKIPPED),
        0.2,
        [End(Ending.ABANDONED)],
        Phase.DONE,
        {"sent": 0},
    ),
    Row(
        "r3-orphan-window-runs-out-lingers",
        ORPHAN,
        "timer",
        11.0,
        [WaitUntil(21.0, 3)],
        Phase.IDLE,
        {"resume": Phase.RECHECKING},
    ),
    Row(
        "r3-caller-back-goes-on-at-the-next-step",
        IDLE_RECHECK,
        Joined(),
        15.0,
        [WaitUntil(15.0, 0)],
        Phase.IDLE,
        {"callers": 1, "sent": 1},
    ),
    Row(
        "r3-caller-back-carries-on-with-recheck",
        [*IDLE_RECHECK, (Joined(), 15.0)],
        "timer",
        15.0,
        [ReadState()],
        Phase.RECHECKING,
        {"callers": 1, "sent": 1},
    ),
    Row(
        "r3-caller-gone-again-at-once-linger-holds",
        [*IDLE_RECHECK, (Joined(), 15.0)],
        Left(),
        15.0,
        [WaitUntil(21.0, 0)],
        Phase.IDLE,
        {"callers": 0},
    ),
    Row(
        "r3-nobody-back-dropped-nothing-sent",
        IDLE_RECHECK,
        "timer",
        21.0,
        [End(Ending.ABANDONED)],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r3-orphan-still-gets-its-event",
        ORPHAN,
        Event(Verdict.REMOVED),
        5.0,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r3-resend-due-for-nobody-lingers",
        [*RECHECK_XML, (Left(), 11.15)],
        XmlRead(present=True),
        11.2,
        [WaitUntil(21.2, 4)],
        Phase.IDLE,
        {"resume": Phase.QUEUED, "used": 1, "sent": 1},
    ),
    Row(
        "r3-caller-back-for-a-due-resend-sends",
        [*RECHECK_XML, (Left(), 11.15), (XmlRead(present=True), 11.2), (Joined(), 12.0)],
        "timer",
        12.0,
        [Send()],
        Phase.SENDING,
        {"sent": 2},
    ),
    Row(
        "r3-attempts-used-for-nobody-then-caller-gets-timeout",
        [*LAST_ATTEMPT_STATE, (Left(), 33.15), (XmlRead(present=True), 33.2), (Joined(), 34.0)],
        "timer",
        34.0,
        [End(Ending.TIMEOUT)],
        Phase.DONE,
        {"sent": 3},
    ),
    Row(
        "r3-last-caller-leaving-backoff-ends-it",
        BACKING_OFF,
        Left(),
        1.0,
        [End(Ending.ABANDONED)],
        Phase.DONE,
    ),
    Row(
        "r3-one-caller-of-two-leaving-backoff-goes-on",
        [*BACKING_OFF, (Joined(), 0.6)],
        Left(),
        1.0,
        [],
        Phase.BACKING_OFF,
        {"callers": 1},
    ),
    Row(
        "r3-busy-refusal-after-every-caller-left-ends-it",
        [*SENDING, (Left(), 0.2)],
        Answered(Outcome.BUSY),
        0.5,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), End(Ending.ABANDONED)],
        Phase.DONE,
        {"sent": 0},
    ),
    Row(
        "r3-window-over-during-a-check-with-nobody-lingers",
        [
            *SENDING,
            (Event(Verdict.REMOVED), 0.1),
            (Answered(Outcome.SENT), 0.2),  # window ends at 10.2
            (Left(), 0.3),
            (StateRead("running"), 10.5),
        ],
        XmlRead(present=True),
        10.6,
        [_stale_removed(), WaitUntil(20.6, 0)],
        Phase.IDLE,
        {"resume": Phase.RECHECKING},
    ),
    Row(
        "r3-resend-not-sent-then-nobody-lingers-once-back",
        [
            *RESENDING,
            (Answered(Outcome.NOT_SENT), 11.3),
            (Left(), 11.4),
            (Reconnected(), 12.0),
            (StateRead("running"), 12.1),
        ],
        XmlRead(present=True),
        12.2,
        [WaitUntil(22.2, 0)],
        Phase.IDLE,
        {"resume": Phase.QUEUED, "sent": 1, "used": 1},
    ),
    Row(
        "r3-one-of-two-callers-back-leaving-keeps-the-resume",
        [*IDLE_RECHECK, (Joined(), 12.0), (Joined(), 12.5)],
        Left(),
        13.0,
        [],
        Phase.IDLE,
        {"callers": 1},
    ),
    Row(
        "r3-resend-skipped-for-nobody-lingers",
        [*RESENDING, (Left(), 11.25)],
        Answered(Outcome.SKIPPED),
        11.3,
        [WaitUntil(21.3, 0)],
        Phase.IDLE,
        {"resume": Phase.QUEUED, "sent": 1, "used": 1},
    ),
    # Rule 5: the domain stops.
    Row(
        "r5-stopped-while-waiting",
        WAITING,
        Stopped("destroyed"),
        3.0,
        [End(Ending.STOPPED, reason="destroyed")],
        Phase.DONE,
    ),
    Row(
        "r5-stopped-during-request-ends-at-once",
        SENDING,
        Stopped("migrated"),
        0.1,
        [End(Ending.STOPPED, reason="migrated")],
        Phase.DONE,
    ),
    Row(
        "r5-a-verdict-kept-before-the-stop-stands",
        [*SENDING, (Event(Verdict.REMOVED, in_libvirt=True), 0.1)],
        Stopped("shutdown"),
        0.15,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r5-nothing-is-sent-after-a-stop",
        [*SENDING, (Stopped("shutdown"), 0.1)],
        Answered(Outcome.SKIPPED),
        0.2,
        [],
        Phase.DONE,
    ),
    Row(
        "r5-stopped-during-a-read-ends-at-once",
        RECHECK_XML,
        Stopped("crashed"),
        11.15,
        [End(Ending.STOPPED, reason="crashed")],
        Phase.DONE,
        {"used": 0},
    ),
    Row(
        "r2-resumed-during-the-recheck-state-read-looks-again",
        [*RECHECK_STATE, (Resumed(), 11.05)],
        StateRead("paused"),
        11.1,
        [Report("paused"), ReadState()],
        Phase.PAUSED,
        {"used": 0},
    ),
    Row(
        "r2-resumed-during-a-paused-look-looks-again",
        [*PAUSED, ("timer", 21.1), (Resumed(), 21.15)],
        StateRead("paused"),
        21.2,
        [ReadState()],
        Phase.PAUSED,
        {"used": 0},
    ),
    Row(
        "r2-running-after-the-second-look-gets-a-full-window",
        [*PAUSED, ("timer", 21.1), (Resumed(), 21.15), (StateRead("paused"), 21.2)],
        StateRead("running"),
        21.3,
        [Report("resumed"), WaitUntil(31.3, 0, window=True)],
        Phase.WAITING,
        {"used": 0},
    ),
    Row(
        "r5-state-read-shows-shut-off",
        RECHECK_STATE,
        StateRead("inactive"),
        11.1,
        [End(Ending.STOPPED, reason="stopped")],
        Phase.DONE,
    ),
    Row(
        "r5-state-read-shows-undefined",
        RECHECK_STATE,
        StateRead("missing"),
        11.1,
        [End(Ending.STOPPED, reason="undefined")],
        Phase.DONE,
    ),
    # Rule 5: refused as "not running" (libvirt fails the call at the moment it
    # emits STOPPED, and the answer may come first): why, before telling anyone.
    Row(
        "r5-refused-not-running-reads-why",
        SENDING,
        Answered(Outcome.NOT_RUNNING),
        0.5,
        [Report("request_sent"), ReadState()],
        Phase.STOPPING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r5-refused-no-domain-reads-why",
        SENDING,
        Answered(Outcome.NO_DOMAIN),
        0.5,
        [Report("request_sent"), ReadState()],
        Phase.STOPPING,
    ),
    Row(
        "r5-refused-not-running-the-shutoff-reason-says-migrated",
        STOPPING,
        StateRead("inactive", "migrated"),
        0.6,
        [End(Ending.STOPPED, reason="migrated")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-not-running-the-stopped-event-during-the-read-says-why",
        STOPPING,
        Stopped("migrated"),
        0.55,
        [End(Ending.STOPPED, reason="migrated")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-not-running-no-reason-waits-for-the-event",
        STOPPING,
        StateRead("inactive"),
        0.6,
        [WaitUntil(0.6 + STOP_EVENT_WAIT, 0)],
        Phase.STOPPING,
    ),
    Row(
        "r5-refused-not-running-the-event-after-the-read-says-why",
        [*STOPPING, (StateRead("missing"), 0.6)],
        Stopped("migrated"),
        0.7,
        [End(Ending.STOPPED, reason="migrated")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-not-running-no-event-is-stopped",
        [*STOPPING, (StateRead("inactive"), 0.6)],
        "timer",
        0.6 + STOP_EVENT_WAIT,
        [End(Ending.STOPPED, reason="stopped")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-no-domain-no-event-is-undefined",
        [*SENDING, (Answered(Outcome.NO_DOMAIN), 0.5), (StateRead("missing"), 0.6)],
        "timer",
        0.6 + STOP_EVENT_WAIT,
        [End(Ending.STOPPED, reason="undefined")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-not-running-gone-since-is-undefined",
        [*STOPPING, (StateRead("missing"), 0.6)],
        "timer",
        0.6 + STOP_EVENT_WAIT,
        [End(Ending.STOPPED, reason="undefined")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-not-running-running-again-is-stopped",
        STOPPING,
        StateRead("running"),
        0.6,
        [End(Ending.STOPPED, reason="stopped")],
        Phase.DONE,
    ),
    Row(
        "r5-refused-not-running-a-failed-read-is-still-a-stop",
        STOPPING,
        ReadFailed("lookup failed"),
        0.6,
        [End(Ending.STOPPED, reason="stopped")],
        Phase.DONE,
    ),
    Row(
        "r5-state-read-shows-shut-off-with-its-reason",
        RECHECK_STATE,
        StateRead("inactive", "migrated"),
        11.1,
        [End(Ending.STOPPED, reason="migrated")],
        Phase.DONE,
    ),
    # Rule 2: another job (a migration) held the domain past libvirt's wait
    # (code 68): the request was not taken.  Sent again using no attempt.
    Row(
        "r2-job-held-past-the-wait-is-sent-again-at-once",
        SENDING,
        Answered(Outcome.JOB_HELD, reason="cannot acquire state change lock"),
        30.0,
        [
            Report("request_sent"),
            Report("job_held", "reason", "cannot acquire state change lock"),
            Send(),
        ],
        Phase.SENDING,
        {"sent": 1, "used": 0, "accepted": False, "handed": False},
        Limits(attempts=1),
    ),
    Row(
        "r2-job-held-refused-at-once-waits-a-moment",
        SENDING,
        Answered(Outcome.JOB_HELD, reason="held"),
        0.1,
        [Report("request_sent"), Report("job_held", "reason", "held"), WaitUntil(1.1, 0)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0},
    ),
    Row(
        "r2-job-held-then-sent-after-the-moment",
        [*SENDING, (Answered(Outcome.JOB_HELD), 0.1)],
        "timer",
        1.1,
        [Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r2-job-held-costs-no-attempt-however-often",
        [
            *SENDING,
            (Answered(Outcome.JOB_HELD), 30.0),
            (Answered(Outcome.JOB_HELD), 60.0),
            (Answered(Outcome.JOB_HELD), 90.0),
        ],
        Answered(Outcome.SENT),
        91.0,
        [Report("request_sent"), WaitUntil(101.0, 0, window=True)],
        Phase.WAITING,
        {"sent": 1, "used": 0, "accepted": True},
        Limits(attempts=1),
    ),
    Row(
        "r2-job-held-on-a-re-send-sends-it-again-using-no-attempt",
        [*RESENDING],
        Answered(Outcome.JOB_HELD),
        41.2,
        [Report("request_sent"), Report("job_held", "reason", ""), Send()],
        Phase.SENDING,
        {"sent": 2, "used": 1, "accepted": True},
    ),
    Row(
        "r3-job-held-with-nobody-waiting-sends-nothing",
        [*SENDING, (Left(), 10.0)],
        Answered(Outcome.JOB_HELD),
        30.0,
        [Report("request_sent"), Report("job_held", "reason", ""), End(Ending.ABANDONED)],
        Phase.DONE,
        {"sent": 0},
    ),
    Row(
        "r3-job-held-on-a-re-send-caller-gone-the-unplug-lingers",
        [
            *RESENDING,
            (Answered(Outcome.JOB_HELD), 11.5),  # refused at once: sent again at 12.5
            (Left(), 12.0),
        ],
        "timer",
        12.5,
        [WaitUntil(22.5, 0)],
        Phase.IDLE,
        {"resume": Phase.QUEUED, "sent": 1, "used": 1},
    ),
    Row(
        "r3-job-held-nothing-of-ours-pending-caller-gone-ends-at-once",
        [*SENDING, (Answered(Outcome.JOB_HELD), 0.1)],
        Left(),
        0.5,
        [End(Ending.ABANDONED)],
        Phase.DONE,
    ),
    Row(
        "r5-job-held-then-the-migration-completes-ends-at-once",
        [*SENDING, (Answered(Outcome.JOB_HELD), 30.0)],
        Stopped("migrated"),
        40.0,
        [End(Ending.STOPPED, reason="migrated")],
        Phase.DONE,
    ),
    Row(
        "r2-an-event-after-a-job-held-refusal-is-early",
        [*SENDING, (Answered(Outcome.JOB_HELD), 0.1)],
        Event(Verdict.REMOVED),
        0.5,
        [ReadState()],
        Phase.CONFIRMING,
    ),
    Row(
        "r5-a-stop-while-the-request-is-out-ends-it-before-any-answer",
        [*SENDING, (Stopped("destroyed"), 0.2)],
        Answered(Outcome.JOURNAL_FAILED, error="disk full"),
        0.5,
        [],
        Phase.DONE,
    ),
    Row(
        "r5-a-verdict-that-counts-before-the-stop-wins",
        [*SENDING, (Event(Verdict.REMOVED, in_libvirt=True), 0.2)],
        Stopped("destroyed"),
        0.3,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r5-the-first-stop-is-the-reason",
        [*SENDING, (Stopped("destroyed"), 0.2)],
        Stopped("migrated"),
        0.3,
        [],
        Phase.DONE,
    ),
    # Rule 6: close.
    Row("r6-close-while-waiting", WAITING, Abort(), 2.0, [End(Ending.CANCELLED)], Phase.DONE),
    Row("r6-close-while-sending", SENDING, Abort(), 0.1, [End(Ending.CANCELLED)], Phase.DONE),
    Row(
        "r6-nothing-after-the-end",
        [*WAITING, (Abort(), 2.0)],
        Event(Verdict.REMOVED),
        3.0,
        [],
        Phase.DONE,
    ),
    # Rule 7: the connection.
    Row(
        "r7-connection-lost-while-waiting",
        WAITING,
        ConnectionDown(),
        3.0,
        [Report("waiting_for_reconnect"), WaitReconnect()],
        Phase.RECONNECTING,
    ),
    Row("r7-back-then-looks", RECONNECTING, Reconnected(), 4.0, [ReadState()], Phase.RECONNECTING),
    Row(
        "r7-back-and-gone-is-success",
        [*RECONNECTING, (Reconnected(), 4.0), (StateRead("running"), 4.1)],
        XmlRead(present=False),
        4.2,
        [End(Ending.REMOVED, confirmed_by="xml")],
        Phase.DONE,
    ),
    Row(
        "r7-back-and-there-window-goes-on-no-request",
        [*RECONNECTING, (Reconnected(), 4.0), (StateRead("running"), 4.1)],
        XmlRead(present=True),
        4.2,
        [WaitUntil(11.0, 6, window=True)],
        Phase.WAITING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r7-back-after-the-window-rechecks",
        [*RECONNECTING, (Reconnected(), 14.0), (StateRead("running"), 14.1)],
        XmlRead(present=True),
        14.2,
        [ReadState()],
        Phase.RECHECKING,
        {"sent": 1},
    ),
    Row(
        "r7-given-up",
        RECONNECTING,
        ReconnectFailed("ConnectionLost"),
        60.0,
        [End(Ending.ERROR, error="ConnectionLost")],
        Phase.DONE,
    ),
    Row(
        "r7-removed-event-while-reconnecting",
        RECONNECTING,
        Event(Verdict.REMOVED),
        5.0,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
    ),
    Row(
        "r7-maybe-sent-is-waited-out-as-sent",
        SENDING,
        Answered(Outcome.MAYBE_SENT, reason="End of file"),
        0.5,
        [
            Report("request_sent"),
            LoseConnection("call failed: End of file"),
            Report("waiting_for_reconnect"),
            WaitReconnect(),
        ],
        Phase.RECONNECTING,
        {"sent": 1, "accepted": True},
    ),
    Row(
        "r7-not-sent-is-not-an-attempt",
        SENDING,
        Answered(Outcome.NOT_SENT, reason="client socket is closed"),
        0.5,
        [
            Report("request_not_sent", "reason", "client socket is closed"),
            LoseConnection("call failed: client socket is closed"),
            Report("waiting_for_reconnect"),
            WaitReconnect(),
        ],
        Phase.RECONNECTING,
        {"sent": 0, "used": 0, "accepted": False},
    ),
    Row(
        "r7-not-sent-goes-out-once-back",
        [
            *SENDING,
            (Answered(Outcome.NOT_SENT), 0.5),
            (Reconnected(), 1.0),
            (StateRead("running"), 1.1),
        ],
        XmlRead(present=True),
        1.2,
        [Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r7-not-sent-resend-uses-the-same-budget",
        [
            (Joined(), 0),
            ("begin", 0),
            (Answered(Outcome.NOT_SENT), 0.5),
            (Reconnected(), 1.0),
            (StateRead("running"), 1.1),
            (XmlRead(present=True), 1.2),
            (Answered(Outcome.SENT), 1.3),
            ("timer", 11.3),
            (StateRead("running"), 11.4),
        ],
        XmlRead(present=True),
        11.5,
        [Send()],
        Phase.SENDING,
        {"sent": 2, "used": 1},
    ),
    Row(
        "r7-read-failed-for-good",
        RECHECK_STATE,
        ReadFailed("ConnectionLost"),
        11.1,
        [End(Ending.ERROR, error="ConnectionLost")],
        Phase.DONE,
    ),
    Row(
        "r7-connection-lost-while-paused-looks",
        PAUSED,
        ConnectionDown(),
        12.0,
        [ReadState()],
        Phase.PAUSED,
    ),
    Row(
        "r7-answer-over-a-remade-connection-looks-then-waits",
        [
            *SENDING,
            (Answered(Outcome.SENT, reconnected=True), 1.0),
            (Reconnected(), 1.5),
            (StateRead("running"), 1.6),
        ],
        XmlRead(present=True),
        1.7,
        [WaitUntil(11.0, 0, window=True)],
        Phase.WAITING,
    ),
    Row(
        "r7-in-progress-over-a-remade-connection-looks-first",
        SENDING,
        Answered(Outcome.IN_PROGRESS, reason="in progress", reconnected=True),
        1.0,
        [
            Report("request_sent"),
            Report("in_progress", "reason", "in progress"),
            Report("waiting_for_reconnect"),
            WaitReconnect(),
        ],
        Phase.RECONNECTING,
        {"accepted": True},
    ),
    Row(
        "r7-early-event-is-checked-once-the-connection-is-back",
        [*SENDING, (Event(Verdict.REMOVED), 0.1)],
        Answered(Outcome.MAYBE_SENT, reason="End of file"),
        0.5,
        [
            Report("request_sent"),
            LoseConnection("call failed: End of file"),
            Report("waiting_for_reconnect"),
            WaitReconnect(),
        ],
        Phase.RECONNECTING,
    ),
    Row(
        "r7-not-sent-then-early-removed-is-checked-before-sending",
        [
            *SENDING,
            (Answered(Outcome.NOT_SENT), 0.5),
            (Event(Verdict.REMOVED), 0.6),
            (Reconnected(), 1.0),
            (StateRead("running"), 1.1),
        ],
        XmlRead(present=True),
        1.2,
        [ReadState()],
        Phase.CONFIRMING,
        {"after": Phase.QUEUED},
    ),
    Row(
        "r7-not-sent-then-early-removed-still-there-sends",
        [
            *SENDING,
            (Answered(Outcome.NOT_SENT), 0.5),
            (Event(Verdict.REMOVED), 0.6),
            (Reconnected(), 1.0),
            (StateRead("running"), 1.1),
            (XmlRead(present=True), 1.2),
            (StateRead("running"), 1.3),
        ],
        XmlRead(present=True),
        1.4,
        [_stale_removed(), Send()],
        Phase.SENDING,
        {"sent": 1},
    ),
    Row(
        "r7-not-sent-then-stale-failed-is-ignored-and-sends",
        [
            *SENDING,
            (Answered(Outcome.NOT_SENT), 0.5),
            (Event(Verdict.FAILED), 0.6),
            (Reconnected(), 1.0),
            (StateRead("running"), 1.1),
        ],
        XmlRead(present=True),
        1.2,
        [Report("stale_event_ignored", "reason", "failed"), Send()],
        Phase.SENDING,
        {"sent": 1},
    ),
    Row(
        "r7-reconnect-after-back-offs-waits-out-the-window",
        [
            *BACKING_OFF,
            ("timer", 1.5),
            (Answered(Outcome.BUSY), 1.6),
            ("timer", 3.1),
            (Answered(Outcome.SENT), 3.2),  # window ends at 13.2
            (ConnectionDown(), 4.0),
            (Reconnected(), 5.0),
            (StateRead("running"), 5.1),
        ],
        XmlRead(present=True),
        5.2,
        [WaitUntil(13.2, 0, window=True)],
        Phase.WAITING,
    ),
    Row(
        "r7-reconnect-with-nobody-after-the-window-lingers",
        [
            *BACKING_OFF,
            ("timer", 1.5),
            (Answered(Outcome.BUSY), 1.6),
            ("timer", 3.1),
            (Answered(Outcome.SENT), 3.2),  # window ends at 13.2
            (ConnectionDown(), 4.0),
            (Left(), 4.5),
            (Reconnected(), 13.0),
            (StateRead("running"), 13.1),
        ],
        XmlRead(present=True),
        13.5,
        [WaitUntil(23.5, 0)],
        Phase.IDLE,
        {"resume": Phase.RECHECKING},
    ),
    # Stale inputs.
    Row("stale-timer-ignored", [*WAITING, (Joined(), 2.0)], Timer(0), 11.0, [], Phase.WAITING),
    Row("stale-answer-ignored", WAITING, Answered(Outcome.SENT), 2.0, [], Phase.WAITING),
    Row("stale-read-ignored", WAITING, XmlRead(present=False), 2.0, [], Phase.WAITING),
    Row("stale-reconnected-ignored", WAITING, Reconnected(), 2.0, [], Phase.WAITING),
    Row("stale-resumed-ignored-while-waiting", WAITING, Resumed(), 2.0, [], Phase.WAITING),
    # Rule 2: a guest reset voids a pending native-PCIe unplug (ACPI: completes it).
    Row(
        "r2-reset-while-waiting-looks-after-a-settle",
        WAITING,
        Rebooted(),
        3.0,
        [Report("guest_reset"), WaitUntil(4.0, 0)],
        Phase.WAITING,
        {"rebooted": True, "sent": 1, "used": 0},
    ),
    Row(
        "r2-reset-while-idle-after-the-window-is-said",
        IDLE_RECHECK,
        Rebooted(),
        12.0,
        [Report("guest_reset")],
        Phase.IDLE,
        {"rebooted": True, "sent": 1, "used": 0},
    ),
    Row(
        "r2-reset-while-idle-voids-on-the-look-a-returning-caller-starts",
        [
            *IDLE_RECHECK,
            (Rebooted(), 12.0),
            (Joined(), 15.0),
            ("timer", 15.0),
            (StateRead("running"), 15.1),
        ],
        XmlRead(present=True),
        15.2,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"used": 0, "rebooted": False},
    ),
    Row(
        "r2-reset-while-reconnecting-is-kept-for-the-windows-look",
        [*RECONNECTING, (Rebooted(), 4.0), (Reconnected(), 5.0), (StateRead("running"), 5.1)],
        XmlRead(present=True),
        5.2,
        [WaitUntil(11.0, 0, window=True)],
        Phase.WAITING,
        {"rebooted": True, "used": 0},
    ),
    Row(
        "r2-reset-while-reconnecting-voids-the-request-at-the-windows-end",
        [
            *RECONNECTING,
            (Rebooted(), 4.0),
            (Reconnected(), 5.0),
            (StateRead("running"), 5.1),
            (XmlRead(present=True), 5.2),
            ("timer", 11.0),
            (StateRead("running"), 11.1),
        ],
        XmlRead(present=True),
        11.2,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"used": 0},
    ),
    Row(
        "r2-reset-again-during-the-settle-reports-once",
        RESET,
        Rebooted(),
        3.5,
        [WaitUntil(4.0, 0)],
        Phase.WAITING,
        {"rebooted": True},
    ),
    Row(
        "r2-reset-settle-never-beyond-the-window",
        WAITING,
        Rebooted(),
        10.5,
        [Report("guest_reset"), WaitUntil(11.0, 0)],
        Phase.WAITING,
    ),
    Row(
        "r2-reset-settle-is-a-quarter-of-a-short-timeout",
        [*SENDING, (Answered(Outcome.SENT), 1.0)],
        Rebooted(),
        1.5,
        [Report("guest_reset"), WaitUntil(2.0, 0)],
        Phase.WAITING,
        limits=Limits(timeout=2.0),
    ),
    Row(
        "r2-reset-then-removed-event-is-success-one-request",
        RESET,
        Event(Verdict.REMOVED),
        3.13,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r2-reset-settle-over-looks",
        RESET,
        "timer",
        4.0,
        [ReadState()],
        Phase.RECHECKING,
    ),
    Row(
        "r2-reset-look-is-not-an-attempt-timed-out",
        [*RESET, ("timer", 4.0)],
        StateRead("running"),
        4.1,
        [ReadXml()],
        Phase.RECHECKING,
    ),
    Row(
        "r2-reset-device-gone-is-success",
        RESET_LOOK_XML,
        XmlRead(present=False),
        4.2,
        [End(Ending.REMOVED, confirmed_by="xml")],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r2-reset-removed-during-the-look-is-success",
        [*RESET_LOOK_XML, (Event(Verdict.REMOVED), 4.15)],
        XmlRead(present=True),
        4.2,
        [End(Ending.REMOVED, confirmed_by="event")],
        Phase.DONE,
        {"sent": 1},
    ),
    Row(
        "r2-reset-still-attached-voids-the-request-resends-no-attempt",
        RESET_LOOK_XML,
        XmlRead(present=True),
        4.2,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0, "accepted": False, "held_from": 1.0, "rebooted": False},
    ),
    Row(
        "r2-reset-refused-in-progress-is-not-taken-backs-off",
        VOIDED,
        _HELD,
        4.3,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), WaitUntil(5.3, 0)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0, "accepted": False},
    ),
    Row(
        "r2-reset-refused-busy-is-not-taken-backs-off",
        VOIDED,
        Answered(Outcome.BUSY, reason="guest is busy"),
        4.3,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), WaitUntil(5.3, 0)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0},
    ),
    Row(
        "r2-reset-refusals-spaced-but-retried-when-qemu-takes-it-again",
        [*VOIDED, (_HELD, 4.3), ("timer", 5.3)],
        _HELD,
        5.5,
        [Report("request_sent"), Report("busy_backoff", "delay", 0.5), WaitUntil(6.0, 0)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0},
    ),
    Row(
        "r2-reset-resend-taken-waits-a-full-window",
        [*VOIDED, (_HELD, 4.3), ("timer", 5.3), (_HELD, 5.5), ("timer", 6.0)],
        Answered(Outcome.SENT),
        6.1,
        [Report("request_sent"), WaitUntil(16.1, 0, window=True)],
        Phase.WAITING,
        {"sent": 1, "used": 0, "accepted": True, "held_from": None},
    ),
    Row(
        "r2-reset-no-resend-into-the-unplug-that-follows",
        [
            *VOIDED,
            (Answered(Outcome.SENT), 6.1),
            ("timer", 16.1),
            (StateRead("running"), 16.2),
        ],
        XmlRead(present=True),
        16.3,
        [Send()],
        Phase.SENDING,
        {"sent": 2, "used": 1},
    ),
    Row(
        "r2-reset-refusals-longer-than-timeout-use-no-attempt",
        [
            *SENDING,
            (Answered(Outcome.SENT), 1.0),
            (Rebooted(), 1.5),
            ("timer", 2.0),
            (StateRead("running"), 2.05),
            (XmlRead(present=True), 2.1),
            (_HELD, 2.2),
            ("timer", 2.7),
            (_HELD, 2.8),
            ("timer", 3.55),
            (_HELD, 3.6),
        ],
        "timer",
        4.7,
        [Send()],
        Phase.SENDING,
        {"used": 0, "busy_refusals": 3},
        Limits(timeout=2.0),
    ),
    Row(
        "r2-reset-refusal-long-after-the-void-is-in-progress-again",
        [*VOIDED, (_HELD, 4.3), ("timer", 5.3), (_HELD, 5.5), ("timer", 6.0)],
        _HELD,
        11.5,
        [
            Report("request_sent"),
            Report("in_progress", "reason", "already in the process of unplug"),
            WaitUntil(21.5, 0, window=True),
        ],
        Phase.WAITING,
        {"sent": 1, "accepted": True},
    ),
    Row(
        "r2-reset-voids-a-maybe-sent-request-held-from-its-answer",
        [
            *SENDING,
            (Answered(Outcome.MAYBE_SENT, reason="eof"), 1.0),
            (Reconnected(), 2.0),
            (StateRead("running"), 2.1),
            (XmlRead(present=True), 2.2),
            (Rebooted(), 3.0),
            ("timer", 4.0),
            (StateRead("running"), 4.1),
        ],
        XmlRead(present=True),
        4.2,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"held_from": 1.0, "used": 0},
    ),
    Row(
        "r2-reset-while-the-request-is-out-is-not-a-void",
        SENDING,
        Rebooted(),
        0.5,
        [],
        Phase.SENDING,
        {"rebooted": False},
    ),
    Row(
        "r2-reset-during-the-recheck-voids-on-the-look",
        [*RECHECK_XML, (Rebooted(), 11.15)],
        XmlRead(present=True),
        11.2,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0},
    ),
    Row(
        "r2-reset-during-a-busy-backoff-ignored",
        BACKING_OFF,
        Rebooted(),
        1.0,
        [],
        Phase.BACKING_OFF,
        {"rebooted": False},
    ),
    Row(
        "r3-reset-settle-over-for-nobody-lingers",
        [*ORPHAN, (Rebooted(), 3.0)],
        "timer",
        4.0,
        [WaitUntil(14.0, 0)],
        Phase.IDLE,
        {"resume": Phase.RECHECKING},
    ),
    Row(
        "r3-reset-refused-for-nobody-ends-nothing-pending",
        [*VOIDED, (Left(), 4.25)],
        _HELD,
        4.3,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), End(Ending.ABANDONED)],
        Phase.DONE,
    ),
    # A reset while the guest is paused voids the request all the same: said
    # at once, looked at a moment after the guest runs again.
    Row(
        "r2-reset-while-paused-is-said-and-waits-for-the-guest",
        PAUSED,
        Rebooted(),
        11.5,
        [Report("guest_reset")],
        Phase.PAUSED,
        {"rebooted": True, "used": 0},
    ),
    Row(
        "r2-reset-while-paused-resumed-looks-after-a-settle-not-a-window",
        RESET_PAUSED,
        StateRead("running"),
        12.1,
        [Report("resumed"), WaitUntil(13.1, 0, window=True)],
        Phase.WAITING,
        {"rebooted": True, "deadline": 13.1},
    ),
    Row(
        "r2-reset-while-paused-settle-over-looks-not-an-attempt-timed-out",
        [*RESET_RESUMED, ("timer", 13.1)],
        StateRead("running"),
        13.2,
        [ReadXml()],
        Phase.RECHECKING,
    ),
    Row(
        "r2-reset-while-paused-still-attached-voids-resends-no-attempt",
        [*RESET_RESUMED, ("timer", 13.1), (StateRead("running"), 13.2)],
        XmlRead(present=True),
        13.3,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0, "held_from": 1.0, "rebooted": False},
    ),
    Row(
        "r2-reset-while-paused-again-reports-once",
        [*PAUSED, (Rebooted(), 11.5)],
        Rebooted(),
        11.6,
        [],
        Phase.PAUSED,
        {"rebooted": True},
    ),
    # A reset during a re-check's read: said once, the look under way decides.
    Row(
        "r2-reset-during-the-recheck-state-read-is-said-the-read-decides",
        RECHECK_STATE,
        Rebooted(),
        11.05,
        [Report("guest_reset")],
        Phase.RECHECKING,
        {"rebooted": True, "reading": True},
    ),
    Row(
        "r2-reset-during-the-recheck-xml-read-is-said-the-read-decides",
        RECHECK_XML,
        Rebooted(),
        11.15,
        [Report("guest_reset")],
        Phase.RECHECKING,
        {"rebooted": True, "reading": True},
    ),
    Row(
        "r2-reset-during-the-recheck-state-read-is-not-an-attempt-timed-out",
        [*RECHECK_STATE, (Rebooted(), 11.05)],
        StateRead("running"),
        11.1,
        [ReadXml()],
        Phase.RECHECKING,
    ),
    Row(
        "r2-reset-during-the-recheck-found-paused-looks-after-a-settle-once-resumed",
        [*RECHECK_STATE, (Rebooted(), 11.05), (StateRead("paused"), 11.1), (Resumed(), 12.0)],
        StateRead("running"),
        12.1,
        [Report("resumed"), WaitUntil(13.1, 0, window=True)],
        Phase.WAITING,
        {"rebooted": True},
    ),
    # A reset voiding another client's pending unplug (ours refused "in
    # progress"): QEMU's hold counts from our refused request, not from 0.
    Row(
        "r2-reset-voids-another-clients-unplug-held-from-our-refusal",
        OTHERS_VOIDED[:-1],
        XmlRead(present=True),
        4.2,
        [Report("request_voided"), Send()],
        Phase.SENDING,
        {"sent": 1, "used": 0, "held_from": 1.0, "accepted": False},
    ),
    Row(
        "r2-reset-voided-another-clients-unplug-refusal-not-taken-spaced",
        OTHERS_VOIDED,
        _HELD,
        4.3,
        [Report("request_sent"), Report("busy_backoff", "delay", 1.0), WaitUntil(5.3, 0)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0, "accepted": False},
    ),
    Row(
        "r2-reset-voided-another-clients-unplug-retried-when-qemu-takes-it-again",
        [*OTHERS_VOIDED, (_HELD, 4.3), ("timer", 5.3)],
        _HELD,
        5.5,
        [Report("request_sent"), Report("busy_backoff", "delay", 0.5), WaitUntil(6.0, 0)],
        Phase.BACKING_OFF,
        {"sent": 0, "used": 0},
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_rule(row: Row) -> None:
    m, _ = run(row.given, row.limits)
    if row.input == "begin":
        actions = m.begin(row.at)
    elif row.input == "timer":
        actions = m.handle(Timer(m.token), row.at)
    else:
        actions = m.handle(row.input, row.at)
    assert len(actions) == len(row.actions), actions
    for got, want in zip(actions, row.actions, strict=True):
        if isinstance(want, type):
            assert isinstance(got, want), (got, want)
        elif isinstance(want, WaitUntil):
            # The token is the machine's own: the wait armed is its current one.
            assert isinstance(got, WaitUntil), actions
            assert (got.when, got.window, got.token) == (want.when, want.window, m.token), actions
        else:
            assert got == want, actions
    assert m.phase is row.phase
    for name, value in row.counters.items():
        assert getattr(m, name) == value, (name, getattr(m, name), value)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_every_wait_has_a_new_token_and_a_replaced_one_is_ignored(row: Row) -> None:
    """A timer is matched to its wait by token: every wait armed gets a token
    no earlier wait had, and the timer of a wait replaced since does nothing."""
    m = UnplugMachine(row.limits)
    armed: list[int] = []
    for what, now in [*row.given, (row.input, row.at)]:
        if what == "begin":
            out = m.begin(now)
        elif what == "timer":
            out = m.handle(Timer(m.token), now)
        else:
            out = m.handle(what, now)
        for action in out:
            if isinstance(action, WaitUntil):
                assert not armed or action.token > armed[-1], (armed, action)
                armed.append(action.token)
    phase = m.phase
    for token in armed:
        if token != m.token:
            assert m.handle(Timer(token), row.at) == [], token
    assert m.phase is phase


def test_every_rule_has_rows() -> None:
    rules = {row.id.split("-")[0] for row in ROWS}
    assert {"r2", "r3", "r5", "r6", "r7"} <= rules


def test_take_up_with_window_left_waits_it_out() -> None:
    m = UnplugMachine(Limits())
    actions = m.taken_up(sent=2, used=1, left=4.0, now=100.0)
    assert actions == [WaitUntil(104.0, m.token, window=True)]
    assert (m.phase, m.sent, m.used, m.accepted, m.handed) == (Phase.WAITING, 2, 1, True, True)
    # An event for the alias is its own request's (maybe sent before the restart).
    assert m.handle(Event(Verdict.REMOVED), 101.0) == [End(Ending.REMOVED, confirmed_by="event")]


def test_take_up_with_window_over_lingers_for_a_caller() -> None:
    m = UnplugMachine(Limits())
    assert m.taken_up(sent=1, used=0, left=0.0, now=100.0) == [WaitUntil(110.0, m.token)]
    assert (m.phase, m.resume) == (Phase.IDLE, Phase.RECHECKING)
    assert m.handle(Joined(), 101.0) == [WaitUntil(101.0, m.token)]
    assert m.handle(Timer(m.token), 101.0) == [ReadState()]
    m2 = UnplugMachine(Limits())
    m2.taken_up(sent=1, used=0, left=0.0, now=100.0)
    assert m2.handle(Timer(m2.token), 110.0) == [End(Ending.ABANDONED)]


def test_take_up_with_part_of_a_second_left_waits_it_out() -> None:
    m = UnplugMachine(Limits())
    assert m.taken_up(sent=1, used=0, left=0.5, now=100.0) == [
        WaitUntil(100.5, m.token, window=True)
    ]
    assert m.phase is Phase.WAITING


def test_wants_request_asked_in_the_thread() -> None:
    m, _ = run(SENDING)
    assert m.wants_request
    m.handle(Left(), 0.1)
    assert not m.wants_request  # nobody waits
    m, _ = run(SENDING)
    m.handle(Event(Verdict.REMOVED, in_libvirt=True), 0.1)
    assert not m.wants_request  # decided
    m, _ = run(SENDING)
    m.handle(Event(Verdict.REMOVED), 0.1)
    assert m.wants_request  # an early verdict is only checked
    m, _ = run(SENDING)
    m.handle(Stopped("destroyed"), 0.1)
    assert not m.wants_request  # over


@pytest.mark.parametrize("module", [machine_module, machine_io], ids=lambda m: m.__name__)
def test_the_machine_is_pure(module: Any) -> None:
    """No asyncio, threads, clock or logging: decisions only (the machine
    imports its vocabulary, and nothing else of the package)."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            name = (node.module or "").split(".")[0]
            imported.add("." + name if node.level else name)
    forbidden = {"asyncio", "threading", "time", "logging", "structlog", "concurrent", "aiodetach"}
    assert not imported & forbidden, imported & forbidden
    assert imported <= {"__future__", "enum", "dataclasses", "typing", "._machine_io"}


def _unused(_: Input) -> None:  # the union names every input (kept in step with handle)
    pass
