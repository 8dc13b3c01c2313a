"""libvirt's numbers as the names aiodetach reports (why a domain stopped,
why a connection closed, what state a domain is in): kept apart from
`aiodetach._libvirt`, which is about calling libvirt."""

from __future__ import annotations

import libvirt

from .backend import DomainState

__all__ = ["CLOSE_REASONS", "EVENT_NAMES", "SHUTOFF_REASONS", "STOP_REASONS", "domain_state"]

EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: "DEVICE_REMOVED",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED: "DEVICE_REMOVAL_FAILED",
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: "LIFECYCLE",
    libvirt.VIR_DOMAIN_EVENT_ID_REBOOT: "REBOOT",
}
STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from-snapshot",
}
SHUTOFF_REASONS = {
    # libvirt's shutoff reason (``dom.state()``), named as the STOPPED event's
    # detail: read when a call was refused as "not running" before that event came.
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from-snapshot",
}
CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


def domain_state(state: int, active: bool) -> DomainState:
    if not active:
        return DomainState.SHUTOFF
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return DomainState.PAUSED
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return DomainState.RUNNING
    return DomainState.OTHER  # active, in transition (shutting down, nostate, …)
