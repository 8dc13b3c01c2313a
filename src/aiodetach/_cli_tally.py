"""What a failed detach cost, for ``--json``: its requests and its time.

A `aiodetach.errors.DetachError` says what went wrong, not how many
live requests were sent before (only `DetachTimeout` knows) nor how
long it took; the hook records do.  `Tally` is a hook that keeps, per
error raised by a ``detach()`` call, the call's elapsed time and the
requests its unplug had sent, so the command can print them beside the
error, for one detach or for each device of a batch.
"""

from __future__ import annotations

from .instrumentation import DetachRecord, Record, UnplugRecord

__all__ = ["Tally"]


class Tally:
    """A hook: ``of(error)`` → ``(attempts, elapsed)`` of the call that raised it."""

    def __init__(self) -> None:
        self._unplug_of: dict[int, int] = {}  # detach_id -> unplug_id
        self._sent: dict[int, int] = {}  # unplug_id -> requests sent so far
        self._ended: dict[int, tuple[int, float]] = {}  # id(error) -> (attempts, elapsed)
        self._errors: list[BaseException] = []  # keeps the ids above unique

    def __call__(self, record: Record) -> None:
        if isinstance(record, UnplugRecord):
            self._sent[record.unplug_id] = record.sent
        elif isinstance(record, DetachRecord):
            if record.unplug_id is not None:
                self._unplug_of[record.detach_id] = record.unplug_id
            if record.kind == "finished":
                unplug = self._unplug_of.pop(record.detach_id, None)
                if record.error is not None:
                    sent = self._sent.get(unplug, 0) if unplug is not None else 0
                    self._ended[id(record.error)] = (sent, record.elapsed)
                    self._errors.append(record.error)

    def of(self, error: BaseException) -> tuple[int | None, float | None]:
        """The requests sent and the seconds taken by the call that raised
        ``error`` (None, None: not a call's error, e.g. the batch's own)."""
        return self._ended.get(id(error), (None, None))
