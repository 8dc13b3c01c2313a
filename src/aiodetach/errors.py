"""The exception hierarchy of aiodetach.

Every error a caller can cause, or that the hypervisor can report, is a
[`DetachError`][aiodetach.DetachError].  Each carries the domain and device alias it is about (when
known at the point of failure), so a host agent detaching hundreds of devices at
once can tell from the exception alone which detach went wrong.  Errors that
come from libvirt keep libvirt's numeric error code (``libvirt_code``) and the
original message, because operators search for those in libvirt's logs.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousDevice",
    "AuthenticationFailed",
    "BatchAborted",
    "CalledFromEventLoop",
    "ConnectionLost",
    "DetachError",
    "DetachFailed",
    "DetachRefused",
    "DetachTimeout",
    "DeviceNotFound",
    "DomainNotFound",
    "DomainNotPersistent",
    "DomainNotRunning",
    "DomainStopped",
    "EventLoopConflict",
    "HypervisorError",
    "InvalidRequest",
    "JournalCorrupt",
    "JournalError",
    "JournalLocked",
    "JournalUnavailable",
    "JournalVersionError",
    "ReadOnlyConnection",
    "ServiceClosed",
]


class DetachError(Exception):
    """Root of every error raised by aiodetach.

    Attributes:
        domain: name or UUID of the domain concerned, when known.
        alias: the device alias concerned, when known (a persistent-only
            detach of a device without a user alias has none).
        libvirt_code: libvirt's ``VIR_ERR_*`` code when the error came from
            libvirt, else ``None``.
        persistent_done: True when the device had already been removed from
            the persistent definition before the live half failed: the caller
            must know that its next cold boot will not have the device.
    """

    message: str
    domain: str | None
    alias: str | None
    libvirt_code: int | None
    persistent_done: bool = False

    def __init__(
        self,
        message: str,
        *,
        domain: str | None = None,
        alias: str | None = None,
        libvirt_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.domain = domain
        self.alias = alias
        self.libvirt_code = libvirt_code

    def __str__(self) -> str:
        where = []
        if self.domain is not None:
            where.append(f"domain={self.domain!r}")
        if self.alias is not None:
            where.append(f"alias={self.alias!r}")
        if self.libvirt_code is not None:
            where.append(f"libvirt_code={self.libvirt_code}")
        suffix = f" [{', '.join(where)}]" if where else ""
        return f"{self.message}{suffix}"

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword-only attributes across pickling (multiprocessing, logging handlers).
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[DetachError], message: str, state: dict[str, object]) -> DetachError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class InvalidRequest(DetachError, ValueError):
    """The request itself is wrong: no or several device selectors, an empty
    identifier, malformed device XML, ``live=False, persistent=False``…

    ``index`` is the position of the offending request when it came in a
    batch (``detach_many``/``detach_iter``, which check every request before
    sending any), else ``None``.
    """

    index: int | None = None


class DomainNotFound(DetachError, LookupError):
    """No domain with that name or UUID exists on this connection."""


class DeviceNotFound(DetachError, LookupError):
    """The device is in none of the definitions (live/persistent) it was asked
    to be detached from."""


class AmbiguousDevice(DetachError, LookupError):
    """More than one device fits the request and nothing tells them apart, so
    nothing was changed: neither definition was touched.

    Some identities may repeat within one definition (libvirt accepts two
    interfaces with one MAC, two filesystems with one target, two shared
    memory devices with one name…).  A device named by something only one
    definition carries is then told from its twins in the other by its guest
    ``<address>``; where that does not settle it (no address, the same
    address twice, none at the address, or a device libvirt's config detach
    finds by that identity alone), detaching a guess would remove the wrong
    device for good, or do one half in silence.  Name the device by its
    persistent XML (``xml=``, address included) or detach one half
    (``persistent=False`` or ``live=False``).
    """


class DomainNotRunning(DetachError):
    """A live detach was asked of a domain that is shut off."""


class DomainStopped(DomainNotRunning):
    """The domain stopped (shut down, destroyed, crashed, migrated away) while a
    live detach was waiting for the guest.

    The device is no longer attached to a *running* guest, but the guest never
    confirmed the unplug, so this is reported as an error rather than as a
    success: callers that only need the device released may treat it as one.
    ``reason`` is libvirt's lifecycle detail (``"destroyed"``, ``"shutdown"``,
    ``"migrated"``, ``"crashed"``, ``"failed"``, ``"saved"``, …).
    """

    reason: str

    def __init__(
        self,
        message: str,
        *,
        domain: str | None = None,
        alias: str | None = None,
        libvirt_code: int | None = None,
        reason: str = "stopped",
    ) -> None:
        super().__init__(message, domain=domain, alias=alias, libvirt_code=libvirt_code)
        self.reason = reason


class DomainNotPersistent(DetachError):
    """``persistent=True`` was asked of a transient domain (it has no
    persistent definition to detach from)."""


class ReadOnlyConnection(DetachError, PermissionError):
    """The service was opened read-only (or libvirt denied the operation):
    detaching needs a read-write connection."""


class DetachFailed(DetachError):
    """The guest rejected the unplug (libvirt's ``DEVICE_REMOVAL_FAILED``).

    Never retried: re-sending a request the guest has explicitly refused only
    repeats the refusal.
    """


class DetachRefused(DetachError):
    """libvirt refused the detach request outright (device busy, a device type
    that cannot be hot-unplugged, unsupported operation…).  Nothing was sent
    to the guest."""


class DetachTimeout(DetachError, TimeoutError):
    """The guest did not release the device after ``attempts`` requests of
    ``timeout`` seconds each; the device is still in the live definition."""

    attempts: int
    timeout: float

    def __init__(
        self,
        message: str,
        *,
        domain: str | None = None,
        alias: str | None = None,
        libvirt_code: int | None = None,
        attempts: int = 0,
        timeout: float = 0.0,
    ) -> None:
        super().__init__(message, domain=domain, alias=alias, libvirt_code=libvirt_code)
        self.attempts = attempts
        self.timeout = timeout


class ConnectionLost(DetachError, ConnectionError):
    """The libvirt daemon could not be reached (at open, or it went away and
    did not come back within ``reconnect_timeout``)."""


class AuthenticationFailed(ConnectionLost):
    """The connection was refused for who we are, not for where libvirtd is:
    a TLS certificate (ours or the server's) that does not verify, wrong
    credentials, a SASL failure.  Raised by ``open()`` after one attempt (the
    message names the URI and carries libvirt's reason); a reconnect meeting
    it retries with backoff until ``reconnect_timeout`` (certificates may be
    replaced meanwhile), then ends as `ConnectionLost`."""


class ServiceClosed(DetachError):
    """The service was closed (``aclose()``) while this detach was in flight.
    The unplug may still complete in the guest; nobody is waiting for it."""


class BatchAborted(DetachError):
    """A batch (``detach_many``) stopped early because the caller's
    ``on_progress`` callback raised; that exception is the ``__cause__``.

    Nothing of the batch is left running: the detaches still in flight were
    cancelled and awaited.  As with any cancelled `DetachService.detach()`,
    a live unplug already requested goes on in the guest and is remembered for
    its window, so asking again joins it rather than re-sending.

    Attributes:
        outcomes: every [`DetachOutcome`][aiodetach.DetachOutcome] that was known, in
            request order (including the one whose callback raised).
        unfinished: the indexes (in the batch) of the requests that were
            cancelled before they had an outcome.
    """

    outcomes: list[object]
    unfinished: list[int]

    def __init__(
        self,
        message: str,
        *,
        outcomes: list[object] | None = None,
        unfinished: list[int] | None = None,
    ) -> None:
        super().__init__(message)
        self.outcomes = outcomes if outcomes is not None else []
        self.unfinished = unfinished if unfinished is not None else []


class HypervisorError(DetachError):
    """Any other libvirt error, kept whole (``libvirt_code`` and message)."""


class EventLoopConflict(DetachError, RuntimeError):
    """libvirt's event implementation cannot deliver to this service's loop: it
    is bound to another event loop (libvirtaio's, still running in another
    thread or ended), or one is registered that nothing runs.  The message says
    what to do (see the docs: *Event loops*)."""


class CalledFromEventLoop(DetachError, RuntimeError):
    """A blocking call ([`BlockingDetachService`][aiodetach.BlockingDetachService])
    was made from a thread that runs an asyncio event loop: it would stall
    that loop for the whole unplug (and deadlock on the facade's own loop).
    Await [`DetachService`][aiodetach.DetachService] there instead."""


class JournalError(DetachError):
    """The journal (``DetachService(journal=PATH)``) cannot be used.

    Raised by ``open()`` before libvirt is contacted, so nothing was done to
    any domain; raised by a detach when its request could not be recorded,
    in which case that request was not sent.  ``path`` is the journal file.
    """

    path: str

    def __init__(self, message: str, *, path: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.path = path


class JournalLocked(JournalError):
    """Another live service (this process or another) holds the journal: two
    writers would each believe they own the pending unplugs."""


class JournalVersionError(JournalError):
    """The journal was written by a newer aiodetach (its format version is
    higher than this one knows); it is left untouched (its side files too)."""


class JournalCorrupt(JournalError):
    """The file is not a journal (not SQLite, another format number, failed
    its integrity check, not the journal's schema) or one of its rows is
    damaged (``row``: its id; a type, a NULL, a state or a column this
    version does not write); it is left untouched and nothing is sent for it."""

    row: int | None = None


class JournalUnavailable(JournalError):
    """The journal cannot be created or written: a missing or read-only
    directory, a full disk, a path that is a directory; or it is not
    trusted: a file others can write (its mode or owner), or a symlink into
    a directory others can write.  Refused ones are left untouched."""
