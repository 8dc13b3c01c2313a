"""The default hook: records become the log events aiodetach always logged.

Event names and fields are those of the log calls this hook replaced
(``aiodetach.detach_sent``, ``aiodetach.attempt_timed_out``, …), so
log-based alerts keep working.  Steps that had no log line before (an unplug
starting or ending, a detach that failed: its error is the caller's to log)
log nothing here; hooks see them.
"""

from __future__ import annotations

from .._log import get_log
from ._records import ConnectionRecord, DetachRecord, Record, UnplugRecord

__all__ = ["log_hook"]

_log = get_log()


def log_hook(record: Record) -> None:
    """Log ``record`` as the library's event of that step (if any), see ``_log``."""
    if isinstance(record, UnplugRecord):
        _log_unplug(record)
    elif isinstance(record, DetachRecord):
        _log_detach(record)
    else:
        _log_connection(record)


def _log_unplug(r: UnplugRecord) -> None:
    kind, where = r.kind, {"domain": r.domain, "alias": r.alias}
    if kind == "request_sent":
        _log.info("aiodetach.detach_sent", **where, attempt=r.attempt, attempts=r.attempts)
    elif kind == "in_progress":
        _log.info("aiodetach.unplug_in_progress", **where, message=r.reason)
    elif kind == "job_held":
        _log.info("aiodetach.job_held", **where, message=r.reason)
    elif kind == "busy_backoff":
        _log.info(
            "aiodetach.busy_backoff",
            **where,
            refusals=r.busy_refusals,
            delay=round(r.delay or 0.0, 3),
        )
    elif kind == "stale_event_ignored":
        _log.info("aiodetach.stale_event_ignored", **where, kind=r.reason)
    elif kind == "attempt_timed_out":
        _log.info(
            "aiodetach.attempt_timed_out",
            **where,
            attempt=r.attempt,
            attempts=r.attempts,
            timeout=r.timeout,
        )
    elif kind == "paused":
        _log.info("aiodetach.waiting_while_paused", **where)
    elif kind == "guest_reset":
        _log.info("aiodetach.guest_reset", **where)
    elif kind == "request_voided":
        _log.info("aiodetach.request_voided_by_reset", **where)
    elif kind == "waiting_for_reconnect":
        _log.info("aiodetach.waiting_for_reconnect", **where)
    elif kind == "removed":
        if r.confirmed_by == "xml":
            _log.info("aiodetach.removed_without_event", **where)
    elif kind == "removal_failed":
        _log.warning("aiodetach.removal_failed", **where)
    elif kind == "domain_stopped":
        _log.warning("aiodetach.domain_stopped", **where, reason=r.reason)
    elif kind == "timed_out":
        _log.warning("aiodetach.detach_timeout", **where, attempts=r.attempts)


def _log_detach(r: DetachRecord) -> None:
    kind = r.kind
    if kind == "unplug_joined":
        _log.info("aiodetach.detach_joined", domain=r.domain, alias=r.alias)
    elif kind == "timeout_below_slot_minimum":
        _log.warning(
            "aiodetach.timeout_below_slot_minimum",
            domain=r.domain,
            alias=r.alias,
            slot=r.slot,
            minimum=r.minimum,
            timeout=r.timeout,
        )
    elif kind in ("persistent_detached", "persistent_joined", "persistent_missing_ignored"):
        _log.info("aiodetach." + kind, domain=r.domain, alias=r.alias)
    elif kind == "finished" and r.result is not None:
        result = r.result
        _log.info(
            "aiodetach.detached",
            domain=result.domain_name,
            alias=result.alias,
            live=result.live,
            persistent=result.persistent,
            attempts=result.attempts,
            elapsed=round(result.elapsed, 3),
            confirmed_by=result.confirmed_by,
        )


def _log_connection(r: ConnectionRecord) -> None:
    kind = r.kind
    if kind == "lost":
        _log.warning("aiodetach.connection_lost", uri=r.uri, reason=r.reason)
    elif kind == "reconnecting":
        _log.info("aiodetach.reconnecting", uri=r.uri)
    elif kind == "reconnected":
        _log.info("aiodetach.reconnected", uri=r.uri, reconnects=r.reconnects)
    elif kind == "dead":
        _log.error("aiodetach.connection_dead", uri=r.uri, error=r.reason)
    elif kind == "connected":
        _log.debug("aiodetach.connected", uri=r.uri)
    elif kind == "closed":
        _log.debug("aiodetach.closed", uri=r.uri)
