"""The command line's look at a domain before (or instead of) detaching:
virsh's domain IDs, ``--current``, and ``--dry-run``.

All three only read, through the service's own connection and the very
functions a detach uses to find and plan its device (`find_devices`,
`plan_devices`), so a dry run shows what the detach would pick, not a
second opinion.  ``--dry-run`` opens the service read-only: libvirt itself
refuses any change on such a connection.
"""

from __future__ import annotations

from ._cli_json import DryRun, DryRunHalf
from ._errors_map import map_error
from ._rules import check_flags, domain_ref, find_devices, halves, plan_devices
from ._service import DetachService
from ._xml import DeviceRef, selector_from
from .backend import BackendError, DomainInfo
from .errors import DetachRefused

__all__ = ["current_halves", "look_up", "preview", "resolve_domain"]


async def resolve_domain(svc: DetachService, ref: str) -> str:
    """``ref`` as one domain's UUID when it is a number (the library reads a
    number as virsh does, a running domain's ID first, then a name; an ID
    names one run of a domain only, and ``watch`` filters events by the
    domain), else as given."""
    ref = ref.strip()
    if not (ref.isascii() and ref.isdigit()):
        return ref
    return (await _info(svc, ref)).uuid


async def _info(svc: DetachService, ref: str) -> DomainInfo:
    conn = svc._conn
    assert conn is not None
    try:
        return await conn.lookup(domain_ref(ref))
    except BackendError as err:
        raise map_error(err, domain=ref, alias=None, action="domain lookup") from None


async def look_up(svc: DetachService, ref: str) -> None:
    """`DomainNotFound` if no domain is ``ref``: ``watch`` checks its domain
    first, as virsh's ``event --domain`` does (its filter alone would wait for
    a mistyped name's events for ever)."""
    await _info(svc, ref)


async def current_halves(svc: DetachService, ref: str) -> tuple[bool, bool]:
    """virsh's ``--current``: the running guest if the domain runs, else its
    persistent definition."""
    info = await _info(svc, ref)
    return (True, False) if info.state.is_active else (False, True)


async def preview(
    svc: DetachService,
    ref: str,
    *,
    alias: str | None,
    target: str | None,
    mac: str | None,
    xml: str | None,
    live: bool | None,
    persistent: bool | None,
) -> DryRun:
    """What ``detach`` would do, found as it finds it; nothing is sent."""
    check_flags(domain_ref(ref), live, persistent)
    selector = selector_from(alias=alias, target=target, mac=mac, xml=xml)
    info = await _info(svc, ref)
    conn = svc._conn
    assert conn is not None
    do_live, do_persistent = halves(info, live, persistent)
    try:
        live_xml = await conn.definition(info.uuid, inactive=False) if do_live else None
        pers_xml = await conn.definition(info.uuid, inactive=True) if do_persistent else None
    except BackendError as err:
        raise map_error(err, domain=info.name, alias=None, action="reading the XML") from None
    found = find_devices(info, selector, live_xml, pers_xml)
    plan = plan_devices(info, selector, live, persistent, found)
    live_half = None
    if plan.live is not None:
        if plan.live.alias is None:
            raise DetachRefused(
                "the device has no alias in the live XML, so libvirt cannot unplug it: "
                "the detach would do the persistent half (if asked), then fail so",
                domain=info.name,
            )
        live_half = _half(
            plan.live, f"virDomainDetachDeviceAlias({plan.live.alias!r}, VIR_DOMAIN_AFFECT_LIVE)"
        )
    pers_half = None
    if plan.persistent is not None:
        pers_half = _half(
            plan.persistent, "virDomainDetachDeviceFlags(<xml>, VIR_DOMAIN_AFFECT_CONFIG)"
        )
    return DryRun(
        uri=svc.uri,
        domain_uuid=info.uuid,
        domain_name=info.name,
        running=info.state.is_active,
        live=live_half,
        persistent=pers_half,
    )


def _half(device: DeviceRef, request: str) -> DryRunHalf:
    identity = device.identity_alone
    return DryRunHalf(
        device=device.description,
        alias=device.alias,
        identity=None if identity is None else _identity_text(identity),
        request=request,
        xml=device.xml,
    )


def _identity_text(identity: tuple[object, ...]) -> str:
    """An identity tuple, e.g. ``('disk', 'vdb')``, as ``disk vdb``."""
    return " ".join(_part(p) for p in identity)


def _part(part: object) -> str:
    if isinstance(part, tuple):
        return " ".join(_part(p) for p in part)
    return str(part)
