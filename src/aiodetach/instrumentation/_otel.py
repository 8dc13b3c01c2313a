"""OpenTelemetry traces from the records (``pip install 'aiodetach[otel]'``).

One span ``aiodetach.detach`` per ``detach()`` call, one span event per step.
The span starts inside the call, in the caller's task, so it is a child of
whatever span the caller has current.

A device's live unplug is shared by every caller joined to it, so its steps
(``request_sent``, ``attempt_timed_out``, ``removed`` …) become events on the
span of *every caller joined at that moment*: a caller that joins late sees
the steps from then on, a caller that left (its deadline, a cancellation)
sees none after it left.  Connection steps (``lost``, ``reconnected``) go to
every open span on that URI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._records import ConnectionRecord, DetachRecord, Hook, Record, UnplugRecord

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["SPAN_NAME", "otel_hook"]

SPAN_NAME = "aiodetach.detach"


def otel_hook(tracer_provider: TracerProvider | None = None) -> Hook:
    """A hook that traces each detach as a span (default: the global tracer provider).

    Span attributes: ``aiodetach.domain``, ``aiodetach.alias``,
    ``aiodetach.uri``, ``aiodetach.attempts``, ``aiodetach.confirmed_by``,
    ``aiodetach.live``, ``aiodetach.persistent``, ``aiodetach.joined``,
    ``aiodetach.outcome``; on failure the exception is recorded and the status
    is ERROR (a cancelled call is not an error: ``outcome="cancelled"``).
    """
    try:
        from opentelemetry import trace
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "aiodetach.instrumentation.otel_hook needs opentelemetry-api: "
            "pip install 'aiodetach[otel]'"
        ) from exc
    from .._version import __version__

    tracer = trace.get_tracer("aiodetach", __version__, tracer_provider=tracer_provider)
    return _OtelHook(tracer)


class _OtelHook:
    """Spans of the calls in flight, and which calls each unplug serves."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._spans: dict[int, tuple[Span, str]] = {}  # detach_id -> (span, uri)
        self._joined: dict[int, set[int]] = {}  # unplug_id -> detach_ids waiting on it
        self._waits_on: dict[int, int] = {}  # detach_id -> unplug_id

    def __call__(self, record: Record) -> None:
        if isinstance(record, DetachRecord):
            self._detach(record)
        elif isinstance(record, UnplugRecord):
            self._unplug(record)
        else:
            self._connection(record)

    def _detach(self, r: DetachRecord) -> None:
        if r.kind == "started":
            span = self._tracer.start_span(
                SPAN_NAME,
                attributes=_attrs(
                    {
                        "aiodetach.domain": r.domain,
                        "aiodetach.alias": r.alias,
                        "aiodetach.uri": r.uri,
                    }
                ),
            )
            self._spans[r.detach_id] = (span, r.uri)
            return
        entry = self._spans.get(r.detach_id)
        if entry is None:  # the hook was added to a service mid-call
            return
        span = entry[0]
        if r.kind in ("unplug_started", "unplug_joined") and r.unplug_id is not None:
            self._joined.setdefault(r.unplug_id, set()).add(r.detach_id)
            self._waits_on[r.detach_id] = r.unplug_id
            span.add_event(
                "aiodetach." + r.kind,
                _attrs({"aiodetach.unplug_id": r.unplug_id, "aiodetach.elapsed": r.elapsed}),
            )
            return
        if r.kind != "finished":
            span.add_event("aiodetach." + r.kind, _attrs({"aiodetach.elapsed": r.elapsed}))
            return
        self._finish(r, span)

    def _finish(self, r: DetachRecord, span: Span) -> None:
        from opentelemetry.trace import Status, StatusCode

        del self._spans[r.detach_id]
        unplug_id = self._waits_on.pop(r.detach_id, None)
        if unplug_id is not None:
            callers = self._joined.get(unplug_id)
            if callers is not None:
                callers.discard(r.detach_id)
                if not callers:
                    # Nobody left to tell (a caller that shared an unplug already
                    # ended, say, comes after its "ended"): keep no empty entry.
                    del self._joined[unplug_id]
        attrs: dict[str, Any] = {
            "aiodetach.domain": r.domain,
            "aiodetach.alias": r.alias,
            "aiodetach.outcome": r.outcome,
        }
        result, error = r.result, r.error
        if result is not None:
            attrs |= {
                "aiodetach.domain_uuid": result.domain_uuid,
                "aiodetach.device": result.device,
                "aiodetach.attempts": result.attempts,
                "aiodetach.confirmed_by": result.confirmed_by,
                "aiodetach.live": result.live,
                "aiodetach.persistent": result.persistent,
                "aiodetach.joined": result.joined,
                # Only when true: taken up from the journal after a restart.
                "aiodetach.resumed": result.resumed or None,
            }
        span.set_attributes(_attrs(attrs))
        if error is not None and r.outcome != "cancelled":
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            attempts = getattr(error, "attempts", None)
            if isinstance(attempts, int):
                span.set_attribute("aiodetach.attempts", attempts)
            persistent_done = getattr(error, "persistent_done", None)
            if isinstance(persistent_done, bool):
                span.set_attribute("aiodetach.persistent", persistent_done)
        span.add_event("aiodetach.finished", _attrs({"aiodetach.elapsed": r.elapsed}))
        span.end()

    def _unplug(self, r: UnplugRecord) -> None:
        if r.kind == "ended":
            callers = self._joined.pop(r.unplug_id, ())
            for detach_id in callers:
                self._waits_on.pop(detach_id, None)
        else:
            callers = self._joined.get(r.unplug_id, ())
        if not callers:
            return
        attrs = _attrs(
            {
                "aiodetach.attempt": r.attempt,
                "aiodetach.attempts_allowed": r.attempts,
                "aiodetach.sent": r.sent,
                "aiodetach.callers": r.callers,
                "aiodetach.unplug_elapsed": r.elapsed,
                "aiodetach.confirmed_by": r.confirmed_by,
                "aiodetach.reason": r.reason,
                "aiodetach.timeout": r.timeout,
                "aiodetach.delay": r.delay,
                "aiodetach.outcome": r.outcome,
            }
        )
        for detach_id in callers:
            entry = self._spans.get(detach_id)
            if entry is not None:
                entry[0].add_event("aiodetach.unplug." + r.kind, attrs)

    def _connection(self, r: ConnectionRecord) -> None:
        attrs = _attrs({"aiodetach.reason": r.reason, "aiodetach.reconnects": r.reconnects})
        for span, uri in self._spans.values():
            if uri == r.uri:
                span.add_event("aiodetach.connection." + r.kind, attrs)

    def __repr__(self) -> str:
        return "<aiodetach otel hook>"


def _attrs(values: dict[str, Any]) -> dict[str, Any]:
    """OpenTelemetry attributes take no None."""
    return {k: v for k, v in values.items() if v is not None}
