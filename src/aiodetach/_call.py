"""One detach call: lookup → reads → plan → persistent half → join → follow.

A call is two separate steps after its reads, each in its own module:

1. **persistent** (``AFFECT_CONFIG``, `aiodetach._persistent`): one
   synchronous call, never retried, shared by concurrent callers of the
   device.  "Device not found" there is ignored when a live detach follows;
   any other error is fatal and the live step does not start.
2. **live** (`aiodetach._unplug`): the caller joins the device's unplug
   (one per device, started if none is in flight) and follows it.

Whatever ends a call, its error goes through one rule (`Calls.error()`):
it names the call's domain, alias and persistent outcome, and what a close
does to a call in flight is [`ServiceClosed`][aiodetach.errors.ServiceClosed], never an outcome
(`aiodetach._closing`).

Memory is the constraint here: ten thousand callers may wait at once, each
holding the frames of its current step.  So the steps up to the join are one
frame awaiting plain futures, the planner's look-ups run in a short frame of
their own, and the live half is followed in the caller's outermost frame
([`aiodetach.DetachService.detach()`][aiodetach.DetachService.detach]), the frames before it gone.
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from ._closing import by_close
from ._connection import Connection
from ._errors_map import map_error
from ._persistent import PersistentStep
from ._registry import Unplugs
from ._result import DetachResult
from ._rules import (
    DomainRef,
    Plan,
    ambiguous,
    check_flags,
    domain_ref,
    find_devices,
    halves,
    plan_devices,
)
from ._slots import slot_below
from ._takeup import fingerprint
from ._unplug import LiveDone, Unplug
from ._xml import Definition, Selector, describe, selector_from
from .backend import BackendError, DomainInfo
from .errors import (
    AmbiguousDevice,
    DetachError,
    DetachRefused,
    InvalidRequest,
    ReadOnlyConnection,
    ServiceClosed,
)
from .instrumentation._dispatch import Hooks
from .instrumentation._records import DetachRecord, DetachStep

__all__ = ["Calls", "Progress", "shown"]

_E = TypeVar("_E", bound=DetachError)


class Calls:
    """What the detach calls of one service need of it, and the steps of one call.

    Built with the service; `bind()` hands it the connection, the
    registry and the config step at ``open()``, and ``closing`` turns True
    when ``aclose()`` begins (the only place that says the service closes).
    """

    def __init__(self, uri: str, hooks: Hooks, *, read_only: bool) -> None:
        self.uri = uri
        self.hooks = hooks
        self.read_only = read_only
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: Connection | None = None
        self.unplugs: Unplugs | None = None
        self.persistent: PersistentStep | None = None
        self.journalled = False  # what the journal knows a device by is computed only then

    def bind(
        self,
        conn: Connection,
        unplugs: Unplugs,
        persistent: PersistentStep,
        *,
        journalled: bool,
    ) -> None:
        self.conn, self.unplugs, self.persistent = conn, unplugs, persistent
        self.journalled = journalled

    def usable(self) -> Connection:
        """The connection, if the service is open, not closing, and used from its loop."""
        conn = self.conn
        if conn is None or self.closing or conn.state != "open":
            state = "closed" if self.closing else "not open"
            raise ServiceClosed(f"service is {state}")
        if asyncio.get_running_loop() is not self.loop:
            raise InvalidRequest(
                "the service is used from another event loop than it was opened on"
            )
        return conn

    # ------------------------------------------------------------ the rule
    def error(self, call: Progress, exc: BaseException) -> BaseException:
        """What a call raises when ``exc`` ended it, at whatever step: the
        close's doing → `ServiceClosed`; a `DetachError` → a copy
        naming the call (see `Progress.complete()`); anything else (the
        caller's own cancellation included) → itself.  Raise the result."""
        err: BaseException
        cause: BaseException | None
        if by_close(exc, closing=self.closing):
            err = closed_under(call)
            # What a close does is not an outcome; a cancellation has no cause to show.
            cause = None if isinstance(exc, asyncio.CancelledError) else exc
        elif isinstance(exc, DetachError):
            err, cause = call.complete(exc), exc.__cause__
        else:
            return exc
        err.__cause__ = cause  # as ``raise err from cause``
        err.__suppress_context__ = True
        return err

    def record(self, call: Progress, kind: DetachStep, **fields: Any) -> None:
        if self.hooks:
            now = time.monotonic()
            self.hooks.emit(
                DetachRecord(
                    kind=kind,
                    detach_id=call.detach_id,
                    uri=self.uri,
                    domain=call.domain,
                    alias=call.alias,
                    time=now,
                    elapsed=now - call.started,
                    **fields,
                )
            )

    # ----------------------------------------------------------- the steps
    async def up_to_join(
        self,
        progress: Progress,
        domain: DomainRef,
        alias: str | None,
        target: str | None,
        mac: str | None,
        xml: str | None,
        *,
        live: bool | None,
        persistent: bool | None,
    ) -> DetachResult | None:
        """Validate, then `_up_to_join()`.  Returns the result, or None when
        the live half is under way (``progress`` then says what the caller
        follows, see [`aiodetach.DetachService.detach()`][aiodetach.DetachService.detach])."""
        ref = domain_ref(domain)
        try:
            selector = selector_from(alias=alias, target=target, mac=mac, xml=xml)
        except InvalidRequest as exc:
            exc.domain = ref
            raise
        check_flags(ref, live, persistent)
        try:
            conn = self.usable()
        except ServiceClosed as exc:
            exc.domain = ref
            exc.alias = selector.value if selector.kind == "alias" else None
            raise
        if self.read_only:
            raise ReadOnlyConnection(
                f"the connection to {self.uri} is read-only; detaching needs read-write",
                domain=ref,
                alias=selector.value if selector.kind == "alias" else None,
            )
        progress.domain = ref
        progress.alias = selector.value if selector.kind == "alias" else None
        try:
            return await self._up_to_join(conn, progress, selector, live, persistent)
        except BaseException as exc:
            raise self.error(progress, exc)  # noqa: B904 - it sets its own cause

    async def _up_to_join(
        self,
        conn: Connection,
        progress: Progress,
        selector: Selector,
        live: bool | None,
        persistent: bool | None,
    ) -> DetachResult | None:
        """Look up, read, plan, do the persistent half and join the unplug.

        One frame, awaiting plain futures (shared reads hand each caller its
        own): while ten thousand callers wait on one read, each holds this
        frame and its caller's, nothing more.
        """
        assert self.persistent is not None
        assert self.unplugs is not None
        persistent_step = self.persistent
        unplugs = self.unplugs
        # Tickets: what another caller's unplug or config detach of this device
        # ends between our reads and our join is ours too (aiodetach._recent).
        ticket = persistent_step.ticket()
        unplug_ticket = unplugs.ticket()
        try:
            try:
                conn.revive()
                await conn.wait_up()
                try:
                    info = await conn.lookup(progress.domain)
                except BackendError as err:
                    raise map_error(
                        err, domain=progress.domain, alias=None, action="domain lookup"
                    ) from None
                progress.domain = info.name
                do_live, do_persistent = halves(info, live, persistent)
                # Only the devices' own XML is kept: a whole domain definition
                # per pending detach adds up when thousands wait.
                mark = unplugs.mark()
                try:
                    live_xml = await conn.definition(info.uuid, inactive=False) if do_live else None
                    pers_xml = (
                        await conn.definition(info.uuid, inactive=True) if do_persistent else None
                    )
                except BackendError as err:
                    raise map_error(
                        err, domain=info.name, alias=None, action="reading the XML"
                    ) from None
                plan = self._plan(
                    info, selector, live, persistent, live_xml, pers_xml, ticket, unplug_ticket
                )
                if plan.live is not None and live_xml is not None:
                    self._say_slot(progress, live_xml, plan.live.alias, unplugs.settings.timeout)
                del live_xml, pers_xml
                shown = plan.found.alias or progress.alias
                progress.alias = (plan.live.alias if plan.live else None) or shown
                if plan.persistent is not None:
                    step = await persistent_step.detach(
                        info, plan.persistent, ticket, live_follows=plan.live is not None
                    )
                    progress.persistent_done = step != "persistent_missing_ignored"
                    self.record(progress, step)
            finally:
                persistent_step.release(ticket)
            if plan.live is None:
                return _result(info, plan.found.description, progress, None)
            self._join(progress, info, plan, do_persistent, mark, unplug_ticket)
            return None  # the caller follows the unplug (DetachService.detach)
        finally:
            unplugs.release(unplug_ticket)

    def _plan(
        self,
        info: DomainInfo,
        selector: Selector,
        live: bool | None,
        persistent: bool | None,
        live_xml: Definition | None,
        pers_xml: Definition | None,
        ticket: int,
        unplug_ticket: int,
    ) -> Plan:
        """`plan_devices()`, with what ended since the caller began: looked
        up only where a read missed the device, and handed to the planner as
        values.  A function of its own: what it computes lives in this short
        frame, not in `_up_to_join()`'s, which ten thousand callers hold
        while they wait."""
        assert self.persistent is not None
        assert self.unplugs is not None
        found = find_devices(info, selector, live_xml, pers_xml)
        if found.live_missed:
            # Another caller's unplug of this device may have ended just before our read.
            ended = self.unplugs.removed_since(info.uuid, unplug_ticket, selector, found.persistent)
            try:
                found = found.unplugged(ended, pers_xml, live_xml)
            except AmbiguousDevice as exc:
                raise ambiguous(info, selector, "persistent", exc.message) from None
        if found.persistent_missed:
            # Another caller's config detach of this device may have landed before our read.
            removed = self.persistent.removed_since(info.uuid, ticket, selector, found.live)
            found = found.config_removed(removed)
        return plan_devices(info, selector, live, persistent, found)

    def _say_slot(self, call: Progress, live: Definition, alias: str | None, limit: float) -> None:
        """A ``timeout`` below what the device's slot can release in is said at
        the call: every window would run out on an unplug under way."""
        slot = slot_below(live, alias, limit)
        if slot is not None:
            fields = {"slot": slot.kind, "minimum": slot.minimum, "timeout": limit}
            self.record(call, "timeout_below_slot_minimum", **fields)

    def _join(
        self,
        progress: Progress,
        info: DomainInfo,
        plan: Plan,
        do_persistent: bool,
        mark: int,
        unplug_ticket: int,
    ) -> None:
        """Join the device's unplug (started if none is in flight): ``progress``
        says which, for the caller to follow."""
        assert self.unplugs is not None
        live_dev = plan.live
        assert live_dev is not None
        if live_dev.alias is None:
            raise DetachRefused(
                "the device has no alias in the live XML, so libvirt cannot unplug it by "
                "alias (libvirt assigns one to every device of a running domain)",
                domain=info.name,
            )
        self.usable()
        unplug, joined = self.unplugs.join(
            info.uuid,
            info.name,
            live_dev.alias,
            ref=live_dev,
            since=unplug_ticket if plan.gone else mark,
            gone=plan.gone,
            run_id=info.run_id,
            # What the journal knows the device by; nothing else needs it.
            device=fingerprint(live_dev) if self.journalled else None,
        )
        resumed = unplug.resumed
        progress.alias = unplug.key[1]  # the same name, the registry's (interned) string
        self.record(
            progress,
            "unplug_joined" if joined else "unplug_started",
            unplug_id=unplug.id,
            resumed=resumed,
        )
        # The persistent half is the device's, like its unplug: a caller who
        # joins after another caller removed the device from the persistent
        # definition (so did not find it there) shares that outcome.
        if progress.persistent_done:
            unplug.persistent_done = True
        elif do_persistent and plan.persistent is None and unplug.persistent_done:
            progress.persistent_done = True
        # No string of its own while it waits when the unplug's identity and
        # alias say the same (the usual case): one per pending detach.
        description: str | None = plan.found.description
        if description == _described(unplug):
            description = None
        progress.unplug, progress.info, progress.description = unplug, info, description
        progress.joined, progress.resumed = joined, resumed

    async def uuid_of(self, ref: str, alias: str | None) -> str:
        """The UUID of ``ref`` for a batch's per-domain bound (errors named as
        a detach call names them)."""
        progress = Progress(ref, alias)
        try:
            conn = self.usable()
            conn.revive()
            await conn.wait_up()
            try:
                return (await conn.lookup(ref)).uuid
            except BackendError as err:
                raise map_error(err, domain=ref, alias=None, action="domain lookup") from None
        except Exception as exc:  # a cancellation stays one here
            raise self.error(progress, exc)  # noqa: B904 - it sets its own cause


def closed_under(progress: Progress) -> ServiceClosed:
    return progress.complete(ServiceClosed("the service was closed while the detach was in flight"))


def _result(
    info: DomainInfo, description: str, call: Progress, done: LiveDone | None
) -> DetachResult:
    return DetachResult(
        domain_uuid=info.uuid,
        domain_name=info.name,
        alias=call.alias,
        device=description,
        live=done is not None,
        persistent=call.persistent_done,
        attempts=done.sent if done else 0,
        elapsed=time.monotonic() - call.started,
        confirmed_by=done.confirmed_by if done else None,
        joined=call.joined,
        resumed=call.resumed,
    )


def _described(unplug: Unplug) -> str | None:
    """The device as its unplug's identity and alias describe it (None: no identity)."""
    tag = unplug.tag
    if tag is None:
        return None
    return describe(tag, unplug.key[1], unplug.identity)


def shown(domain: object) -> str:
    """The domain as records name it before it is looked up (even an invalid one)."""
    try:
        return domain_ref(domain)
    except InvalidRequest:
        return repr(domain)


@dataclass(slots=True)
class Progress:
    """What one detach call has learnt and done so far, for its errors."""

    domain: str  # as the caller named it, then the domain's name
    alias: str | None  # as the caller named it, then the live alias
    detach_id: int = 0  # names the call in the hooks' records
    started: float = 0.0  # time.monotonic() when the call began
    persistent_done: bool = False
    # Once the live half is under way, what its result needs when the unplug
    # ends (here rather than in an object of its own: one per waiting caller).
    unplug: Unplug | None = None
    info: DomainInfo | None = None
    description: str | None = None  # None: as _described(unplug) says
    joined: bool = False
    resumed: bool = False

    def result(self, done: LiveDone) -> DetachResult:
        """The call's result once its unplug removed the device."""
        assert self.unplug is not None
        assert self.info is not None
        description = self.description
        if description is None:
            description = _described(self.unplug) or ""  # never None: see Calls._join
        return _result(self.info, description, self, done)

    def complete(self, err: _E) -> _E:
        """``err`` naming this call's domain, alias and persistent outcome.

        Always a copy: callers joined to one unplug (or one config detach)
        share the exception object, and each must own what it raises (its
        traceback, its notes, its cause, its persistent half).  Errors are
        rare; a copy each is cheap.
        """
        done = copy.copy(err)
        done.domain = err.domain or self.domain
        done.alias = err.alias or self.alias
        done.persistent_done = err.persistent_done or self.persistent_done
        return done.with_traceback(err.__traceback__)
