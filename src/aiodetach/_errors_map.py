"""The one boundary where libvirt's error codes become aiodetach exceptions."""

from __future__ import annotations

from ._machine_io import Outcome
from .backend import BackendError, ErrorCode, ErrorDomain
from .errors import (
    AuthenticationFailed,
    ConnectionLost,
    DetachError,
    DetachFailed,
    DetachRefused,
    DeviceNotFound,
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    InvalidRequest,
    ReadOnlyConnection,
)

__all__ = [
    "is_alias_missing",
    "is_auth_failure",
    "is_busy",
    "is_connection_error",
    "is_domain_gone",
    "is_in_progress",
    "is_job_held",
    "is_not_running",
    "is_not_sent",
    "is_unsupported",
    "map_connect_error",
    "map_error",
    "request_outcome",
]

# What QEMU/libvirt say when an unplug of the device is already under way
# (measured on QEMU 7.2 with native PCIe hotplug; see docs/libvirt-behaviour.md).
_IN_PROGRESS = (
    "already in the process of unplug",
    "guest is busy",
    "power indicator blinking",
)


def is_in_progress(err: BackendError) -> bool:
    """The request was refused because an earlier unplug is still pending."""
    text = err.message.lower()
    return err.code in (ErrorCode.INTERNAL_ERROR, ErrorCode.OPERATION_FAILED) and any(
        marker in text for marker in _IN_PROGRESS
    )


def is_busy(err: BackendError) -> bool:
    """QEMU's "guest is busy (power indicator blinking)": the native-PCIe slot is
    still settling.  Right after a hot-plug that means the request was *not
    accepted* (nothing is pending); after a request of ours it means ours is
    still in progress.  Only the caller knows which: see ``_unplug``."""
    text = err.message.lower()
    return err.code in (ErrorCode.INTERNAL_ERROR, ErrorCode.OPERATION_FAILED) and (
        "guest is busy" in text or "power indicator blinking" in text
    )


def is_alias_missing(err: BackendError) -> bool:
    """libvirt no longer knows the device (it was removed meanwhile)."""
    return err.code == ErrorCode.DEVICE_MISSING or (
        err.code == ErrorCode.INTERNAL_ERROR and "no device found with alias" in err.message
    )


def is_domain_gone(err: BackendError) -> bool:
    """libvirt knows no such domain (never defined, or undefined since: a
    transient domain that stopped is gone too)."""
    return err.code == ErrorCode.NO_DOMAIN


def is_not_running(err: BackendError) -> bool:
    """The domain exists but is shut off: what needs a running guest is refused."""
    return err.code == ErrorCode.OPERATION_INVALID and "not running" in err.message


def is_job_held(err: BackendError) -> bool:
    """Another job held the domain for all of libvirt's wait for it (30 s on
    QEMU, not configurable): "Timed out during operation: cannot acquire state
    change lock (held by monitor=remoteDispatchDomainMigratePerform3Params)"
    during a migration.  The call never ran: nothing was done, so it is sent
    again (see ``_machine`` and ``_persistent``), not a failure.

    The code alone does not say so: 68 is libvirt's "timed out" for anything
    (a guest agent, a monitor), and such a call may have run, or may fail the
    same way every time; sent again for as long as a caller waits, a caller
    with no deadline would wait for ever.  Only the job wait's own words
    ("cannot acquire state change lock", "cannot acquire job mutex" in older
    drivers) say the call was never started."""
    return err.code == ErrorCode.OPERATION_TIMEOUT and "cannot acquire" in err.message.lower()


def is_unsupported(err: BackendError) -> bool:
    """The driver does not implement the call (an in-process driver such as
    ``test:///default`` has no keepalive, say)."""
    return err.code == ErrorCode.NO_SUPPORT


def is_already_tracked(err: BackendError) -> bool:
    """libvirt refused an event callback: one for that event and domain filter
    is registered on the connection already ("event callback already
    tracked").  libvirt tracks one per connection, event and filter, and
    libvirt-python registers the same C function for all of its callbacks of
    an event: a caller listening on its own connection takes the slot."""
    return err.code == _INVALID_ARG and "already tracked" in err.message


_INVALID_ARG = 8
"""libvirt's ``VIR_ERR_INVALID_ARG``."""


def is_connection_error(err: BackendError) -> bool:
    """The connection to libvirtd is gone (the call may or may not have run).

    ``INVALID_CONN`` ("invalid connection pointer") is a connection closed
    under us: a caller's own (``connection=``) that the caller closed while
    the service used it.  The reconnect then finds it closed and fails what
    waits with `ConnectionLost`, instead of each call a `HypervisorError`."""
    if err.code in (ErrorCode.SYSTEM_ERROR, ErrorCode.NO_CONNECT, ErrorCode.INVALID_CONN):
        return True
    if err.origin == ErrorDomain.RPC and err.code == ErrorCode.INTERNAL_ERROR:
        return True
    text = err.message.lower()
    return "client socket is closed" in text or "not connected to libvirt" in text


def is_not_sent(err: BackendError) -> bool:
    """The call failed inside libvirt's client before anything was written:
    libvirtd never heard of it.  libvirt checks its socket before it sends a
    call ("client socket is closed": the daemon closed this connection, an
    idle one say, and the client has noticed), so such a call was not sent.
    Any other connection failure may have happened after the call reached
    libvirtd (a reply lost with the connection): *maybe sent*."""
    if err.code == ErrorCode.INVALID_CONN:
        return True  # refused by the client before anything was sent: no connection
    text = err.message.lower()
    return "client socket is closed" in text or "not connected to libvirt" in text


def request_outcome(err: BackendError, *, closing: bool) -> Outcome:
    """What libvirt refusing a live detach request means for the unplug
    (see `aiodetach._machine`).  ``closing``: the service is closing, so
    a failed connection is not waited for."""
    if is_busy(err):
        return Outcome.BUSY  # the machine knows whether anything of ours was accepted
    if is_in_progress(err):
        return Outcome.IN_PROGRESS
    if is_job_held(err):
        return Outcome.JOB_HELD  # not taken: sent again, using no attempt
    if is_connection_error(err) and not closing:
        return Outcome.NOT_SENT if is_not_sent(err) else Outcome.MAYBE_SENT
    if is_alias_missing(err):
        return Outcome.ALIAS_MISSING
    if is_not_running(err):
        return Outcome.NOT_RUNNING
    if is_domain_gone(err):
        return Outcome.NO_DOMAIN
    return Outcome.REFUSED


def is_auth_failure(err: BackendError) -> bool:
    """libvirtd (or our own TLS setup) refused the connection for its
    credentials: measured on libvirt 9.0 over ``qemu+tls``, a client
    certificate the server does not trust is ``AUTH_FAILED`` ("Failed to
    verify peer's certificate"); one that does not verify against the
    client's own CA, or none offered, a ``SYSTEM_ERROR`` of the RPC layer
    naming the certificate or the TLS handshake."""
    if err.code == ErrorCode.AUTH_FAILED or err.origin == _FROM_AUTH:
        # _FROM_AUTH: libvirt's credential helpers (util/virauth.c), e.g.
        # "Missing authentication credentials" (INVALID_ARG) for a URI that
        # needs credentials opened without a callback to ask for them.
        return True
    text = err.message.lower()
    return err.origin == ErrorDomain.RPC and any(marker in text for marker in _TLS_REFUSALS)


_FROM_AUTH = 46
"""libvirt's ``VIR_FROM_AUTH``: an error of its client's credential helpers."""

_TLS_REFUSALS = ("certificate", "tls confirmation", "tls handshake", "tls peer")


def map_connect_error(err: BackendError, *, uri: str) -> DetachError:
    """A failed connect: `AuthenticationFailed` for credentials,
    `ConnectionLost` for any other connection failure, else as
    `map_error` classifies it."""
    cls = AuthenticationFailed if is_auth_failure(err) else _classify(err)
    return cls(f"connect to {uri} failed: {err.message}", libvirt_code=err.code)


def map_error(
    err: BackendError, *, domain: str | None, alias: str | None, action: str
) -> DetachError:
    """Turn a libvirt failure of ``action`` into the matching typed error."""
    cls = _classify(err)
    return cls(f"{action} failed: {err.message}", domain=domain, alias=alias, libvirt_code=err.code)


def _classify(err: BackendError) -> type[DetachError]:
    code = err.code
    if is_connection_error(err):
        return ConnectionLost
    if is_domain_gone(err):
        return DomainNotFound
    if is_alias_missing(err):
        return DeviceNotFound
    if is_not_running(err):
        return DomainNotRunning
    if code in (ErrorCode.XML_ERROR, ErrorCode.XML_DETAIL):
        return InvalidRequest
    if code in (ErrorCode.OPERATION_DENIED, ErrorCode.AUTH_FAILED, ErrorCode.ACCESS_DENIED):
        return ReadOnlyConnection
    if "rejected by the guest" in err.message:
        return DetachFailed
    if "does not support hotplugging" in err.message or "cannot be hot" in err.message:
        return DetachRefused
    if code in (
        ErrorCode.OPERATION_FAILED,
        ErrorCode.OPERATION_INVALID,
        ErrorCode.NO_SUPPORT,
        ErrorCode.CONFIG_UNSUPPORTED,
    ):
        return DetachRefused
    return HypervisorError
