"""A hypothesis state machine that drives the pure unplug machine directly.

No loop, no threads: the test is the driver.  It hands the machine any input
that a real driver could hand it at that moment (an answer only while a
request is out, a read's result only while that read is asked for, a timer
for the wait armed or for one replaced since, events, stops, pauses, callers
coming and going, the connection going and coming back, a close) on a
virtual clock, and after every input checks what came out against a model
of the rules written from docs/protocol.md, not from the machine's code:

- at most one request is out at a time, and none is sent with nobody waiting;
- a request after the first that counted is sent only after a look at the
  live XML showed the device still there (never blindly), and at most
  ``attempts`` requests count;
- a busy refusal before anything was accepted, a request that never reached
  libvirtd and one skipped in its thread do not count;
- a verdict that counts (not early) ends the unplug in the same step, except
  while a call is out (the request in its thread, a state or XML read),
  where it ends it as soon as that call answered, before anything else;
- ``DetachTimeout`` only with every attempt used; ``DEVICE_REMOVAL_FAILED``
  only after such an event that counted; success "event" only after a
  ``DEVICE_REMOVED`` that counted; success "xml" only after a read found the
  device gone;
- no attempt is used while the domain is paused;
- a request another job held the domain against (``JOB_HELD``) is not taken:
  it neither counts nor uses an attempt;
- a guest reset voids a taken request only once a look at the live XML found
  the device still there after it: the void uses no attempt and the voided
  request stops counting; QEMU's refusals in the hold after the request it
  took ("busy", "in progress") are not taken either, and once a re-send is
  taken its window runs with nothing sent into it;
- "not running" is not the end yet: the domain's state is read first, and
  the stop ends with the shutoff reason read, else the STOPPED event's,
  else what the refusal said;
- nothing is dropped while a caller waits; nothing comes out after the end;
- every wait armed has a token no earlier wait had, and the timer of a wait
  replaced since is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aiodetach._machine import UnplugMachine
from aiodetach._machine_io import (
    RESET_HOLD_LIMIT,
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


@dataclass(frozen=True)
class Limits:
    timeout: float
    attempts: int


COUNTED = {
    Outcome.SENT,
    Outcome.IN_PROGRESS,
    Outcome.MAYBE_SENT,
    Outcome.ALIAS_MISSING,
    Outcome.NOT_RUNNING,
    Outcome.NO_DOMAIN,
    Outcome.REFUSED,
}
"""Answers that reached libvirt and count as a request (BUSY: only once one
of ours was accepted)."""


ANSWERS = [
    *Outcome,
    Outcome.SENT,
    Outcome.SENT,
    Outcome.IN_PROGRESS,
    Outcome.BUSY,
    Outcome.JOB_HELD,
]
"""Every answer, the ones an unplug goes on after more often (most others end it)."""
GOING_ON = [Outcome.SENT, Outcome.SENT, Outcome.IN_PROGRESS, Outcome.BUSY, Outcome.JOB_HELD]
"""The answers the usual next step draws from (the unplug goes on after them)."""
RARE = st.integers(min_value=0, max_value=3)
"""Inputs that end most unplugs (a close, a stop, a verdict) are drawn with
this and skipped unless it is 0, so runs get deep enough for resets, holds
and re-sends."""


class UnplugRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.limits = Limits(timeout=10.0, attempts=3)
        self.m = UnplugMachine(self.limits)
        self.now = 0.0
        self.begun = False
        # What the driver has out.
        self.request_out = False
        self.read_out: str | None = None
        self.wait: WaitUntil | None = None
        self.armed: set[int] = set()  # the tokens of every wait armed, ...
        self.fired: set[int] = set()  # ... and of those whose timer was delivered
        self.reconnect_out = False
        # The model's own account.
        self.callers = 0
        self.ended: End | None = None
        self.counted = 0
        self.accepted = False
        self.handed = False
        self.looked_since_counted = True  # the first request needs no look
        self.real_verdict: Verdict | None = None  # the first that counts, while a request is out
        self.early_removed_pending = False
        self.gone_seen = False
        self.paused = False
        self.used_before_pause = 0
        self.taken_at = 0.0  # when libvirt last took a request (ours, or one pending)
        self.reset_seen = False  # a reset came while a taken request was pending
        self.held_from: float | None = None  # a reset voided the request taken then
        self.stop_answer: str | None = None  # a request was refused "not running" (why)
        self.stop_looked = False  # ... and the domain's state was read since

    # ----------------------------------------------------------- driving
    def feed(self, what: Input) -> list[Action]:
        before = self.ended
        out = self.m.handle(what, self.now)
        if before is not None:
            assert out == [], "nothing after the end"
        self.perform(what, out)
        return out

    def perform(self, what: Input, out: list[Action]) -> None:
        for action in out:
            assert self.ended is None, "nothing after the end"
            if isinstance(action, Send):
                assert not self.request_out, "one request at a time"
                assert self.callers > 0, "nothing is sent for nobody"
                assert self.looked_since_counted, "no blind re-send"
                assert self.counted < self.limits.attempts, "at most attempts requests count"
                self.request_out = True
            elif action == Report("request_voided"):
                # Void only on a look that found the device after a reset.
                assert isinstance(what, XmlRead), "a void follows a look"
                assert what.present, "a void only with the device still there"
                assert self.reset_seen, "a void only after a reset of a taken request"
                self.counted -= 1  # the voided request stops counting
                self.accepted = self.reset_seen = False
                self.held_from = self.taken_at
            elif isinstance(action, ReadState):
                self.read_out = "state"
            elif isinstance(action, ReadXml):
                self.read_out = "xml"
            elif isinstance(action, WaitUntil):
                # A timer is matched to its wait by token: a wait replaced
                # since must never be taken for the current one.
                assert action.token > max(self.armed, default=0), "a wait's token is new"
                self.armed.add(action.token)
                if action.token == self.m.token:
                    self.wait = action
            elif isinstance(action, WaitReconnect):
                self.reconnect_out = True
            elif isinstance(action, End):
                self.check_end(what, action)
                self.ended = action
        if self.wait is not None and self.wait.token != self.m.token:
            self.wait = None  # the driver disarms a wait the machine moved on from
        if (
            isinstance(what, Event)
            and self.ended is None
            and not self.request_out
            and self.read_out is None
            and (self.handed or what.in_libvirt)
            and what.verdict is not Verdict.GONE
        ):
            raise AssertionError("a verdict that counts ends the unplug where it lands")

    def check_end(self, what: Input, end: End) -> None:
        if end.how is Ending.TIMEOUT:
            assert self.m.used >= self.limits.attempts, "DetachTimeout only with every attempt used"
        elif end.how is Ending.FAILED:
            assert self.real_verdict is Verdict.FAILED or (
                isinstance(what, Event) and what.verdict is Verdict.FAILED
            )
        elif end.how is Ending.REMOVED and end.confirmed_by == "event":
            assert self.real_verdict is Verdict.REMOVED or (
                isinstance(what, Event) and what.verdict is Verdict.REMOVED
            )
        elif end.how is Ending.REMOVED:
            assert isinstance(what, XmlRead)
            assert not what.present
        elif end.how is Ending.ABANDONED:
            assert self.callers == 0, "nothing is dropped while a caller waits"
        elif end.how is Ending.STOPPED and not isinstance(what, Stopped):
            if isinstance(what, StateRead) and what.state == "inactive" and what.reason:
                assert end.reason == what.reason, "the shutoff reason read says why"
            elif self.stop_answer is not None:
                assert self.stop_looked, "the state is read before a refused stop ends it"
                assert end.reason == self.stop_answer, (end, self.stop_answer)
            else:
                assert isinstance(what, StateRead), "a stop is learnt from an event or a read"
                assert what.state in ("inactive", "missing")
        if self.paused:
            assert self.m.used == self.used_before_pause, "no attempt is used while paused"

    # ------------------------------------------------------------- rules
    @initialize()
    def first_caller(self) -> None:
        """Every run starts with a caller and its request out (the steps go
        on what follows, not on waiting for a first caller)."""
        self.join(0)

    @precondition(lambda self: self.ended is None)
    @rule(rare=RARE)
    def join(self, rare: int) -> None:
        if rare and self.begun:
            return  # callers coming and going: often enough
        self.callers += 1
        self.feed(Joined())
        if not self.begun:
            self.begun = True
            self.perform(Joined(), self.m.begin(self.now))

    @precondition(lambda self: self.ended is None)
    @rule(outcome=st.sampled_from(GOING_ON), dt=st.sampled_from([0.0, 0.25, 1.5]))
    def going_on(self, outcome: Outcome, dt: float) -> None:
        """The world does the usual next thing: the request out is answered
        (taken, or refused in a way the unplug goes on after), a read finds
        the guest running and the device there, the connection comes back,
        the wait armed is over.  Runs get deep (resets, holds, re-sends)
        without waiting for each of those to be drawn among every input."""
        if self.wait is None or self.now + dt <= self.wait.when:
            self.now += dt  # a moment later (no timer is skipped)
        if self.request_out:
            self.answer(outcome)
        elif self.read_out == "state":
            self.state_read("running", "")
        elif self.read_out == "xml":
            self.xml_read(present=True)
        elif self.reconnect_out:
            self.reconnect(1)
        elif self.wait is not None:
            self.timer()

    @precondition(lambda self: self.ended is None and self.callers > 0)
    @rule(rare=RARE)
    def leave(self, rare: int) -> None:
        if rare:
            return
        self.callers -= 1
        self.feed(Left())

    @precondition(lambda self: self.ended is None and self.request_out)
    @rule(outcome=st.sampled_from(ANSWERS))
    def answer(self, outcome: Outcome) -> None:
        if outcome is Outcome.SKIPPED and self.m.wants_request:
            outcome = Outcome.SENT  # the thread skips only what nobody wants
        if outcome is not Outcome.SKIPPED and not self.m.wants_request:
            outcome = Outcome.SKIPPED
        self.request_out = False
        # QEMU still holds the slot for a request a reset voided: not taken.
        held = (
            self.held_from is not None
            and outcome in (Outcome.BUSY, Outcome.IN_PROGRESS)
            and self.now - self.held_from < RESET_HOLD_LIMIT
        )
        busy_first = outcome is Outcome.BUSY and not self.accepted
        if not held and (outcome in COUNTED or (outcome is Outcome.BUSY and not busy_first)):
            self.counted += 1
            self.looked_since_counted = False
            self.handed = True
        if not held and (
            outcome in (Outcome.SENT, Outcome.IN_PROGRESS, Outcome.MAYBE_SENT)
            or (outcome is Outcome.BUSY and self.accepted)
        ):
            self.accepted = True
            self.taken_at, self.reset_seen = self.now, False
        if outcome is Outcome.SENT:
            self.held_from = None
        if outcome in (Outcome.NOT_RUNNING, Outcome.NO_DOMAIN):
            self.stop_answer = "undefined" if outcome is Outcome.NO_DOMAIN else "stopped"
        used = self.m.used
        out = self.feed(Answered(outcome, error=outcome.value, reason=outcome.value))
        if outcome is Outcome.JOB_HELD or held:
            assert self.m.used == used, "a request not taken uses no attempt"
        if self.stop_answer is not None and outcome in (Outcome.NOT_RUNNING, Outcome.NO_DOMAIN):
            stops = [a for a in out if isinstance(a, End) and a.how is Ending.STOPPED]
            assert not stops, "a refused stop reads why before it ends"

    @precondition(lambda self: self.ended is None and self.read_out == "state")
    @rule(
        state=st.sampled_from(["running", "running", "paused", "inactive", "missing"]),
        reason=st.sampled_from(["", "migrated", "destroyed"]),
    )
    def state_read(self, state: str, reason: str) -> None:
        self.read_out = None
        if state == "paused" and not self.paused:
            self.paused, self.used_before_pause = True, self.m.used
        elif state != "paused":
            self.paused = False
        if self.stop_answer is not None:
            self.stop_looked = True
            if state == "missing":
                self.stop_answer = "undefined"  # gone since: it was undefined
        read = StateRead(state, reason if state == "inactive" else "")  # type: ignore[arg-type]
        self.feed(read)

    @precondition(lambda self: self.ended is None and self.read_out == "xml")
    @rule(present=st.booleans())
    def xml_read(self, present: bool) -> None:
        self.read_out = None
        if present and self.m.phase is Phase.RECHECKING:
            self.looked_since_counted = True
        if present and self.m.phase in (Phase.RECONNECTING, Phase.CONFIRMING):
            # The look after a request that never went out (or a stale event)
            # also stands for the look before the next one.
            self.looked_since_counted = self.looked_since_counted or not self.accepted
        used = self.m.used
        recheck, reset = self.m.phase is Phase.RECHECKING, self.reset_seen
        out = self.feed(XmlRead(present))
        voided = Report("request_voided") in out
        if voided:
            assert self.m.used == used, "a voided request uses no attempt"
        if present and recheck and self.real_verdict is None:
            assert voided == reset, "a re-check after a reset finds it void"

    @precondition(lambda self: self.ended is None and self.read_out is not None)
    @rule(rare=RARE)
    def read_failed(self, rare: int) -> None:
        if rare:
            return
        self.read_out = None
        self.stop_looked = self.stop_looked or self.stop_answer is not None
        self.feed(ReadFailed("ConnectionLost"))

    @precondition(lambda self: self.ended is None and self.wait is not None)
    @rule()
    def timer(self) -> None:
        assert self.wait is not None
        self.now = max(self.now, self.wait.when)
        wait, self.wait = self.wait, None
        self.fired.add(wait.token)
        self.feed(Timer(wait.token))

    @precondition(
        lambda self: (
            self.ended is None
            and bool(self.armed - self.fired - {self.wait.token if self.wait else 0})
        )
    )
    @rule(data=st.data())
    def stale_timer(self, data: st.DataObject) -> None:
        """The timer of a wait replaced since (it fired as the machine moved
        on): ignored, whatever the phase."""
        current = self.wait.token if self.wait else 0
        token = data.draw(st.sampled_from(sorted(self.armed - self.fired - {current})))
        assert self.feed(Timer(token)) == [], "a stale timer is ignored"

    @rule(dt=st.floats(min_value=0.0, max_value=30.0))
    def time_passes(self, dt: float) -> None:
        if self.wait is not None:
            dt = min(dt, max(self.wait.when - self.now, 0.0))  # no timer is skipped
        self.now += dt

    @precondition(lambda self: self.ended is None)
    @rule(verdict=st.sampled_from([Verdict.REMOVED, Verdict.FAILED]), ours=st.booleans(), rare=RARE)
    def event(self, verdict: Verdict, ours: bool, rare: int) -> None:
        if rare:
            return
        in_libvirt = ours and self.request_out
        counts = self.handed or in_libvirt
        if counts and self.real_verdict is None:
            self.real_verdict = verdict
        self.feed(Event(verdict, in_libvirt))

    @precondition(lambda self: self.ended is None)
    @rule(reason=st.sampled_from(["destroyed", "migrated"]), rare=RARE)
    def stopped(self, reason: str, rare: int) -> None:
        if rare:
            return
        kept = self.real_verdict is not None and (self.request_out or self.read_out is not None)
        out = self.feed(Stopped(reason))
        # Every waiter wakes at once, also while a call is out; a verdict
        # kept while that call was out came first and stands.
        if kept:
            assert len(out) == 1
            assert isinstance(out[0], End)
            assert out[0].how in (Ending.REMOVED, Ending.FAILED)
        else:
            assert out == [End(Ending.STOPPED, reason=reason)]

    @precondition(lambda self: self.ended is None)
    @rule()
    def reset(self) -> None:
        """libvirt's REBOOT: a request taken and pending, whose window runs,
        whose re-check is reading, or sent to a paused guest, is void."""
        phase = self.m.phase
        # or whose window is suspended (nobody waits, the connection is down,
        # a verdict is checked) and goes back to that window or its look
        back = self.m.resume if phase is Phase.IDLE else self.m.after
        suspended = phase in (Phase.IDLE, Phase.RECONNECTING, Phase.CONFIRMING) and back in (
            Phase.WAITING,
            Phase.RECHECKING,
        )
        voids = (
            self.accepted
            and not self.request_out
            and (phase in (Phase.WAITING, Phase.RECHECKING, Phase.PAUSED) or suspended)
        )
        out = self.feed(Rebooted())
        said = Report("guest_reset") in out
        assert said == (voids and not self.reset_seen), "a reset that voids is said, once"
        self.reset_seen = self.reset_seen or voids

    @precondition(lambda self: self.ended is None)
    @rule(rare=RARE)
    def resumed(self, rare: int) -> None:
        if rare and not self.paused:
            return
        self.feed(Resumed())

    @precondition(lambda self: self.ended is None)
    @rule(rare=RARE)
    def connection_down(self, rare: int) -> None:
        if rare:
            return
        self.feed(ConnectionDown())

    @precondition(lambda self: self.ended is None and self.reconnect_out)
    @rule(rare=RARE)
    def reconnect(self, rare: int) -> None:
        self.reconnect_out = False
        self.feed(Reconnected() if rare else ReconnectFailed("ConnectionLost"))

    @precondition(lambda self: self.ended is None)
    @rule(rare=RARE)
    def close(self, rare: int) -> None:
        if rare:
            return
        assert self.feed(Abort()) == [End(Ending.CANCELLED)]

    # --------------------------------------------------------- invariants
    @invariant()
    def counters_agree(self) -> None:
        assert self.m.callers == self.callers
        # A request counts from its Send until an answer says it did not.
        out = self.request_out
        assert self.m.sent == self.counted + (1 if out else 0)
        assert self.m.used <= self.limits.attempts
        # QEMU's hold after a void counts from when the voided request was
        # taken (ours, or one pending that ours was refused "in progress" on).
        assert self.m.held_from == self.held_from
        assert (self.m.phase is Phase.DONE) == (self.ended is not None)
        if self.ended is None and self.m.phase is Phase.SENDING:
            assert self.request_out, "SENDING means a request is out"


TestUnplugRules = UnplugRules.TestCase
TestUnplugRules.settings = settings(
    max_examples=400,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
