"""Detaching many devices at once: bounded, fair per domain, failure-isolated.

A host evacuation or a tenant teardown asks for hundreds of detaches.  They
run with a global concurrency bound (worker threads and libvirtd's RPC
workers are finite) and a per-domain bound: libvirt's QEMU driver runs every
detach of a domain inside that domain's *job*, one at a time, so flooding one
domain only queues the requests inside libvirtd (and, with ``detachDeviceFlags``,
for up to 5 s each) while other domains sit idle.  One failure never aborts
the rest: every request ends as a [`DetachOutcome`][aiodetach.DetachOutcome] with its result or
its typed error.

The order of the gates matters.  A request first learns which domain it is
for (its *identity*: the UUID, so a domain named once by name and once by
UUID has one bound, not two; for a fleet this is also where the host is
connected to), then waits for a slot of that domain, and only then for a
global slot.  A request that waits for its domain, or for its host to
answer, holds no global slot, so a slow domain or a dead host cannot starve
the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._result import DetachResult
from ._rules import check_flags, domain_ref
from ._xml import selector_from
from .errors import BatchAborted, DetachError, DomainNotFound, InvalidRequest
from .instrumentation._dispatch import Hooks, emit_unrun

__all__ = [
    "DetachOutcome",
    "DetachRequest",
    "batch_identities",
    "checked_batch",
    "collect",
    "iter_outcomes",
    "prepare_batch",
]


class DetachRequest(BaseModel):
    """One device to detach, as [`DetachService.detach()`][aiodetach.DetachService.detach] takes it.

    ``uri`` is only used by [`DetachFleet`][aiodetach.DetachFleet], which routes on it.
    """

    # strict: a batch item is checked as detach() checks its arguments, so
    # "live": "yes" or "persistent": 0 is refused rather than coerced.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    domain: str = Field(min_length=1)
    alias: str | None = None
    target: str | None = None
    mac: str | None = None
    xml: str | None = None
    live: bool | None = None
    persistent: bool | None = None
    uri: str | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> DetachRequest:
        given = [k for k in ("alias", "target", "mac", "xml") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("name the device with exactly one of alias, target, mac or xml")
        return self

    def detach_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"domain", "uri"})

    def describe(self) -> str:
        for key in ("alias", "target", "mac"):
            value = getattr(self, key)
            if value is not None:
                return f"{self.domain} {key}={value}"
        return f"{self.domain} (device XML)"


class DetachOutcome(BaseModel):
    """How one request of a batch ended: ``result`` or ``error``, never both."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    index: int
    request: DetachRequest
    result: DetachResult | None = None
    error: DetachError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def as_request(item: object) -> DetachRequest:
    """One batch item as a `DetachRequest`, checked as ``detach()`` would."""
    if isinstance(item, DetachRequest):
        request = item
    elif isinstance(item, Mapping):
        try:
            request = DetachRequest.model_validate(dict(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidRequest(f"invalid detach request {dict(item)!r}: {problems}") from None
    else:
        raise InvalidRequest(
            f"a batch item must be a DetachRequest or a mapping, not {type(item).__name__}"
        )
    # The same checks detach() makes, made now: a typo anywhere in a batch
    # must fail the batch before its first request is sent.
    ref = domain_ref(request.domain)
    try:
        selector_from(alias=request.alias, target=request.target, mac=request.mac, xml=request.xml)
    except InvalidRequest as exc:
        exc.domain = ref
        raise
    check_flags(ref, request.live, request.persistent)
    if request.uri is not None and not request.uri.strip():
        raise InvalidRequest("uri must not be empty", domain=ref)
    return request


def prepare_batch(requests: Iterable[object]) -> list[DetachRequest]:
    """Check a whole batch; raise `InvalidRequest` naming the first bad
    item's index (``err.index``) before anything is sent."""
    if isinstance(requests, str | bytes | Mapping) or not isinstance(requests, Iterable):
        raise InvalidRequest(
            f"requests must be an iterable of requests, not {type(requests).__name__}"
        )
    batch: list[DetachRequest] = []
    for index, item in enumerate(requests):
        try:
            batch.append(as_request(item))
        except InvalidRequest as exc:
            exc.message = f"batch request at index {index}: {exc.message}"
            exc.args = (exc.message,)
            exc.index = index
            raise
    return batch


def checked_batch(
    requests: Iterable[object], concurrency: object, per_domain: object
) -> list[DetachRequest]:
    """A whole batch and its bounds checked, before anything is sent."""
    batch = prepare_batch(requests)
    check_bounds(concurrency, per_domain)
    return batch


def check_bounds(concurrency: object, per_domain: object) -> None:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidRequest(f"concurrency must be an integer of at least 1, not {concurrency!r}")
    if per_domain is not None and (
        isinstance(per_domain, bool) or not isinstance(per_domain, int) or per_domain < 1
    ):
        raise InvalidRequest(
            f"per_domain must be an integer of at least 1 (or None for no limit), "
            f"not {per_domain!r}"
        )


Identify = Callable[[DetachRequest], Awaitable[Hashable]]
"""Which domain a request is for (its per-domain bound's key).  Awaited before
any slot is taken; a [`DetachError`][aiodetach.DetachError] it raises is the request's outcome."""


class _Batch:
    """One batch in flight: its tasks, and every outcome known so far."""

    def __init__(
        self,
        batch: list[DetachRequest],
        run: Callable[[DetachRequest], Awaitable[DetachResult]],
        identify: Identify,
        concurrency: int,
        per_domain: int | None,
    ) -> None:
        self.batch = batch
        self.outcomes: dict[int, DetachOutcome] = {}
        self._run = run
        self._identify = identify
        self._overall = asyncio.Semaphore(concurrency)
        self._per_domain = per_domain
        self._gates: dict[Hashable, asyncio.Semaphore] = {}
        self._done: asyncio.Queue[DetachOutcome | BaseException] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def stream(self) -> AsyncGenerator[DetachOutcome, None]:
        # Start in round-robin order of domains, so a domain with many devices
        # does not take every global slot in turn.
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._one(i)) for i in _interleave_by_domain(self.batch)]
        try:
            for _ in range(len(self._tasks)):
                item = await self._done.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Cancel what still runs and wait for it: nothing is left unowned."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, index: int) -> None:
        try:
            outcome = await self._guarded(index, self.batch[index])
        except Exception as exc:  # a bug, not a detach failure: stop the batch
            self._done.put_nowait(exc)
            return
        self.outcomes[index] = outcome
        self._done.put_nowait(outcome)

    async def _guarded(self, index: int, request: DetachRequest) -> DetachOutcome:
        try:
            key = await self._identify(request)
            gate = contextlib.nullcontext() if self._per_domain is None else self._gate(key)
            async with gate, self._overall:
                result = await self._run(request)
        except DetachError as exc:
            return DetachOutcome(index=index, request=request, error=exc)
        return DetachOutcome(index=index, request=request, result=result)

    def _gate(self, key: Hashable) -> asyncio.Semaphore:
        gate = self._gates.get(key)
        if gate is None:
            assert self._per_domain is not None
            gate = self._gates[key] = asyncio.Semaphore(self._per_domain)
        return gate


def iter_outcomes(
    batch: list[DetachRequest],
    run: Callable[[DetachRequest], Awaitable[DetachResult]],
    *,
    identify: Identify,
    concurrency: int,
    per_domain: int | None,
) -> AsyncGenerator[DetachOutcome, None]:
    """Run ``run`` over a checked ``batch``; yield outcomes as they complete.

    The batch's own iterator: closing it early cancels, and waits for, what
    is still running.
    """
    return _Batch(batch, run, identify, concurrency, per_domain).stream()


async def collect(
    batch: list[DetachRequest],
    run: Callable[[DetachRequest], Awaitable[DetachResult]],
    *,
    identify: Identify,
    concurrency: int,
    per_domain: int | None,
    on_progress: Callable[[DetachOutcome, int, int], None] | None,
) -> list[DetachOutcome]:
    """Run a checked batch to the end; its outcomes in request order.

    ``on_progress(outcome, done, total)`` is called as each one completes.  If
    it raises, the batch stops: what still runs is cancelled and awaited, and
    `BatchAborted` (caused by the callback's exception) carries every
    outcome known by then and the indexes of the requests left unfinished.
    """
    if not batch:
        return []
    run_ = _Batch(batch, run, identify, concurrency, per_domain)
    reported = 0
    failure: Exception | None = None
    async with contextlib.aclosing(run_.stream()) as stream:
        async for outcome in stream:
            reported += 1
            if on_progress is None:
                continue
            try:
                on_progress(outcome, reported, len(batch))
            except Exception as exc:  # the caller's bug: stop, but lose nothing
                failure = exc
                break
    # Leaving the block above cancelled and awaited every task still running.
    known = sorted(run_.outcomes.values(), key=lambda o: o.index)
    if failure is not None:
        unfinished = [i for i in range(len(batch)) if i not in run_.outcomes]
        raise BatchAborted(
            f"the batch was stopped because on_progress raised {type(failure).__name__}: "
            f"{failure}; {len(known)} of {len(batch)} requests had an outcome, "
            f"{len(unfinished)} were cancelled",
            outcomes=list(known),
            unfinished=unfinished,
        ) from failure
    return known


def _interleave_by_domain(batch: list[DetachRequest]) -> list[int]:
    queues: dict[tuple[str | None, str], list[int]] = {}
    for i, request in enumerate(batch):
        queues.setdefault((request.uri, request.domain), []).append(i)
    order: list[int] = []
    lanes = [list(reversed(q)) for q in queues.values()]
    while lanes:
        for lane in lanes:
            order.append(lane.pop())
        lanes = [lane for lane in lanes if lane]
    return order


def batch_identities(
    look_up: Callable[[str, str | None], Awaitable[str]] | None, hooks: Hooks, uri: str
) -> Identify:
    """A per-batch ``request -> domain UUID`` of one host (``look_up(ref,
    alias)`` its service's lookup); without a per-domain bound (``look_up``
    None) nothing needs looking up."""
    return _Identities(look_up, hooks, uri).of if look_up is not None else _no_identity


async def _no_identity(_request: DetachRequest) -> Hashable:
    return None


class _Identities:
    """Which domain each request of one batch is for: its UUID, looked up once
    per name the batch uses (the per-domain bound is per domain, not per
    spelling of it)."""

    def __init__(
        self, look_up: Callable[[str, str | None], Awaitable[str]], hooks: Hooks, uri: str
    ) -> None:
        self._look_up = look_up
        self._hooks = hooks
        self._uri = uri
        self._known: dict[str, str] = {}
        self._failed: dict[str, DetachError] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def of(self, request: DetachRequest) -> Hashable:
        try:
            return await self._of(request)
        except DetachError as exc:
            emit_unrun(
                self._hooks, uri=self._uri, domain=request.domain, alias=request.alias, error=exc
            )
            raise

    async def _of(self, request: DetachRequest) -> Hashable:
        ref = domain_ref(request.domain)
        known = self._known.get(ref)
        if known is not None:
            return known
        # One lookup per name; a caller cancelled while looking up hands the
        # lookup to the next one (no task is left behind).
        async with self._locks.setdefault(ref, asyncio.Lock()):
            known = self._known.get(ref)
            if known is None:
                failed = self._failed.get(ref)
                if failed is not None:  # one lookup per name, also when it fails
                    again = copy.copy(failed)
                    again.alias = request.alias
                    raise again
                try:
                    known = self._known[ref] = await self._look_up(ref, request.alias)
                except (DomainNotFound, InvalidRequest) as exc:
                    self._failed[ref] = copy.copy(exc)
                    raise
        return known
