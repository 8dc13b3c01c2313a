"""Finding a domain as virsh does, and libvirt's errors as `BackendError`:
the two things every libvirt call of `aiodetach._libvirt` starts with.

A reference is read as virsh reads it: a number is a running domain's ID
first, a UUID (any case, dashes or not) a UUID first, and anything else a
name; each falls back to the name, since a domain may be named like an ID
or a UUID.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import libvirt

from ._errors_map import is_domain_gone
from ._rules import uuid_in
from .backend import BackendError, ErrorCode

__all__ = ["find_domain", "wrap"]

_T = TypeVar("_T")


def wrap(fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except libvirt.libvirtError as exc:
        raise BackendError(
            exc.get_error_code() or ErrorCode.INTERNAL_ERROR,
            exc.get_error_message() or str(exc),
            origin=exc.get_error_domain() or 0,
        ) from None


def find_domain(conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
    """The domain ``ref`` names on ``conn`` (see the module's docstring)."""
    if _ID.fullmatch(ref):
        return _by_id(conn, ref)
    if uuid_in(ref) is None:
        return wrap(lambda: conn.lookupByName(ref))
    return _by_uuid(conn, ref)


_ID = re.compile(r"[0-9]{1,9}")  # a running domain's ID (virsh's reading of a number)


def _by_id(conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
    """A number names the running domain with that ID first, as virsh reads
    it, else the domain *named* so (a domain may be named ``"42"``)."""
    try:
        return wrap(lambda: conn.lookupByID(int(ref)))
    except BackendError as err:
        if not is_domain_gone(err):
            raise
        return wrap(lambda: conn.lookupByName(ref))


def _by_uuid(conn: libvirt.virConnect, ref: str) -> libvirt.virDomain:
    """The domain whose UUID ``ref`` spells (any case, dashes or not: what
    libvirt reads as a UUID), else the one *named* ``ref``, as virsh resolves
    it: a domain may be named like a UUID."""
    try:
        return wrap(lambda: conn.lookupByUUIDString(ref))
    except BackendError as err:
        if not is_domain_gone(err):
            raise
        try:
            return wrap(lambda: conn.lookupByName(ref))
        except BackendError as by_name:
            if is_domain_gone(by_name):
                raise err from None  # the UUID's "not found" says what was asked
            raise
