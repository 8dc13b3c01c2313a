"""The pure decisions of a detach: which halves to do, and which device each means.

No I/O here: values in, values (or typed errors) out, so every rule is
tested without a hypervisor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
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

__all__ = [
    "DomainRef",
    "Found",
    "Plan",
    "ambiguous",
    "check_flags",
    "domain_ref",
    "find_devices",
    "halves",
    "names_domain",
    "plan_devices",
    "uuid_in",
]

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


_UUID = re.compile(r"[ \t\n\v\f\r]*(?:[- ]*[0-9a-fA-F]{2}){16}[ \t\n\v\f\r]*")
"""libvirt's ``virUUIDParse``: surrounding whitespace, 16 hex digit pairs, any
number of ``-`` or spaces before each pair."""
_NOT_HEX = re.compile(r"[^0-9a-fA-F]")


def uuid_in(ref: str) -> str | None:
    """``ref`` as a canonical UUID (lower case, dashed) if libvirt reads it as one.

    The rule is libvirt's own ``virUUIDParse``, which ``lookupByUUIDString``
    uses: 32 hex digits in any case, ``-`` or spaces anywhere between two
    digit pairs, surrounding whitespace (so ``"6695EB01F6A4..."`` is a UUID,
    ``"{6695eb01-...}"`` is not).  A domain is looked up by UUID and events are
    matched by UUID from the same answer, so a caller's spelling names the
    same domain in [`detach()`][aiodetach.DetachService.detach] and in
    [`events()`][aiodetach.DetachService.events].  Every backend call passes
    through here (a lane is per domain), hence regular expressions.
    """
    if _UUID.fullmatch(ref) is None:
        return None
    hexed = _NOT_HEX.sub("", ref).lower()
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def names_domain(ref: str) -> Callable[[str, str], bool]:
    """Whether the caller's ``ref`` (from `domain_ref()`) names a domain,
    given its UUID and name, as a lookup of ``ref`` resolves it: by UUID when
    ``ref`` reads as one (else, as the lookup falls back to, by name), by name
    otherwise."""
    uuid = uuid_in(ref)

    def named(domain_uuid: str, domain_name: str) -> bool:
        return domain_name == ref or (uuid is not None and domain_uuid.lower() == uuid)

    return named


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
    if not (do_live or do_persistent):
        # One half was declined and the domain lacks the other: that half was
        # asked as surely as by True (there is nothing else to do), not a
        # device missing from no definition at all.
        if persistent is False:
            raise DomainNotRunning(
                "live detach asked (persistent=False) of a shut-off domain", domain=info.name
            )
        raise DomainNotPersistent(
            "persistent detach asked (live=False) of a transient domain (it has no "
            "persistent definition)",
            domain=info.name,
        )
    return do_live, do_persistent


@dataclass(frozen=True, slots=True)
class Plan:
    """The device as found in each definition to be detached from (None: absent)."""

    live: DeviceRef | None
    persistent: DeviceRef | None
    found: DeviceRef  # as the caller will see it described (live first)
    gone: bool = False  # ``live`` was unplugged by another caller since this one began


@dataclass(frozen=True, slots=True)
class Found:
    """The device in each definition read (None: not there, or not read).

    What a read missed may be explained by another caller's work that ended
    (or is under way) since this caller began; that is looked up outside,
    only when `live_missed` or `persistent_missed` says a read
    missed it, and handed back as a value (`unplugged()`,
    `config_removed()`).
    """

    live: DeviceRef | None
    persistent: DeviceRef | None
    live_read: bool
    persistent_read: bool
    gone: bool = False  # ``live`` was unplugged by another caller since this one began

    @property
    def live_missed(self) -> bool:
        return self.live_read and self.live is None

    @property
    def persistent_missed(self) -> bool:
        return self.persistent_read and self.persistent is None

    def unplugged(
        self, ended: DeviceRef | None, persistent_xml: Domain | None, live_xml: Domain | None
    ) -> Found:
        """``ended``: the device another caller's unplug removed from the live
        definition just before our read (see `aiodetach._recent`); this
        caller shares its outcome.  Raises the bare `AmbiguousDevice`
        of `find_same_device()` (see `ambiguous()`)."""
        if ended is None:
            return self
        persistent = self.persistent
        if persistent_xml is not None and persistent is None:
            # Named by what only the live definition carried (a libvirt
            # alias): the persistent copy, by the identity the unplug kept.
            persistent = find_same_device(persistent_xml, ended, live_xml)
        return replace(self, live=ended, persistent=persistent, gone=True)

    def config_removed(self, removed: DeviceRef | None) -> Found:
        """``removed``: the device whose config detach by another caller is under
        way or landed just before our read (see `aiodetach._persistent`);
        this caller shares it."""
        return self if removed is None else replace(self, persistent=removed)


def find_devices(
    info: DomainInfo, selector: Selector, live_xml: Domain | None, persistent_xml: Domain | None
) -> Found:
    """Find the device in each definition read.

    The selector may name the device by something only one definition
    carries: libvirt-assigned aliases (``virtio-disk1``, ``scsi0-0-0-2``,
    ``net0``) exist in the live XML only.  So a device found in one
    definition is looked for in the other by what identifies it *there*
    (disk target, MAC, hostdev source, controller type and index, guest
    address), and both halves are done.  Where that identity is shared (two
    interfaces with one MAC), the guest address tells the twins apart; where
    nothing does, `AmbiguousDevice` is raised before anything is done,
    rather than detaching a guess or one half in silence.
    """
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
        raise ambiguous(info, selector, where, exc.message) from None
    return Found(live_dev, pers_dev, live_xml is not None, persistent_xml is not None)


def plan_devices(
    info: DomainInfo,
    selector: Selector,
    live: bool | None,
    persistent: bool | None,
    found: Found,
) -> Plan:
    """Apply the not-found rules to what was found (`find_devices()`, with
    what other callers' unplugs and config detaches explain of its misses)."""
    live_dev, pers_dev = found.live, found.persistent
    alias = selector.value if selector.kind == "alias" else None
    why = config_detach_cannot_pick(pers_dev) if pers_dev is not None else None
    if why is not None:
        raise ambiguous(info, selector, "persistent", why)
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
    described = live_dev or pers_dev
    if described is None:
        where = " or ".join(
            w
            for w, read in (("live", found.live_read), ("persistent", found.persistent_read))
            if read
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
    return Plan(live_dev, pers_dev, described, found.gone)


def ambiguous(info: DomainInfo, selector: Selector, where: str, why: str) -> AmbiguousDevice:
    """Which device of a definition is meant cannot be told: nothing is done."""
    return AmbiguousDevice(
        f"{selector.describe()}: cannot tell which device of the {where} definition is "
        f"meant: {why}; nothing was detached (name it by its persistent XML with its "
        "guest address, or detach one definition only)",
        domain=info.name,
        alias=selector.value if selector.kind == "alias" else None,
    )


def _user_alias(alias: str | None) -> bool:
    return alias is not None and alias.startswith("ua-")
