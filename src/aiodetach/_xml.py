"""Finding a device in a domain's XML, and naming it.

Everything here is pure (strings in, values out) so it is tested without a
hypervisor.  XML is parsed and serialised with `xml.etree.ElementTree`;
nothing is ever built by formatting user input into markup.  User-supplied
device XML is refused if it carries a DTD, so no entity tricks reach expat.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .errors import AmbiguousDevice, InvalidRequest

__all__ = [
    "At",
    "Definition",
    "DeviceRef",
    "Selector",
    "config_detach_cannot_pick",
    "describe",
    "ended_device",
    "find_device",
    "find_same_device",
    "has_alias",
    "list_devices",
    "names_device",
    "parse_definition",
    "same_identity",
    "selector_from",
]

SelectorKind = Literal["alias", "target", "mac", "xml"]
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_MAX_XML = 1 << 20


@dataclass(frozen=True, slots=True)
class Selector:
    """Which device the caller means; exactly one way of naming it."""

    kind: SelectorKind
    value: str

    def describe(self) -> str:
        if self.kind == "xml":
            return "device given as XML"
        return f"{self.kind}={self.value!r}"


Identity = tuple[object, ...]
Address = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True, slots=True)
class At:
    """The last part of an identity that its definition shares: where the
    device sits in the guest.

    Some identities may repeat within one definition: libvirt 9.0 defines and
    starts a domain with two interfaces of one MAC, two filesystems of one
    target, two shared-memory devices of one name, two guestfwd channels of
    one address and port, two leases of one lockspace and key, two PS/2 mice
    (see docs/libvirt-behaviour.md).  Each such device's identity is its shared
    one followed by ``At(its guest address)``, so that two of them never key
    one config detach, and so the other definition's copy is found by that
    address (``address`` is ``None`` when the device has none: then nothing
    tells it from its twins).
    """

    address: Address | None


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A device found in one definition of a domain.

    ``identity`` names the device within its domain by what *both*
    definitions carry (see `device_identity()`): equal for the live and
    the persistent copy of one device, different for two devices.  ``None``
    when nothing but an alias identifies it.  It is hashable, so it also keys
    per-device work (one persistent detach per device, whatever the caller
    called it).
    """

    tag: str
    alias: str | None
    xml: str
    description: str
    identity: Identity | None = None

    @property
    def identity_alone(self) -> Identity | None:
        """`identity` without the `At` a shared one ends with:
        what names the device whatever its twins do (a twin that leaves or
        arrives drops or adds the ``At``).  The journal knows a device by it."""
        return _split(self.identity)[0] if self.identity is not None else None


def _split(identity: Identity) -> tuple[Identity, At | None]:
    """An identity as (what names the device, ``At`` when that is shared)."""
    if identity and isinstance(identity[-1], At):
        return identity[:-1], identity[-1]
    return identity, None


@dataclass(frozen=True, slots=True)
class Definition:
    """The ``<devices>`` of one domain definition, parsed once.

    Concurrent callers share one read of a definition (`aiodetach._reads`),
    and with it one parse: in a mass detach each of N callers parsing the
    same XML was most of the CPU aiodetach added to raw libvirt.  The
    elements are only read, never changed.  Every function below takes it or
    the XML text.
    """

    devices: tuple[ET.Element, ...]
    shared: frozenset[Identity] = frozenset()
    """The identities that more than one device of the definition has (see `At`)."""
    platform: tuple[str, bool, tuple[str, ...]] = ("", False, ())
    """What decides how a PCIe slot hot-plugs (see `aiodetach._slots`):
    the machine type, whether ``<features><acpi/>`` is on, and the QEMU
    arguments passed through (``<qemu:commandline>``)."""


def parse_definition(domain_xml: str) -> Definition:
    """Parse a domain's XML (from libvirt) down to its devices."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - from libvirt, not the user
    found = root.find("devices")
    devices = tuple(found) if found is not None else ()
    seen: set[Identity] = set()
    shared: set[Identity] = set()
    for elem in devices:
        identity = _identity(elem)
        if identity is not None:
            (shared if identity in seen else seen).add(identity)
    return Definition(devices, frozenset(shared), _platform(root))


_QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def _platform(root: ET.Element) -> tuple[str, bool, tuple[str, ...]]:
    os_type = root.find("os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    acpi = root.find("features/acpi") is not None
    args = tuple(
        arg.get("value", "") for arg in root.iterfind(f"{_QEMU_NS}commandline/{_QEMU_NS}arg")
    )
    return machine, acpi, args


Domain = str | Definition
"""A domain definition: libvirt's XML, or that XML parsed (`Definition`)."""


def selector_from(
    *, alias: str | None, target: str | None, mac: str | None, xml: str | None
) -> Selector:
    """Validate the caller's selector arguments: exactly one, non-empty, a string."""
    given = [
        (k, v)
        for k, v in (("alias", alias), ("target", target), ("mac", mac), ("xml", xml))
        if v is not None
    ]
    if len(given) != 1:
        raise InvalidRequest(
            f"name the device with exactly one of alias=, target=, mac= or xml= (got {len(given)})"
        )
    kind, value = given[0]
    if not isinstance(value, str):
        raise InvalidRequest(f"{kind} must be a string, not {type(value).__name__}")
    if kind != "xml" and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidRequest(f"{kind}={value!r} contains control characters")
    value = value.strip()
    if not value:
        raise InvalidRequest(f"{kind} must not be empty")
    if kind == "mac":
        value = value.lower()
        if not _MAC.match(value):
            raise InvalidRequest(f"mac={value!r} is not a MAC address like 52:54:00:12:34:56")
    elif kind == "xml":
        _parse_user_xml(value)
    elif any(c.isspace() or ord(c) < 32 for c in value) or len(value) > 256:
        raise InvalidRequest(f"{kind}={value!r} is not a valid device {kind}")
    return Selector(kind, value)  # type: ignore[arg-type]


def _parse_user_xml(text: str) -> ET.Element:
    if len(text) > _MAX_XML:
        raise InvalidRequest("device XML is larger than 1 MiB")
    if "<!" in text:
        raise InvalidRequest("device XML must not contain a DTD, entities or CDATA")
    try:
        return ET.fromstring(text)  # noqa: S314 - DTDs refused above
    except ET.ParseError as exc:
        raise InvalidRequest(f"malformed device XML: {exc}") from None


def _alias_of(elem: ET.Element) -> str | None:
    node = elem.find("alias")
    return node.get("name") if node is not None else None


def _describe(elem: ET.Element) -> str:
    parts = [elem.tag]
    if elem.tag == "disk":
        target = elem.find("target")
        if target is not None and target.get("dev"):
            parts.append(f"target={target.get('dev')!r}")
    elif elem.tag == "interface":
        mac = elem.find("mac")
        if mac is not None and mac.get("address"):
            parts.append(f"mac={mac.get('address')!r}")
    elif elem.tag == "controller":
        parts.append(f"type={elem.get('type')!r} index={elem.get('index')!r}")
    alias = _alias_of(elem)
    if alias:
        parts.append(f"alias={alias!r}")
    return " ".join(parts)


def _hostdev_source_key(elem: ET.Element) -> tuple[tuple[str, str], ...] | None:
    address = elem.find("source/address")
    if address is None:
        return None
    return tuple(sorted((k, _norm_int(v)) for k, v in address.attrib.items()))


def _norm_int(value: str) -> str:
    try:
        return str(int(value, 0))
    except ValueError:
        return value


def _matcher(sel: Selector) -> tuple[str | None, object]:
    """Turn a selector into (tag or None, key) compared against each device."""
    if sel.kind == "alias":
        return None, ("alias", sel.value)
    if sel.kind == "target":
        return "disk", ("target", sel.value)
    if sel.kind == "mac":
        return "interface", ("mac", sel.value)
    elem = _parse_user_xml(sel.value)
    alias = _alias_of(elem)
    if alias:
        return None, ("alias", alias)
    if elem.tag == "disk" and elem.find("target") is not None:
        return "disk", ("target", elem.find("target").get("dev"))  # type: ignore[union-attr]
    if elem.tag == "interface" and elem.find("mac") is not None:
        return "interface", ("mac", (elem.find("mac").get("address") or "").lower())  # type: ignore[union-attr]
    if elem.tag == "hostdev" and _hostdev_source_key(elem) is not None:
        return "hostdev", ("hostdev", _hostdev_source_key(elem))
    raise InvalidRequest(
        f"cannot tell which <{elem.tag}> this XML means: give it an <alias>, a disk <target>, "
        "an interface <mac> or a hostdev <source><address>"
    )


def _key_of(elem: ET.Element, kind: str) -> object:
    if kind == "alias":
        return ("alias", _alias_of(elem))
    if kind == "target":
        target = elem.find("target")
        return ("target", target.get("dev") if target is not None else None)
    if kind == "mac":
        mac = elem.find("mac")
        return ("mac", (mac.get("address") or "").lower() if mac is not None else None)
    return ("hostdev", _hostdev_source_key(elem))


def find_device(domain_xml: Domain, sel: Selector) -> DeviceRef | None:
    """Return the device ``sel`` names in ``domain_xml``, or ``None``.

    Raises `AmbiguousDevice` when a MAC or device XML names more than
    one device (libvirt accepts two interfaces with one MAC) and nothing in
    the selector tells them apart: an ``xml=`` that carries the guest
    ``<address>`` of one of them does.  An alias names the first device that
    carries it (a console and the first serial port share ``serial0``).
    """
    tag, key = _matcher(sel)
    kind = key[0] if isinstance(key, tuple) else "alias"
    definition = _definition(domain_xml)
    matches = [
        elem
        for elem in definition.devices
        if (tag is None or elem.tag == tag) and _key_of(elem, str(kind)) == key
    ]
    if not matches:
        return None
    if kind == "alias" or len(matches) == 1:
        return _ref(matches[0], definition)
    address = _guest_address(_parse_user_xml(sel.value)) if sel.kind == "xml" else None
    at_address = [elem for elem in matches if _guest_address(elem) == address]
    if address is not None and len(at_address) == 1:
        return _ref(at_address[0], definition)
    raise AmbiguousDevice(
        f"{len(matches)} devices match it"
        + (
            f" and {len(at_address) or 'none'} of them the guest address given"
            if address is not None
            else ", and it gives no guest <address> to tell them apart"
        )
    )


def ended_device(tag: str | None, alias: str, identity: Identity | None) -> DeviceRef:
    """A device already unplugged, known by what its unplug kept: its tag,
    alias and identity (its XML is gone with it, so ``xml`` is empty).

    A caller whose read came after another caller's unplug removed the
    device shares that unplug (see `aiodetach._recent`).
    """
    tag = tag or "device"  # an unplug taken up from the journal keeps no tag
    return DeviceRef(tag, alias, "", describe(tag, alias, identity), identity)


def describe(tag: str, alias: str | None, identity: Identity | None) -> str:
    """A device described from its tag, alias and identity alone, in the words
    `_describe()` finds in its XML (for disks, interfaces, controllers and
    the rest; a MAC lower-cased).  A waiting caller holds no description of
    its own when this gives the same (see ``aiodetach._call.Progress``)."""
    parts = [tag]
    if identity is not None:
        identity = _split(identity)[0]
    if identity is not None and len(identity) == 2 and tag in ("disk", "interface"):
        parts.append(f"{'target' if tag == 'disk' else 'mac'}={identity[1]!r}")
    elif (
        identity is not None
        and len(identity) == 3
        and tag == "controller"
        and identity[1] != "address"  # a controller without an index: by guest address
    ):
        parts.append(f"type={identity[1]!r} index={identity[2]!r}")
    if alias:
        parts.append(f"alias={alias!r}")
    return " ".join(parts)


def names_device(sel: Selector, tag: str | None, alias: str, identity: Identity | None) -> bool:
    """Whether ``sel`` names the device with this tag, alias and identity,
    without its XML (a device already unplugged: see `ended_device()`).

    By alias, disk target or MAC, as `find_device()` would match them; a
    hostdev named by its XML by the identity of that XML (its source).
    """
    want_tag, key = _matcher(sel)
    if want_tag is not None and want_tag != tag:
        return False
    assert isinstance(key, tuple)
    kind, value = key
    if kind == "alias":
        return bool(alias == value)
    if identity is None:
        return False
    if kind in ("target", "mac"):
        return _split(identity)[0] == (tag, value)
    # A hostdev named by its XML: by the identity that XML gives (its source).
    return _identity(_parse_user_xml(sel.value)) == _split(identity)[0]


def has_alias(domain_xml: Domain, alias: str) -> bool:
    """True if any device of ``domain_xml`` carries ``alias`` (the re-check after a timeout)."""
    return any(
        node.get("name") == alias
        for elem in _devices(domain_xml)
        for node in elem.iterfind("alias")
    )


def list_devices(domain_xml: Domain) -> list[DeviceRef]:
    """Every device of ``domain_xml``, in document order, with its identity.

    ``<emulator>`` sits among the devices but is the path of the QEMU binary,
    not a device: it is left out.
    """
    definition = _definition(domain_xml)
    return [_ref(elem, definition) for elem in definition.devices if elem.tag != "emulator"]


def find_same_device(
    domain_xml: Domain, dev: DeviceRef, own: Domain | None = None
) -> DeviceRef | None:
    """The device in ``domain_xml`` (the *other* definition) that is ``dev``.

    Why this exists: a device has a live and a persistent definition, and
    libvirt-assigned aliases (``virtio-disk1``, ``scsi0-0-0-2``, ``net0``,
    ``hostdev0``, ``pci.1``) exist only in the live one; only user aliases
    (``ua-…``) are in both.  Looking the caller's alias up in each definition
    separately finds a device live and silently misses it in the persistent
    definition.  Instead the device found in one definition is looked for in
    the other by what identifies it *there*:

    1. the same alias on a device with the same tag, when ``domain_xml``
       carries it (a user alias, or a re-read of the same live definition).
       A libvirt-assigned alias whose device has a *different* identity is
       not trusted: libvirt re-issues those (a new disk on the same SCSI unit
       gets the same ``scsi0-0-0-N``), a user alias is the user's name for it;
    2. else the one device with the same tag and the same identity (disk
       target, MAC, hostdev source, controller type and index, guest address,
       …);
    3. where that identity is shared, in either definition (two interfaces
       with one MAC), the one of them at ``dev``'s guest address.

    ``None`` when neither finds it or ``dev`` has no identity, and when no
    twin is at ``dev``'s address but each is at the address of another
    device of ``own`` (``dev``'s own definition) that shares the identity: a
    second NIC with the MAC of the first, hot-plugged live only, is in the
    persistent definition under no name.  `AmbiguousDevice` when the
    twins cannot be told apart (no address, the address twice, a twin at no
    address ``own`` explains): detaching a guess from the persistent
    definition would remove the wrong device for good, and taking it for
    absent would leave one half done in silence.
    """
    definition = _definition(domain_xml)
    same_tag = [elem for elem in definition.devices if elem.tag == dev.tag]
    if dev.alias:
        for elem in same_tag:
            if _alias_of(elem) != dev.alias:
                continue
            ref = _ref(elem, definition)
            if (
                dev.alias.startswith("ua-")
                or ref.identity is None
                or dev.identity is None
                or same_identity(ref, dev)
            ):
                return ref
    if dev.identity is None:
        return None
    base, at = _split(dev.identity)
    twins = [elem for elem in same_tag if _identity(elem) == base]
    if not twins:
        return None
    if len(twins) == 1 and at is None:
        return _ref(twins[0], definition)
    address = _address_of(dev)
    at_address = [elem for elem in twins if _guest_address(elem) == address]
    if address is not None and len(at_address) == 1:
        return _ref(at_address[0], definition)
    if address is not None and not at_address and own is not None:
        # None at its address: each twin may be another device of ``own`` at
        # its own address, and then ``dev`` is simply not in ``domain_xml``.
        elsewhere = {
            _guest_address(elem)
            for elem in _devices(own)
            if elem.tag == dev.tag and _identity(elem) == base
        } - {address}
        if all(_guest_address(elem) in elsewhere for elem in twins):
            return None
    what = describe(dev.tag, None, base)
    if address is None:
        why = "it has no guest address to tell them apart"
    elif at_address:
        why = "several of them are at its guest address"
    else:
        why = "none of them is at its guest address"
    several = f"{len(twins)} devices are" if len(twins) > 1 else "one device is"
    raise AmbiguousDevice(f"{several} {what} and {why}")


def same_identity(one: DeviceRef, other: DeviceRef) -> bool:
    """Whether ``one`` and ``other`` are one device by their identities (the
    same definition read twice, or each in one definition): the same
    identity, and where either definition shares it, the same guest address."""
    if one.identity is None or other.identity is None:
        return False
    (base, at), (other_base, other_at) = _split(one.identity), _split(other.identity)
    if base != other_base:
        return False
    if at is None and other_at is None:
        return True
    address = _address_of(one)
    return address is not None and address == _address_of(other)


def config_detach_cannot_pick(dev: DeviceRef) -> str | None:
    """Why libvirt's config detach cannot be trusted to remove ``dev`` (a
    device of the persistent definition) and not a twin, or ``None`` when it can.

    libvirt finds the device to remove from the persistent definition by
    what the device XML gives.  For an interface (MAC and guest address) and
    a shared-memory device (the whole definition) that tells two twins
    apart; a filesystem it finds by its target and a lease by its lockspace
    and key alone, and removes the *first* one (measured on libvirt 9.0: the
    config detach of the second of two filesystems with one target removed
    the first).  So a shared identity of those is refused before anything is
    sent.
    """
    if dev.identity is None or _split(dev.identity)[1] is None:
        return None
    by = _BY_IDENTITY_ALONE.get(dev.tag)
    if by is None:
        return None
    return f"libvirt's config detach finds a {dev.tag} by its {by} alone and removes the first"


_BY_IDENTITY_ALONE = {"filesystem": "target", "lease": "lockspace and key"}


def _address_of(dev: DeviceRef) -> Address | None:
    """``dev``'s guest address: kept in its identity when the identity is
    shared, else read from its XML (a device already unplugged has none)."""
    if dev.identity is not None:
        at = _split(dev.identity)[1]
        if at is not None:
            return at.address
    if not dev.xml:
        return None
    return _guest_address(ET.fromstring(dev.xml))  # noqa: S314 - serialised by _ref


def _definition(domain_xml: Domain) -> Definition:
    if isinstance(domain_xml, Definition):
        return domain_xml
    return parse_definition(domain_xml)


def _devices(domain_xml: Domain) -> tuple[ET.Element, ...]:
    return _definition(domain_xml).devices


def _ref(elem: ET.Element, definition: Definition) -> DeviceRef:
    """``elem`` of ``definition``, with its identity there: where another
    device of that definition has the same identity, its guest address is
    added (see `At`)."""
    identity = _identity(elem)
    if identity is not None and identity in definition.shared:
        identity = (*identity, At(_guest_address(elem)))
    return DeviceRef(
        tag=elem.tag,
        alias=_alias_of(elem),
        xml=ET.tostring(elem, encoding="unicode"),
        description=_describe(elem),
        identity=identity,
    )


# --- identity -------------------------------------------------------------
#
# What names a device within one domain *in both definitions*.  Each rule
# uses only what libvirt writes into the persistent definition too (guest
# addresses, USB ports and DIMM slots are assigned when the domain is
# defined), never the alias and never what only a running domain shows.
# Measured on libvirt 9.0 / QEMU 7.2, live-only are: every libvirt alias, a
# DIMM's ``base``, a channel's ``state``, a chardev's allocated ``<source
# path>`` (pty, unix socket), a disk's ``<source index>``/``<backingStore>``,
# a redirdev source's ``tls``, a graphics ``port``, a video's ``primary``.
# Not measurable here (no host USB, no vhost-vsock), left out by libvirt's
# design: the host bus/device a USB hostdev named by vendor/product resolves
# to at start, and an automatic vsock CID.

_Key = tuple[object, ...]
_LIVE_ONLY_ADDRESS_ATTRS = frozenset({"base"})  # DIMM base: chosen by QEMU at start
_HOSTDEV_SOURCE_ATTRS = ("protocol", "name", "wwpn")
_HOSTDEV_SOURCE_CHILDREN = (
    "vendor",
    "product",
    "address",
    "adapter",
    "host",
    "block",
    "char",
    "interface",
)


def _identity(elem: ET.Element) -> Identity | None:
    rule = _RULES.get(elem.tag)
    key = rule(elem) if rule is not None else None
    if key is not None:
        return (elem.tag, *key)
    # Any other device: its guest address, stored in both definitions.
    address = _guest_address(elem)
    if address is not None:
        return (elem.tag, "address", address)
    return None


def _norm(value: str | None) -> str | None:
    """Numbers in decimal (``0x0a`` == ``10``), other values lower-cased."""
    if value is None:
        return None
    return _norm_int(value.strip()).lower()


def _attrs(
    node: ET.Element | None, drop: frozenset[str] = frozenset()
) -> tuple[tuple[str, str | None], ...] | None:
    if node is None:
        return None
    return tuple(sorted((k, _norm(v)) for k, v in node.attrib.items() if k not in drop))


def _guest_address(elem: ET.Element) -> Address | None:
    """The device's own ``<address>`` (not one inside ``<source>``), all attributes."""
    return _attrs(elem.find("address"), _LIVE_ONLY_ADDRESS_ATTRS)


def _get(elem: ET.Element, path: str, attr: str) -> str | None:
    node = elem.find(path)
    return node.get(attr) if node is not None else None


def _disk(elem: ET.Element) -> _Key | None:
    dev = _get(elem, "target", "dev")
    return (dev,) if dev else None


def _interface(elem: ET.Element) -> _Key | None:
    mac = _get(elem, "mac", "address")
    return (mac.strip().lower(),) if mac else None


def _hostdev(elem: ET.Element) -> _Key | None:
    source = elem.find("source")
    if source is None:
        return None
    children: tuple[str, ...] = _HOSTDEV_SOURCE_CHILDREN
    if elem.get("type") == "usb" and (
        source.find("vendor") is not None or source.find("product") is not None
    ):
        # libvirt resolves vendor/product to a host bus/device when the domain
        # starts and writes that <address> into the live <source> only.
        children = ("vendor", "product")
    parts: list[object] = [
        (name, _norm(source.get(name))) for name in _HOSTDEV_SOURCE_ATTRS if source.get(name)
    ]
    for tag in children:
        parts.extend((tag, _attrs(node), (node.text or "").strip()) for node in source.findall(tag))
    if not parts:
        return None
    return (elem.get("mode") or "subsystem", elem.get("type"), tuple(parts))


def _controller(elem: ET.Element) -> _Key | None:
    index = elem.get("index")
    return (elem.get("type"), _norm(index)) if index is not None else None


def _filesystem(elem: ET.Element) -> _Key | None:
    target = _get(elem, "target", "dir")
    return (target,) if target else None


def _channel(elem: ET.Element) -> _Key | None:
    # A virtio channel is named; a guestfwd one has an address and port.  The
    # live <target> adds state='connected|disconnected': left out.
    target = elem.find("target")
    if target is None:
        return None
    key = tuple(_norm(target.get(a)) for a in ("name", "address", "port"))
    if key == (None, None, None):
        return None
    return (target.get("type"), *key)


def _chardev_port(elem: ET.Element) -> _Key | None:
    # serial, parallel, console: one per target type and port.  A console's
    # port 0 is the first serial port (the two share a live alias); further
    # virtio consoles are numbered by position, so libvirt renumbers them if
    # an earlier console leaves one definition only.
    target = elem.find("target")
    port = target.get("port") if target is not None else None
    if target is None or port is None:
        return None
    return (target.get("type"), _norm(port))


def _redirdev(elem: ET.Element) -> _Key | None:
    return (elem.get("bus"), elem.get("type"), _guest_address(elem))


def _memory(elem: ET.Element) -> _Key | None:
    address = _guest_address(elem)  # DIMM slot (``base`` is live-only)
    return (elem.get("model"), address) if address is not None else None


def _shmem(elem: ET.Element) -> _Key | None:
    name = elem.get("name")
    return (name,) if name else None


def _by_model(elem: ET.Element) -> _Key | None:
    # At most one per domain (libvirt refuses a second); an automatic vsock
    # CID is chosen at start and shows only in the live XML, so not the CID.
    return (elem.get("model"),)


def _tpm(elem: ET.Element) -> _Key | None:
    return (elem.get("model"), _get(elem, "backend", "type"))


def _input(elem: ET.Element) -> _Key | None:
    source = elem.find("source")
    path = None if source is None else (source.get("evdev") or source.get("dev"))
    return (elem.get("type"), elem.get("bus"), path, _guest_address(elem))


def _model_and_address(elem: ET.Element) -> _Key | None:
    # watchdog, panic: an ISA one has no address, a PCI one has.
    return (elem.get("model"), _guest_address(elem))


def _video(elem: ET.Element) -> _Key | None:
    # Model and address: a ``none`` or ``ramfb`` video has no PCI address and
    # is the only one of its model.
    return (_get(elem, "model", "type"), _guest_address(elem))


def _graphics(elem: ET.Element) -> _Key | None:
    return (elem.get("type"),)  # one per type; the live XML adds the port


def _audio(elem: ET.Element) -> _Key | None:
    audio_id = elem.get("id")
    return (_norm(audio_id),) if audio_id is not None else None


def _lease(elem: ET.Element) -> _Key | None:
    lockspace, key = (elem.findtext(tag, "").strip() for tag in ("lockspace", "key"))
    return (lockspace, key) if key else None


_RULES: dict[str, Callable[[ET.Element], _Key | None]] = {
    "disk": _disk,
    "interface": _interface,
    "hostdev": _hostdev,
    "controller": _controller,
    "filesystem": _filesystem,
    "channel": _channel,
    "serial": _chardev_port,
    "parallel": _chardev_port,
    "console": _chardev_port,
    "redirdev": _redirdev,
    "memory": _memory,
    "shmem": _shmem,
    "vsock": _by_model,
    "iommu": _by_model,
    "memballoon": _by_model,
    "tpm": _tpm,
    "input": _input,
    "watchdog": _model_and_address,
    "panic": _model_and_address,
    "video": _video,
    "graphics": _graphics,
    "audio": _audio,
    "lease": _lease,
}
