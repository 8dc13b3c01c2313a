"""The close rule, written once: **a close is not an outcome.**

Closing a service (or a fleet) cancels the unplugs' drivers, drops the
connection and shuts the worker threads down.  What that does to a call in
flight (a cancellation the caller did not ask for, a `ConnectionLost`,
a `HypervisorError` or ``RuntimeError`` from an executor shut down
under it, a `ServiceClosed`) says nothing about the device: the caller
gets [`ServiceClosed`][aiodetach.errors.ServiceClosed] instead.  A caller's *own* cancellation
(``task.cancel()`` on the caller's task) stays a cancellation, close or not.

The journal has the same rule from the guest's side: an unplug that ended
because of a close (or a daemon given up on, or a journal that failed) may
still be running in the guest, so it has no outcome to write; its row stays
unfinished and the next ``open()`` takes it up.
"""

from __future__ import annotations

import asyncio

from .errors import ConnectionLost, HypervisorError, JournalError, ServiceClosed

__all__ = ["by_close", "leaves_unplug_running"]

# What a close does to a call in flight, besides cancelling it.
_CLOSE_EFFECTS = (ConnectionLost, HypervisorError, ServiceClosed, RuntimeError)


def by_close(exc: BaseException, *, closing: bool) -> bool:
    """Whether ``exc``, raised into a call while its service (or fleet,
    connection) is ``closing``, is the close's doing rather than the call's
    outcome.  Call it in the ``except`` block: a cancellation is the caller's
    own when the current task is being cancelled."""
    if not closing:
        return False
    if isinstance(exc, asyncio.CancelledError):
        current = asyncio.current_task()
        return not (current is not None and current.cancelling())
    return isinstance(exc, _CLOSE_EFFECTS)


def leaves_unplug_running(error: BaseException) -> bool:
    """Whether an unplug that ended with ``error`` may still be running in the
    guest, so that the journal has no outcome to write for it: the service
    closed (a cancellation, `ServiceClosed`), the daemon was given up
    on ([`ConnectionLost`][aiodetach.errors.ConnectionLost]), the journal itself failed."""
    return isinstance(error, (asyncio.CancelledError, ConnectionLost, ServiceClosed, JournalError))
