"""The live unplug of one device, as a pure state machine.

This module *is* the live half of the protocol (docs/protocol.md, rules 2, 3,
5 and 7); read it top to bottom.  It decides and never acts: no asyncio, no
threads, no clock, no logging (a test enforces it).  Every input is handed to
`UnplugMachine.handle()` with the time it happened, and the answer is the
list of actions the driver (`aiodetach._unplug`) must perform, whose
results come back as further inputs.  So each rule is a row of a table:
*in this phase, this input, these actions and that next phase*
(``tests/unit/test_unplug_machine.py``).

Phases and what moves them::

    QUEUED ──Send──▶ SENDING ──accepted, "in progress", maybe sent──▶ WAITING
                       │ "guest is busy", nothing of ours accepted yet
                       ▼
                  BACKING_OFF ──timer──▶ QUEUED          (no attempt used)
                       │ failed before reaching libvirtd (not sent)
                       ▼
                  RECONNECTING ──back: state + live XML──▶ QUEUED (sent again)

    WAITING ──window over──▶ RECHECKING ──paused──▶ PAUSED ──runs again──▶ WAITING
       │                         │ still attached: an attempt used
       │                         └──────────▶ QUEUED (re-send) or DetachTimeout
       └──connection lost──▶ RECONNECTING ──back, still attached──▶ WAITING

    an early verdict ──▶ CONFIRMING ──device still there──▶ the phase it left
    "no such alias" ──▶ VERIFYING ──device gone──▶ removed (by XML)
    "not running" ──▶ STOPPING ──shutoff reason, or the STOPPED event──▶ DomainStopped
    another job held the domain (code 68) ──▶ QUEUED (sent again, no attempt used)
    a guest reset ──▶ WAITING (a short settle) ──▶ RECHECKING ──still there──▶ QUEUED
                                                 (the request was void: no attempt used)

    a step due with no caller ──▶ IDLE ──a caller joins──▶ that step
                                   └──── ``timeout`` later, nobody came: ABANDONED

The rules, each where the code below applies it:

- **One request at a time, one window per request.**  A request's window
  (``timeout``) starts when libvirt answered it, so time a request spent
  queued for a worker thread is not taken from the guest.
- **A verdict is honoured wherever it lands.**  ``DEVICE_REMOVED`` (success,
  by event), ``DEVICE_REMOVAL_FAILED`` (never retried) and the domain stopping
  end the unplug in any phase; while a request is in its worker thread the
  verdict is kept and acted on as soon as libvirt answered, before anything
  else is sent.
- **An event from before our request is checked.**  A verdict about the
  device that arrives while no request of ours has reached libvirt is
  *early* (the late event of an earlier unplug of a device since re-attached
  under the same alias): a ``DEVICE_REMOVED`` counts only once the live XML
  agrees (CONFIRMING), a ``DEVICE_REMOVAL_FAILED`` is ignored.  A verdict that
  counts at once replaces an early one still to be checked.
- **Look before sending again.**  When a window ends with no verdict, the
  domain's state is read (paused: no attempt is used, PAUSED), then its live
  XML: the device gone is success (the event was lost); still there uses an
  attempt, and the request is sent again until ``attempts`` are used, then
  ``DetachTimeout``.
- **A paused guest cannot answer.**  No clock runs in PAUSED; it looks again
  on libvirt's ``RESUMED`` and every ``timeout`` in case that event is lost,
  and once the domain runs the guest gets a full window again.
- **"guest is busy" before anything of ours was accepted is not "in
  progress"**: the request was not taken.  Back off (1 s growing by half, at
  most 5 s, a quarter of ``timeout`` if less) and send again using no
  attempt; each ``timeout`` of uninterrupted refusals costs one attempt.
- **Another job holding the domain is not a refusal.**  A request libvirt
  gave up on after its job wait (a migration held the domain) did nothing:
  it is sent again, using no attempt, for as long as a caller waits.
- **"Not running" learns why.**  libvirt fails a call at the moment it emits
  STOPPED, and the answer may come first: the domain's shutoff reason (a
  state read), else its STOPPED event (STOPPING), says why it stopped.
- **A guest reset voids a pending native-PCIe unplug.**  On ``REBOOT`` while
  a request of ours is accepted and its window runs, wait a moment for the
  ``DEVICE_REMOVED`` an ACPI reset brings, then look: gone is success; still
  there, the request was void (the guest could not act on it, like one sent
  to a paused guest): it uses no attempt and is sent again.  QEMU refuses a
  new request for ~5 s after the one it took, reset or not: those refusals
  are not taken (spaced as a back-off, the last no later than QEMU's hold,
  never counted) until QEMU takes it; then its window runs as usual, so
  nothing is sent into the unplug that follows.  A ``REBOOT`` while the
  request is in its thread is not acted on (it may have reached QEMU after
  the reset); one during a re-check, or while the guest is paused (looked
  at a moment after it resumes), voids the request all the same.

- **A request that never reached libvirtd is not an attempt.**  A call that
  failed inside the client before anything was written (the connection's
  socket already closed) is not counted: the connection is re-made and the
  request goes out once it is back.  A call that failed after it may have
  reached libvirtd (*maybe sent*) is waited out as a sent one: re-sending at
  once could interrupt the unplug it started.
- **Events of a lost connection are lost for good.**  Once the connection is
  back (RECONNECTING), the domain state and live XML are read: the device
  gone is success; still there, the current window goes on, with no new
  request.
- **The unplug belongs to the device, not to its callers** (rule 3).  When a
  step falls due with nobody waiting (a re-check or a re-send after the last
  caller left), the unplug is kept one more ``timeout`` (IDLE) with its
  attempts used, so a caller who asks again carries on instead of starting
  over; nobody back by then, it is dropped (ABANDONED) with nothing sent.
  Nothing is ever sent for nobody: a request whose callers all left before it
  reached libvirt is not sent, and the last caller leaving a back-off ends the
  unplug at once (nothing of ours is pending in the guest).
"""

from __future__ import annotations

from typing import Literal, Protocol

from ._machine_io import (
    BUSY_BACKOFF_MAX,
    JOB_RETRY_GAP,
    RESET_HOLD,
    RESET_HOLD_LIMIT,
    RESET_SETTLE,
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

__all__ = ["Limits", "UnplugMachine"]

_SEND = Send()
_READ_STATE = ReadState()
_READ_XML = ReadXml()
_WAIT_RECONNECT = WaitReconnect()
_READ_AGAIN = 2
"""``reading``: a state read is out and RESUMED came meanwhile (its answer may
predate it: a "paused" answer is asked again at once)."""
_EVENT_BY: dict[Verdict, Literal["event", "xml"]] = {
    Verdict.REMOVED: "event",
    Verdict.GONE: "xml",
}


class Limits(Protocol):
    """What the machine needs of the settings (``DetachSettings`` has both)."""

    @property
    def timeout(self) -> float: ...

    @property
    def attempts(self) -> int: ...


class UnplugMachine:
    """One device's live unplug: its phase and counters, and its rules.

    The driver subclasses it (one object per unplug: thousands may wait at
    once, and each would otherwise hold a second object).
    """

    __slots__ = (
        "accepted",
        "after",
        "busy_refusals",
        "busy_since",
        "callers",
        "deadline",
        "early",
        "failure",
        "handed",
        "held_from",
        "limits",
        "not_taken",
        "phase",
        "reading",
        "rebooted",
        "resume",
        "sent",
        "sent_at",
        "taken_at",
        "token",
        "used",
        "verdict",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.phase = Phase.QUEUED
        self.after = Phase.QUEUED  # where CONFIRMING and RECONNECTING go back to
        self.resume: Phase | None = None  # what IDLE goes on with (None: DetachTimeout is due)
        self.verdict: Verdict | None = None  # kept while SENDING, or an early one being checked
        self.early = False
        self.failure: object = None  # VERIFYING: the refusal to end with if the device is there
        # (STOPPING: the reason to end with if nothing tells why the domain stopped)
        self.reading = 0  # a state or XML read is out (_READ_AGAIN: and RESUMED came)
        self.handed = False  # a request of ours reached libvirt (and was not refused as busy)
        self.accepted = False  # libvirt accepted one: an unplug of ours may be pending
        self.sent = 0  # requests that counted (busy refusals and unsent ones do not)
        self.sent_at = 0.0  # when the latest request was handed to its worker thread
        self.used = 0  # attempts used up
        self.not_taken = 0  # requests answered as not taken (the journal un-notes them)
        self.busy_refusals = 0
        self.rebooted = False  # the guest was reset while our request was pending
        self.taken_at = 0.0  # when libvirt accepted our latest request
        self.held_from: float | None = None  # a reset voided the request taken then
        self.busy_since: float | None = None
        self.callers = 0
        self.deadline = 0.0  # when the window, the back-off or the linger ends
        self.token = 0  # of the current wait: a Timer with another is stale

    # ------------------------------------------------------------- queries
    @property
    def decided(self) -> bool:
        """A verdict that counts at once is kept (a request must not go out)."""
        return self.verdict is not None and not self.early

    @property
    def wants_request(self) -> bool:
        """Asked in the worker thread just before the request is handed to
        libvirt: not for nobody, nor for an unplug an event decided meanwhile,
        nor after the end (the domain stopped, or the service closed, while
        it waited for a thread)."""
        return self.callers > 0 and not self.decided and self.phase is not Phase.DONE

    @property
    def over(self) -> bool:
        return self.phase is Phase.DONE

    # --------------------------------------------------------------- entry
    def begin(self, now: float) -> list[Action]:
        """Send the first request (the first caller has joined)."""
        out: list[Action] = []
        if self.phase is Phase.QUEUED:
            self._queue(out, now)
        return out

    def taken_up(self, sent: int, used: int, left: float, now: float) -> list[Action]:
        """An unplug found unfinished in the journal after a restart.

        Its last request is *maybe sent*: the events for the alias are its
        own, and what is left of its window (``left`` seconds) is waited out;
        with the window over it lingers (IDLE) for a caller, who then gets the
        re-check with the attempts it used counted.
        """
        self.sent, self.used = sent, used
        self.accepted = self.handed = True
        out: list[Action] = []
        if left > 0:
            self.deadline = now + left
            self._enter(out, Phase.WAITING, now)
        else:
            self._idle(out, Phase.RECHECKING, now)
        return out

    # ------------------------------------------------------------ handling
    def handle(self, event: Input, now: float) -> list[Action]:
        """Apply one input at ``now``; the actions to perform, in order."""
        out: list[Action] = []
        if self.phase is Phase.DONE:
            return out
        if isinstance(event, Event):
            self._event(out, event, now)
        elif isinstance(event, Answered):
            self._answered(out, event, now)
        elif isinstance(event, StateRead):
            self._state_read(out, event, now)
        elif isinstance(event, XmlRead):
            self._xml_read(out, event, now)
        elif isinstance(event, Timer):
            self._timer(out, event, now)
        elif isinstance(event, Joined):
            self._joined(out, now)
        elif isinstance(event, Left):
            self._left(out)
        elif isinstance(event, Stopped):
            # Every waiter wakes at once, also while a call is out (a call
            # into a domain whose job another client holds may block for
            # long); a verdict kept meanwhile came first and stands.
            if self.decided:
                assert self.verdict is not None
                self._conclude(out, self.verdict)
            else:
                self._end(out, End(Ending.STOPPED, reason=event.reason))
        elif isinstance(event, Resumed | ConnectionDown):
            self._woken(out, event, now)
        elif isinstance(event, Rebooted):
            self._reset(out, now)
        elif isinstance(event, Reconnected):
            if self.phase is Phase.RECONNECTING and not self.reading:
                self._look(out)
        elif isinstance(event, ReconnectFailed):
            if self.phase is Phase.RECONNECTING:
                self._end(out, End(Ending.ERROR, error=event.error))
        elif isinstance(event, ReadFailed):
            if self.reading:
                self.reading = False
                if self._kept(out):
                    pass
                elif self.phase is Phase.STOPPING:
                    self._end(out, End(Ending.STOPPED, reason=str(self.failure)))
                else:
                    self._end(out, End(Ending.ERROR, error=event.error))
        elif isinstance(event, Abort):
            self._end(out, End(Ending.CANCELLED))
        return out

    # -------------------------------------------------------------- verdicts
    @property
    def _keeping(self) -> bool:
        """A call is out (the request in its thread, a read): a verdict is
        kept and acted on as soon as it answered, before anything else."""
        return self.phase is Phase.SENDING or self.reading != 0

    def _event(self, out: list[Action], event: Event, now: float) -> None:
        verdict = event.verdict
        early = verdict is not Verdict.GONE and not (self.handed or event.in_libvirt)
        if self.verdict is None or (self.early and not early):
            self.verdict, self.early = verdict, early
        if self._keeping:
            return
        if self.phase in (Phase.CONFIRMING, Phase.RECONNECTING) and self.early:
            return  # checked once the look under way is over
        self._settle(out, now)

    def _kept(self, out: list[Action]) -> bool:
        """The call out answered: end on what was kept meanwhile, if it counts."""
        if self.decided:
            assert self.verdict is not None
            self._conclude(out, self.verdict)
            return True
        return False

    def _settle(self, out: list[Action], now: float) -> bool:
        """Act on a kept verdict: end on one that counts, check an early one.
        False if there is none."""
        verdict = self.verdict
        if verdict is None:
            return False
        if not self.early:
            self._conclude(out, verdict)
            return True
        if verdict is Verdict.FAILED:
            # A stale DEVICE_REMOVAL_FAILED: not about any request of ours.
            self.verdict, self.early = None, False
            out.append(Report("stale_event_ignored", "reason", verdict.value))
            return False
        # The verdict being checked is kept aside: an event during the look
        # is kept anew (one that counts ends the unplug at once).
        self.after = self.phase
        self.failure, self.verdict, self.early = verdict, None, False
        self.phase = Phase.CONFIRMING
        self._look(out)
        return True

    def _conclude(self, out: list[Action], verdict: Verdict) -> None:
        if verdict is Verdict.FAILED:
            self._end(out, End(Ending.FAILED))
        else:
            self._end(out, End(Ending.REMOVED, confirmed_by=_EVENT_BY[verdict]))

    # ------------------------------------------------------------- requests
    def _queue(self, out: list[Action], now: float) -> None:
        """The next request is due."""
        self.phase = Phase.QUEUED
        if self._settle(out, now):
            return
        if self.callers == 0:
            if not self.accepted:
                # Nothing of ours ever reached the guest: nothing to keep.
                self._end(out, End(Ending.ABANDONED))
            else:
                self._idle(out, Phase.QUEUED, now)  # a re-send is due, for nobody
            return
        self.phase = Phase.SENDING
        self.sent += 1
        self.sent_at = now
        out.append(_SEND)

    def _answered(self, out: list[Action], answer: Answered, now: float) -> None:
        if self.phase is not Phase.SENDING:
            return
        outcome = answer.outcome
        job_held = outcome is Outcome.JOB_HELD  # another job held the domain: not taken
        reset_held = (  # QEMU still holds the slot for a request a reset voided
            self.held_from is not None
            and outcome in (Outcome.BUSY, Outcome.IN_PROGRESS)
            and now - self.held_from < RESET_HOLD_LIMIT
        )
        busy = (outcome is Outcome.BUSY and not self.accepted) or reset_held
        unsent = outcome in (Outcome.SKIPPED, Outcome.NOT_SENT, Outcome.JOURNAL_FAILED)
        if unsent or busy or job_held:
            self.sent -= 1  # not taken: it does not count
            self.not_taken += 1
        if not unsent:
            out.append(Report("request_sent"))
            if not job_held:  # it never reached the guest: events are as before it
                self.handed = self.handed or not busy  # a voided request did reach it

        if outcome is Outcome.JOURNAL_FAILED:
            self._end(out, End(Ending.ERROR, error=answer.error))
            return
        self.phase = Phase.QUEUED  # nothing is out any more
        if self._kept(out):
            return
        if outcome is Outcome.SKIPPED:
            self._queue(out, now)
        elif outcome is Outcome.SENT:
            self.accepted = True
            self.busy_since = self.held_from = None
            self.taken_at, self.rebooted = now, False
            self._window(out, now, answer.reconnected)
        elif busy:
            self._back_off(out, now)
        elif outcome in (Outcome.IN_PROGRESS, Outcome.BUSY):
            # An unplug (ours, or someone else's) is pending: wait for it.
            out.append(Report("in_progress", "reason", answer.reason))
            self.accepted = True
            self.taken_at = now  # the pending one was taken by now: a reset voids it
            self._window(out, now, answer.reconnected)
        elif outcome is Outcome.MAYBE_SENT:
            # It may have reached QEMU: wait it out as sent (the wait rides
            # out the reconnect), never re-send at once.
            out.append(LoseConnection("call failed: " + answer.reason))
            self.accepted = True
            self.taken_at = now  # if it reached QEMU, QEMU's hold began about now
            self._window(out, now, reconnected=True)
        elif outcome is Outcome.NOT_SENT:
            # Failed inside the client: libvirtd never heard of it.  Send it
            # once the connection is back, using no attempt.
            out.append(Report("request_not_sent", "reason", answer.reason))
            out.append(LoseConnection("call failed: " + answer.reason))
            self.after = Phase.QUEUED
            self._reconnect(out)
        elif outcome is Outcome.ALIAS_MISSING:
            self.failure = answer.error
            self.phase = Phase.VERIFYING
            self._look(out)
        elif job_held:
            self._job_held(out, answer, now)
        elif outcome in (Outcome.NOT_RUNNING, Outcome.NO_DOMAIN):
            # libvirt fails the call at the moment it emits STOPPED, and the
            # answer may come first: learn why before telling the callers
            # (a migration is not a shutdown: the device is still attached
            # on the new host).  The STOPPED event ends it with its detail.
            self.failure = "undefined" if outcome is Outcome.NO_DOMAIN else "stopped"
            self.phase = Phase.STOPPING
            self._look(out)
        else:
            self._end(out, End(Ending.ERROR, error=answer.error))

    def _window(self, out: list[Action], now: float, reconnected: bool) -> None:
        """libvirt answered: the guest's window starts now."""
        self.deadline = now + self.limits.timeout
        if reconnected:
            self.after = Phase.WAITING
            self._reconnect(out)
            self._settle_early(out, now)
            return
        self._enter(out, Phase.WAITING, now)
        self._settle_early(out, now)

    def _settle_early(self, out: list[Action], now: float) -> None:
        """An early verdict kept while the request was out is checked now."""
        if self.verdict is not None and self.phase is Phase.WAITING:
            self._settle(out, now)

    def _job_held(self, out: list[Action], answer: Answered, now: float) -> None:
        """Another job (a migration, another client's long call) held the
        domain past libvirt's wait (30 s): the request was not taken.  Send it
        again using no attempt, for as long as a caller waits: libvirt's own
        wait for the job is the wait, and the request goes through the moment
        the job ends (or the job's STOPPED ends the unplug meanwhile)."""
        out.append(Report("job_held", "reason", answer.reason))
        if now - self.sent_at >= JOB_RETRY_GAP or self.callers == 0:
            self._queue(out, now)
            return
        self.deadline = now + JOB_RETRY_GAP  # refused at once: do not spin
        self._enter(out, Phase.BACKING_OFF, now)

    def _back_off(self, out: list[Action], now: float) -> None:
        """QEMU refused with "guest is busy" and nothing of ours is pending."""
        limits = self.limits
        held_from = self.held_from
        if self.busy_since is None:
            self.busy_since = now
        elif held_from is None and now - self.busy_since >= limits.timeout:
            # A slot busy for a whole attempt's time costs an attempt, so a
            # slot that never settles still ends in DetachTimeout.
            self.used += 1
            self.busy_since = now
            if self.used >= limits.attempts:
                self._end(out, End(Ending.TIMEOUT))
                return
        base = min(1.0, limits.timeout / 4)
        delay = min(base * 1.5**self.busy_refusals, BUSY_BACKOFF_MAX, limits.timeout)
        if held_from is not None and 0 < held_from + RESET_HOLD - now < delay:
            delay = held_from + RESET_HOLD - now  # QEMU takes it again from then on
        self.busy_refusals += 1
        out.append(Report("busy_backoff", "delay", delay))
        if self.callers == 0:
            self._end(out, End(Ending.ABANDONED))  # nothing of ours is pending: stop now
            return
        self.deadline = now + delay
        self._enter(out, Phase.BACKING_OFF, now)
        if self.verdict is not None:
            self._settle(out, now)

    # --------------------------------------------------------------- resets
    def _reset(self, out: list[Action], now: float) -> None:
        """The guest was reset.  Only a request libvirt accepted and whose
        window runs is concerned (one still in its thread may have reached
        QEMU after the reset: it is waited out as usual).  Wait a moment for
        the ``DEVICE_REMOVED`` an ACPI reset brings, then look (RECHECKING)."""
        phase = self.phase
        # Also while the window is suspended (nobody waits: IDLE; the
        # connection is down or a verdict is checked: RECONNECTING,
        # CONFIRMING): the look it goes back to then voids the request.
        back = self.resume if phase is Phase.IDLE else self.after
        suspended = phase in (Phase.IDLE, Phase.RECONNECTING, Phase.CONFIRMING) and (
            self.accepted and back in (Phase.WAITING, Phase.RECHECKING)
        )
        if phase not in (Phase.WAITING, Phase.RECHECKING, Phase.PAUSED) and not suspended:
            return
        if not self.rebooted:  # QEMU resets more than once per reboot (firmware)
            out.append(Report("guest_reset"))
        self.rebooted = True
        if phase is not Phase.WAITING:
            return  # the look under way decides; a paused guest is looked at once resumed
        self.deadline = min(self.deadline, now + self._settle_time)
        self.token += 1
        out.append(WaitUntil(self.deadline, self.token))

    @property
    def _settle_time(self) -> float:
        """How long to wait for the ``DEVICE_REMOVED`` an ACPI reset brings."""
        return min(RESET_SETTLE, self.limits.timeout / 4)

    def _voided(self, out: list[Action], now: float) -> None:
        """The device is still there after the reset: our request is void (the
        guest could not act on it, like one sent to a paused guest).  It uses
        no attempt; the request goes out again as soon as QEMU takes it, its
        refusals meanwhile spaced and not counted (see _answered)."""
        self.rebooted = False
        self.sent -= 1
        self.accepted = False  # nothing of ours is pending in the guest any more
        self.held_from = self.taken_at
        self.busy_since = None
        out.append(Report("request_voided"))
        self._queue(out, now)

    # ---------------------------------------------------------------- waits
    def _enter(self, out: list[Action], phase: Phase, now: float) -> None:
        """Go to a waiting phase and arm its wait."""
        self.phase = phase
        self.token += 1
        if phase is Phase.WAITING:
            out.append(WaitUntil(self.deadline, self.token, window=True))
        elif phase is Phase.PAUSED:
            out.append(WaitUntil(now + self.limits.timeout, self.token))
        elif phase in (Phase.BACKING_OFF, Phase.IDLE, Phase.STOPPING):
            out.append(WaitUntil(self.deadline, self.token))
        else:  # pragma: no cover - only the waiting phases are entered here
            raise AssertionError(phase)

    def _idle(self, out: list[Action], resume: Phase | None, now: float) -> None:
        self.resume = resume
        self.deadline = now + self.limits.timeout  # the linger's end
        self._enter(out, Phase.IDLE, now)

    def _timer(self, out: list[Action], timer: Timer, now: float) -> None:
        if timer.token != self.token:
            return  # a wait replaced since
        phase = self.phase
        if phase is Phase.WAITING:
            if self.callers == 0:
                self._idle(out, Phase.RECHECKING, now)  # the window is over, nobody waits
            else:
                self.phase = Phase.RECHECKING
                self._look(out)
        elif phase is Phase.PAUSED:
            if not self.reading:
                self.reading = True
                out.append(_READ_STATE)
        elif phase is Phase.BACKING_OFF:
            self._queue(out, now)
        elif phase is Phase.STOPPING:
            # No STOPPED event came, and the state did not say why.
            self._end(out, End(Ending.STOPPED, reason=str(self.failure)))
        elif phase is Phase.IDLE:
            if self.callers > 0:
                self._resume_idle(out, now)
            else:
                self._end(out, End(Ending.ABANDONED))  # nobody came back

    def _woken(self, out: list[Action], event: Resumed | ConnectionDown, now: float) -> None:
        phase = self.phase
        if phase is Phase.PAUSED and not self.reading:
            # RESUMED, or a lost connection (RESUMED may be lost with it): look.
            self.reading = True
            out.append(_READ_STATE)
        elif self.reading and phase in (Phase.PAUSED, Phase.RECHECKING):
            # The state read out may have been answered before it: if it
            # says paused, look again at once rather than in ``timeout``.
            self.reading = _READ_AGAIN
        elif phase is Phase.WAITING and isinstance(event, ConnectionDown):
            self.after = Phase.WAITING
            self._reconnect(out)

    def _reconnect(self, out: list[Action]) -> None:
        self.phase = Phase.RECONNECTING
        self.token += 1
        out.append(Report("waiting_for_reconnect"))
        out.append(_WAIT_RECONNECT)

    # -------------------------------------------------------------- callers
    def _joined(self, out: list[Action], now: float) -> None:
        self.callers += 1
        if self.phase is Phase.IDLE and self.callers == 1:
            # A caller is back: go on at the next step (after the caller
            # follows the unplug), not inside its join.
            self.token += 1
            out.append(WaitUntil(now, self.token))

    def _resume_idle(self, out: list[Action], now: float) -> None:
        resume = self.resume
        if resume is None:
            self._end(out, End(Ending.TIMEOUT))  # the attempts were used up
        elif resume is Phase.QUEUED:
            self._queue(out, now)
        else:
            self.phase = resume
            self._look(out)

    def _left(self, out: list[Action]) -> None:
        self.callers -= 1
        if self.callers == 0 and self.phase is Phase.BACKING_OFF and not self.accepted:
            self._end(out, End(Ending.ABANDONED))  # nothing of ours is pending: stop now
        elif self.callers == 0 and self.phase is Phase.IDLE:
            self.token += 1  # gone again before it went on: the linger's end holds
            out.append(WaitUntil(self.deadline, self.token))

    # ---------------------------------------------------------------- looks
    def _look(self, out: list[Action]) -> None:
        """Read the domain's state, then (mostly) its live XML."""
        self.token += 1  # nothing else is waited for meanwhile
        self.reading = True
        out.append(_READ_STATE)

    def _state_read(self, out: list[Action], read: StateRead, now: float) -> None:
        if not self.reading:
            return
        again = self.reading == _READ_AGAIN
        self.reading = False
        if self._kept(out):
            return
        if self.phase is Phase.STOPPING:
            self._stopping(out, read, now)
            return
        if read.state == "missing":  # a transient domain went away
            self._end(out, End(Ending.STOPPED, reason="undefined"))
            return
        if read.state == "inactive":
            self._end(out, End(Ending.STOPPED, reason=read.reason or "stopped"))
            return
        paused = read.state == "paused"
        phase = self.phase
        if paused and again and phase in (Phase.PAUSED, Phase.RECHECKING):
            if phase is Phase.RECHECKING:
                out.append(Report("paused"))
                self.phase = Phase.PAUSED
            self.reading = True  # RESUMED came while it was read: look again now
            out.append(_READ_STATE)
            return
        if phase is Phase.PAUSED:
            if paused:
                self._enter(out, Phase.PAUSED, now)  # look again in ``timeout``
            else:
                out.append(Report("resumed"))
                self.deadline = now + (self._settle_time if self.rebooted else self.limits.timeout)
                self._enter(out, Phase.WAITING, now)
            return
        if phase is Phase.RECHECKING:
            if paused:
                # A paused guest cannot answer: this attempt has not really
                # been tried.  No new request (ours is still queued in QEMU);
                # once the vCPUs run again the guest gets a full timeout.
                out.append(Report("paused"))
                self._enter(out, Phase.PAUSED, now)
                return
            if not self.rebooted:
                out.append(Report("attempt_timed_out", "timeout", self.limits.timeout))
        self.reading = True
        out.append(_READ_XML)

    def _stopping(self, out: list[Action], read: StateRead, now: float) -> None:
        """The request was refused as "not running": its state says why the
        domain stopped (libvirt's shutoff reason: ``migrated``, …), else its
        STOPPED event does, which may still be on its way."""
        if read.state == "inactive" and read.reason:
            self._end(out, End(Ending.STOPPED, reason=read.reason))
        elif read.state in ("running", "paused"):
            # Started again since: the run the request was for is over.
            self._end(out, End(Ending.STOPPED, reason=str(self.failure)))
        else:
            if read.state == "missing":
                self.failure = "undefined"
            self.deadline = now + STOP_EVENT_WAIT
            self._enter(out, Phase.STOPPING, now)

    def _xml_read(self, out: list[Action], read: XmlRead, now: float) -> None:
        if not self.reading:
            return
        self.reading = False
        if self._kept(out):
            return
        phase = self.phase
        if not read.present:
            self._conclude(out, Verdict.GONE)  # its event was lost, or it was early
            return
        if phase is Phase.RECHECKING and self.rebooted:
            self._voided(out, now)
        elif phase is Phase.RECHECKING:
            self.used += 1
            if self.used < self.limits.attempts:
                self._queue(out, now)
            elif self.callers == 0:
                self._idle(out, None, now)  # the next caller learns it at once
            else:
                self._end(out, End(Ending.TIMEOUT))
        elif phase is Phase.VERIFYING:
            self._end(out, End(Ending.ERROR, error=self.failure))
        else:  # CONFIRMING or RECONNECTING: the device is still there
            if phase is Phase.CONFIRMING:
                checked, self.failure = self.failure, None
                assert isinstance(checked, Verdict)
                out.append(Report("stale_event_ignored", "reason", checked.value))
            self._go_back(out, now)

    def _go_back(self, out: list[Action], now: float) -> None:
        """Carry on with what the look interrupted."""
        after = self.after
        if after is Phase.QUEUED:
            self._queue(out, now)
        elif after is Phase.WAITING and now >= self.deadline:
            self.phase = Phase.WAITING
            self.token += 1
            self._timer(out, Timer(self.token), now)  # the window ran out meanwhile
        else:
            self._enter(out, after, now)
        if self.verdict is not None and self.phase is after:
            self._settle(out, now)

    # ------------------------------------------------------------------ end
    def _end(self, out: list[Action], end: End) -> None:
        self.phase = Phase.DONE
        self.token += 1
        self.reading = False
        out.append(end)
