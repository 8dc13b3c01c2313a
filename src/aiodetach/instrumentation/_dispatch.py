"""Handing records to hooks: each hook isolated from the detach and from the others.

A hook runs on the event loop thread, inside the step that produced the
record.  Whatever it raises is caught here, so a broken dashboard exporter
can never change what a detach does; it is logged once per hook and step
(the same fault would otherwise repeat for every device of a mass detach).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable

from .._log import get_log
from ._records import DetachRecord, Hook, Record, outcome_of

__all__ = ["Hooks", "next_detach_id", "next_unplug_id"]

_log = get_log()

# Per process, not per service: a hook shared by a fleet's services needs ids
# that do not collide.
next_detach_id = itertools.count(1).__next__
next_unplug_id = itertools.count(1).__next__


class Hooks:
    """The hooks of one service, called in order."""

    __slots__ = ("_failed", "_hooks")

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self._hooks = tuple(hooks)
        for hook in self._hooks:
            if not callable(hook):
                raise TypeError(f"a hook must be callable, not {type(hook).__name__}")
        self._failed: set[tuple[int, str, str]] = set()

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def emit(self, record: Record) -> None:
        for index, hook in enumerate(self._hooks):
            try:
                hook(record)
            except (Exception, asyncio.CancelledError):
                # CancelledError too: a hook that awaited nothing cannot have
                # been cancelled, so it is the hook's own bug (a .result() on a
                # cancelled future), not a cancellation of the detach.  Only
                # KeyboardInterrupt and SystemExit go through, as asyncio lets them.
                self._report(index, hook, record)

    def _report(self, index: int, hook: Hook, record: Record) -> None:
        key = (index, type(record).__name__, record.kind)
        if key in self._failed:
            return
        self._failed.add(key)
        with contextlib.suppress(Exception):  # the broken hook may be the logging one
            _log.warning(
                "aiodetach.hook_failed",
                hook=getattr(hook, "__qualname__", None) or repr(hook),
                hook_index=index,
                record=type(record).__name__,
                kind=record.kind,
                exc_info=True,
            )


def emit_unrun(
    hooks: Hooks, *, uri: str, domain: str, alias: str | None, error: BaseException
) -> None:
    """``started`` and ``finished`` of a batch request that failed before its
    ``detach()`` could begin (its domain unknown, its host unreachable): it is
    a call all the same, and counters, spans and progress bars must see it."""
    if not hooks:
        return
    now = time.monotonic()
    common = {"detach_id": next_detach_id(), "uri": uri, "domain": domain, "alias": alias}
    hooks.emit(DetachRecord(kind="started", time=now, elapsed=0.0, **common))  # type: ignore[arg-type]
    hooks.emit(
        DetachRecord(
            kind="finished",
            time=now,
            elapsed=0.0,
            error=error,
            outcome=outcome_of(error),
            **common,  # type: ignore[arg-type]
        )
    )
