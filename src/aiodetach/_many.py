"""Detaching many devices at once: bounded, fair per domain, failure-isolated.

A host evacuation or a tenant teardown asks for hundreds of detaches.  They
run with a global concurrency bound (worker threads and libvirtd's RPC
workers are finite) and a per-domain bound: libvirt's QEMU driver runs every
detach of a domain inside that domain's *job*, one at a time, so flooding one
domain only queues the requests inside libvirtd (and, with ``detachDeviceFlags``,
for up to 5 s each) while other domains sit idle.  One failure never aborts
the rest: every request ends as a :class:`DetachOutcome` with its result or
its typed error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._result import DetachResult
from .errors import DetachError, InvalidRequest

__all__ = ["DetachOutcome", "DetachRequest", "collect", "iter_outcomes"]


class DetachRequest(BaseModel):
    """One device to detach, as :meth:`DetachService.detach` takes it.

    ``uri`` is only used by :class:`DetachFleet`, which routes on it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

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


def as_request(item: DetachRequest | Mapping[str, Any]) -> DetachRequest:
    if isinstance(item, DetachRequest):
        return item
    try:
        return DetachRequest.model_validate(item)
    except ValueError as exc:
        raise InvalidRequest(f"invalid detach request {dict(item)!r}: {exc}") from None


async def iter_outcomes(
    requests: Iterable[DetachRequest | Mapping[str, Any]],
    run: Callable[[DetachRequest], Awaitable[DetachResult]],
    *,
    concurrency: int,
    per_domain: int | None,
) -> AsyncGenerator[DetachOutcome, None]:
    """Run ``run`` over ``requests``; yield outcomes as they complete.

    All requests are validated before the first one starts, so a typo in a
    batch file fails the batch up front instead of half way.  Closing the
    iterator early cancels what is still running.
    """
    batch = [as_request(item) for item in requests]
    if concurrency < 1:
        raise InvalidRequest("concurrency must be at least 1")
    if per_domain is not None and per_domain < 1:
        raise InvalidRequest("per_domain must be at least 1 (or None for no limit)")
    if not batch:
        return
    overall = asyncio.Semaphore(concurrency)
    domains: dict[tuple[str | None, str], asyncio.Semaphore] = {}
    done: asyncio.Queue[DetachOutcome | Exception] = asyncio.Queue()

    async def one(index: int, request: DetachRequest) -> None:
        try:
            done.put_nowait(await guarded(index, request))
        except Exception as exc:  # a bug, not a detach failure: stop the batch
            done.put_nowait(exc)

    async def guarded(index: int, request: DetachRequest) -> DetachOutcome:
        gate = None
        if per_domain is not None:
            key = (request.uri, request.domain)
            gate = domains.setdefault(key, asyncio.Semaphore(per_domain))
        async with overall:
            if gate is not None:
                await gate.acquire()
            try:
                result = await run(request)
                outcome = DetachOutcome(index=index, request=request, result=result)
            except DetachError as exc:
                outcome = DetachOutcome(index=index, request=request, error=exc)
            finally:
                if gate is not None:
                    gate.release()
        return outcome

    # Start the per-domain waiters in round-robin order of domains, so a
    # domain with many devices does not hold every global slot in turn.
    order = _interleave_by_domain(batch)
    tasks = [asyncio.create_task(one(i, batch[i])) for i in order]
    try:
        for _ in range(len(tasks)):
            item = await done.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


async def collect(
    outcomes: AsyncGenerator[DetachOutcome, None],
    total: int,
    on_progress: Callable[[DetachOutcome, int, int], None] | None,
) -> list[DetachOutcome]:
    """Gather a batch's outcomes in request order, reporting progress."""
    done: list[DetachOutcome] = []
    async for outcome in outcomes:
        done.append(outcome)
        if on_progress is not None:
            on_progress(outcome, len(done), total)
    return sorted(done, key=lambda o: o.index)
