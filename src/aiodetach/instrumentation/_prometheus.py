"""Prometheus metrics from the records (``pip install 'aiodetach[prometheus]'``).

Labels stay low-cardinality on purpose: an ``outcome`` label with six values,
never a domain, alias or URI (a host agent detaches thousands of distinct
devices; one series each would swamp the server).  Per-device detail belongs
in traces and logs.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, get_args

from ._records import ConnectionRecord, DetachRecord, Hook, Outcome, Record, UnplugRecord

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["BUCKETS", "prometheus_hook"]

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
"""Detach duration buckets, in seconds: a SCSI disk goes in ~50 ms, a PCI
device of a booted guest in 0.1-10 s, a guest that never answers takes
``attempts * timeout`` (160 s with the defaults)."""

_hooks: weakref.WeakKeyDictionary[Any, Hook] = weakref.WeakKeyDictionary()


def prometheus_hook(registry: CollectorRegistry | None = None) -> Hook:
    """A hook that maintains aiodetach's metrics in ``registry`` (default:
    prometheus-client's global ``REGISTRY``).

    One hook per registry: asking again for the same registry returns the
    same hook (Prometheus refuses a metric registered twice).  Give it to
    every service (or the fleet) whose detaches it should count.

    Metrics: ``aiodetach_requests_total``, ``aiodetach_detaches_total{outcome}``,
    ``aiodetach_detach_duration_seconds{outcome}``,
    ``aiodetach_removed_without_event_total``, ``aiodetach_pending_unplugs``,
    ``aiodetach_attempts_timed_out_total``, ``aiodetach_busy_refusals_total``,
    ``aiodetach_reconnects_total``.
    """
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "aiodetach.instrumentation.prometheus_hook needs prometheus-client: "
            "pip install 'aiodetach[prometheus]'"
        ) from exc
    if registry is None:
        registry = prometheus_client.REGISTRY
    hook = _hooks.get(registry)
    if hook is None:
        hook = _hooks[registry] = _PrometheusHook(registry)
    return hook


class _PrometheusHook:
    """Counts steps into metrics; called on the event loop thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "aiodetach_requests",
            "Live detach requests handed to libvirt (including those it refused).",
            registry=registry,
        )
        self.detaches = Counter(
            "aiodetach_detaches",
            "detach() calls ended, by outcome "
            "(removed, failed, timeout, stopped, error, cancelled).",
            ["outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "aiodetach_detach_duration_seconds",
            "Seconds from a detach() call to its result or error, by outcome.",
            ["outcome"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.without_event = Counter(
            "aiodetach_removed_without_event",
            "Unplugs confirmed by re-reading the live XML: libvirt's DEVICE_REMOVED was lost.",
            registry=registry,
        )
        self.pending = Gauge(
            "aiodetach_pending_unplugs",
            "Live unplugs in flight now, including those kept for a caller to come back.",
            registry=registry,
        )
        self.attempt_timeouts = Counter(
            "aiodetach_attempts_timed_out",
            "Attempts whose window ran out with no DEVICE_REMOVED.",
            registry=registry,
        )
        self.busy = Counter(
            "aiodetach_busy_refusals",
            'Requests refused with "guest is busy" before any was accepted (backed off).',
            registry=registry,
        )
        self.reconnects = Counter(
            "aiodetach_reconnects",
            "Connections to libvirtd re-opened after a loss.",
            registry=registry,
        )
        for outcome in get_args(Outcome):  # every series exists from the start, at 0
            self.detaches.labels(outcome)
            self.duration.labels(outcome)

    def __call__(self, record: Record) -> None:
        if isinstance(record, UnplugRecord):
            kind = record.kind
            if kind == "request_sent":
                self.requests.inc()
            elif kind == "started":
                self.pending.inc()
            elif kind == "ended":
                self.pending.dec()
            elif kind == "removed":
                if record.confirmed_by == "xml":
                    self.without_event.inc()
            elif kind == "attempt_timed_out":
                self.attempt_timeouts.inc()
            elif kind == "busy_backoff":
                self.busy.inc()
        elif isinstance(record, DetachRecord):
            if record.kind == "finished":
                outcome = record.outcome or "error"
                self.detaches.labels(outcome).inc()
                self.duration.labels(outcome).observe(record.elapsed)
        elif isinstance(record, ConnectionRecord) and record.kind == "reconnected":
            self.reconnects.inc()

    def __repr__(self) -> str:
        return "<aiodetach prometheus hook>"
