"""How a caller tells a service to reach libvirt: a URI, a factory, or a connection.

``DetachService(uri=...)`` (``None``: libvirt's default URI),
``DetachService(connect=factory)`` or ``DetachService(connection=conn)``; at
most one.  A factory is how every transport and credential libvirt knows
reaches the service (``openAuth`` with a credentials callback, TLS with a
``pkipath``, SASL): the service calls it whenever it needs a new connection
and owns what it returns.  A caller's connection stays the caller's: used
while it lives, never closed, never replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import libvirt

from .backend import BackendError, ErrorCode
from .errors import InvalidRequest

__all__ = ["Connect", "alive", "check_how_to_connect", "from_factory"]

Connect = Callable[[], libvirt.virConnect]
"""A caller's way to open a libvirt connection: called (in a worker thread)
for every connection the service opens, at ``open()`` and on every reconnect."""


def alive(conn: libvirt.virConnect, uri: str) -> libvirt.virConnect:
    """The caller's connection if it still lives; a *final* error if not:
    nobody but the caller can open it again, so no reconnect retries it."""
    why = "it is closed"
    with contextlib.suppress(libvirt.libvirtError):
        if conn.isAlive():
            return conn
        why = "it was lost"
    raise BackendError(
        ErrorCode.NO_CONNECT,
        f"the connection the caller gave ({uri}) cannot be used: {why}, and "
        "aiodetach never re-opens a caller's connection (give a connect= factory "
        "to have it re-opened)",
        final=True,
    )


def from_factory(connect: Connect) -> libvirt.virConnect:
    """A new connection from the caller's factory, checked for its type."""
    conn = connect()
    if not isinstance(conn, libvirt.virConnect):
        raise BackendError(
            ErrorCode.INTERNAL_ERROR,
            f"connect() returned {conn!r}, not a libvirt.virConnect",
            final=True,
        )
    return conn


def check_how_to_connect(uri: object, connect: object, connection: object, backend: object) -> None:
    """One way to reach libvirt, of the right type (`InvalidRequest`)."""
    if uri is not None and (not isinstance(uri, str) or not uri.strip()):
        raise InvalidRequest(f"uri must be a non-empty string or None, not {uri!r}")
    if connect is not None and not callable(connect):
        raise InvalidRequest(f"connect must be a callable returning a virConnect, not {connect!r}")
    if connection is not None and not isinstance(connection, libvirt.virConnect):
        raise InvalidRequest(f"connection must be a libvirt.virConnect, not {connection!r}")
    given = [
        name for name, v in (("connect", connect), ("connection", connection)) if v is not None
    ]
    if uri is not None:
        given.insert(0, "uri")
    if len(given) > 1:
        raise InvalidRequest(f"give one of uri, connect and connection, not {' and '.join(given)}")
    if backend is not None and (connect is not None or connection is not None):
        raise InvalidRequest(f"backend replaces libvirt: it takes no {given[0]}")
