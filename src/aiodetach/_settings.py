"""Tunables of the detach protocol, from code or from ``AIODETACH_*`` variables."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DetachSettings"]

DEFAULT_CONNECTIONS = 4
"""Libvirt connections per service by default (see ``DetachSettings.connections``)."""
MAX_CONNECTIONS = 16


class DetachSettings(BaseSettings):
    """How long to wait for a guest, and how often to ask it.

    The defaults (8 attempts of 20 s) give a slow or still-booting guest close
    to three minutes, and each attempt is *waited out* before the next request
    is sent: re-sending while an unplug is in progress is what makes slow
    guests never finish.

    Every field can also be set from the environment, e.g.
    ``AIODETACH_ATTEMPTS=3 AIODETACH_TIMEOUT=5``.
    """

    model_config = SettingsConfigDict(
        env_prefix="AIODETACH_", frozen=True, extra="forbid", validate_default=True
    )

    attempts: int = Field(
        default=8, ge=1, le=1000, description="Live detach requests sent at most, in total."
    )
    timeout: float = Field(
        default=20.0,
        gt=0,
        description="Seconds to wait for DEVICE_REMOVED after each request.",
    )
    connect_timeout: float = Field(
        default=30.0,
        gt=0,
        description="How long open() waits for libvirtd to answer before ConnectionLost "
        "(a TCP connect to a host behind a network partition would otherwise hang for "
        "minutes).",
    )
    reconnect_timeout: float = Field(
        default=60.0,
        gt=0,
        description="How long pending detaches wait for a lost libvirtd to come back "
        "before failing with ConnectionLost.",
    )
    reconnect_backoff_max: float = Field(
        default=5.0, gt=0, description="Upper bound of the reconnect backoff, in seconds."
    )
    keepalive_interval: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Seconds between libvirt keepalive probes on an idle connection.",
    )
    keepalive_count: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Unanswered keepalive probes after which the connection counts as lost: "
        "how a network partition (a TCP connection that hangs, never closes) is noticed, "
        "within about keepalive_interval * (keepalive_count + 1) seconds.",
    )
    connections: int = Field(
        default=DEFAULT_CONNECTIONS,
        ge=1,
        le=MAX_CONNECTIONS,
        description="Libvirt connections the service's calls are spread over, each with at "
        "most one call in flight.  Why one per connection: libvirt 9.0's client, with two "
        "calls blocked on one connection into a network partition, crashes (SIGSEGV) when "
        "the link heals; alone on its connection a call is failed cleanly by keepalive.  Why "
        "several: with one, every request waits for the one before it to return (measured "
        "~8 % slower on a mass detach of one domain).  A call takes any free one, and one "
        "domain's calls hold at most connections - 1, so a domain whose calls are stuck "
        "(another client holds its job) holds up no other.  The first carries the event "
        "callbacks; each extra one is one more client of libvirtd (1 keeps a single connection).",
    )
    max_threads: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Worker threads for blocking libvirt calls (per service).",
    )

    journal_sync: Literal["full", "normal"] = Field(
        default="full",
        description="Durability of the journal's commits (DetachService(journal=...)): "
        "'full' fsyncs each request's row before the request goes out (it survives a "
        "power cut of the agent's host, needed when the guests run on other hosts); "
        "'normal' survives a kill of the process only (enough when the guests run on "
        "the agent's own host: a power cut ends their unplugs too).",
    )
    journal_retention: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="Seconds a finished unplug stays in the journal before it is pruned.",
    )

    @field_validator(
        "timeout",
        "connect_timeout",
        "reconnect_timeout",
        "reconnect_backoff_max",
        "journal_retention",
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value
