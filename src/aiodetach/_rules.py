"""The pure decisions of a detach: which halves to do, and which device each means.

No I/O here: values in, values (or typed errors) out, so every rule is
tested without a hypervisor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._xml import (
    DeviceRef,
    Domain,
    Selector,
    config_detach_cannot_pick,
    find_device,
    find_same_device,
)
from .backend import DomainInfo
from .errors import (
    AmbiguousDevice,
    DeviceNotFound,
    DomainNotPersistent,
    DomainNotRunning,
    InvalidRequest,
)

__all__ = ["DomainRef", "Plan", "check_flags", "domain_ref", "halves", "plan_devices"]

DomainRef = Any  # str (name or UUID) or a libvirt.virDomain


def domain_ref(domain: DomainRef) -> str:
    """The caller's domain as a name or UUID string (a virDomain gives its UUID)."""
    uuid_string = getattr(domain, "UUIDString", None)
    if callable(uuid_string):
        return str(uuid_string())
    if not isinstance(domain, str):
        raise InvalidRequest(
            "domain must be a name, a UUID string or a libvirt.virDomain, "
            f"not {type(domain).__name__}"
        )
    ref = domain.strip()
    if not ref or any(ord(c) < 32 or ord(c) == 127 for c in domain):
        raise InvalidRequest(f"domain {domain!r} is not a valid domain name or UUID")
    return ref


def check_flags(ref: str, live: bool | None, persistent: bool | None) -> None:
    for name, value in (("live", live), ("persistent", persistent)):
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be True, False or None", domain=ref)
    if live is False and persistent is False:
        raise InvalidRequest("live=False and persistent=False: nothing to detach", domain=ref)


def halves(info: DomainInfo, live: bool | None, persistent: bool | None) -> tuple[bool, bool]:
    """Which definitions to detach from: as asked, else as the domain is."""
    if live is True and not info.state.is_active:
        raise DomainNotRunning(
            "live detach asked of a shut-off domain; use persistent=True (or the default)",
            domain=info.name,
        )
    if persistent is True and not info.persistent:
        raise DomainNotPersistent(
            "persistent detach asked of a transient domain (it has no persistent definition)",
            domain=info.name,
        )
    do_live = info.state.is_active if live is None else live
    do_persistent = info.persistent if persistent is None else persistent
    return do_live, do_persistent


@dataclass(frozen=True, slots=True)
class Plan:
    """The device as found in each definition to be detached from (None: absent)."""

    live: DeviceRef | None
    persistent: DeviceRef | None
    found: DeviceRef  # as the caller will see it described (live first)
    gone: bool = False  # ``live`` was unplugged by another caller since this one began


def plan_devices(
    info: DomainInfo,
    selector: Selector,
    live: bool | None,
    persistent: bool | None,
    live_xml: Domain | None,
    persistent_xml: Domain | None,
    *,
    removed: Callable[[DeviceRef | None], DeviceRef | None] = lambda _live: None,
    unplugged: Callable[[DeviceRef | None], DeviceRef | None] = lambda _pers: None,
) -> Plan:
    """Find the device in each definition asked for, and apply the not-found rules.

    The selector may name the device by something only one definition
    carries: libvirt-assigned aliases (``virtio-disk1``, ``scsi0-0-0-2``,
    ``net0``) exist in the live XML only.  So a device found in one
    definition is looked for in the other by what identifies it *there*
    (disk target, MAC, hostdev source, controller type and index, guest
    address), and both halves are done.  Where that identity is shared (two
    interfaces with one MAC), the guest address tells the twins apart; where
    nothing does, :class:`AmbiguousDevice` is raised before anything is done,
    rather than detaching a guess or one half in silence.
    ``removed(live_dev)`` names a device
    whose config detach by another caller is under way or done since this
    caller began (see :mod:`aiodetach._persistent`); ``unplugged(pers_dev)``
    one that another caller's unplug removed from the live definition since
    this caller began (see :mod:`aiodetach._recent`).
    """
    alias = selector.value if selector.kind == "alias" else None
    where = "live"
    try:
        live_dev = find_device(live_xml, selector) if live_xml is not None else None
        where = "persistent"
        pers_dev = find_device(persistent_xml, selector) if persistent_xml is not None else None
        if persistent_xml is not None and pers_dev is None and live_dev is not None:
            pers_dev = find_same_device(persistent_xml, live_dev, live_xml)
        where = "live"
        if live_xml is not None and live_dev is None and pers_dev is not None:
            live_dev = find_same_device(live_xml, pers_dev, persistent_xml)
    except AmbiguousDevice as exc:
        raise _ambiguous(info, selector, where, exc.message) from None
    gone = False
    if live_xml is not None and live_dev is None:
        # Another caller's unplug of this device may have ended just before
        # our read: ``unplugged`` finds it, and this caller shares its outcome.
        ended = unplugged(pers_dev)
        if ended is not None:
            live_dev, gone = ended, True
            if persistent_xml is not None and pers_dev is None:
                # Named by what only the live definition carried (a libvirt
                # alias): the persistent copy, by the identity the unplug kept.
                try:
                    pers_dev = find_same_device(persistent_xml, ended, live_xml)
                except AmbiguousDevice as exc:
                    raise _ambiguous(info, selector, "persistent", exc.message) from None
    if persistent_xml is not None and pers_dev is None:
        # Another caller's config detach of this device may have landed just
        # before our read: ``removed`` finds it, and this caller shares it.
        pers_dev = removed(live_dev)
    why = config_detach_cannot_pick(pers_dev) if pers_dev is not None else None
    if why is not None:
        raise _ambiguous(info, selector, "persistent", why)

    if live is True and live_dev is None:
        raise DeviceNotFound(
            f"no device with {selector.describe()} in the live definition",
            domain=info.name,
            alias=alias,
        )
    if persistent is True and pers_dev is None and live_dev is None:
        raise DeviceNotFound(
            f"no device with {selector.describe()} in the persistent definition",
            domain=info.name,
            alias=alias,
        )
    found = live_dev or pers_dev
    if found is None:
        where = " or ".join(
            w for w, xml in (("live", live_xml), ("persistent", persistent_xml)) if xml is not None
        )
        raise DeviceNotFound(
            f"no device with {selector.describe()} in the {where} definition",
            domain=info.name,
            alias=alias,
        )
    if (
        persistent is True
        and pers_dev is None
        and live_dev is not None
        and live_dev.identity is None
        and not _user_alias(live_dev.alias)
    ):
        # Found live by a libvirt alias, and nothing else names it: whether the
        # persistent definition has it cannot be told, and "do it or raise".
        raise InvalidRequest(
            f"the device with {selector.describe()} has nothing but its live alias to "
            "identify it in the persistent definition; name it with xml= (its persistent "
            "XML) or detach with persistent=False",
            domain=info.name,
            alias=alias,
        )
    return Plan(live_dev, pers_dev, found, gone)


def _ambiguous(info: DomainInfo, selector: Selector, where: str, why: str) -> AmbiguousDevice:
    return AmbiguousDevice(
        f"{selector.describe()}: cannot tell which device of the {where} definition is "
        f"meant: {why}; nothing was detached (name it by its persistent XML with its "
        "guest address, or detach one definition only)",
        domain=info.name,
        alias=selector.value if selector.kind == "alias" else None,
    )


def _user_alias(alias: str | None) -> bool:
    return alias is not None and alias.startswith("ua-")
