"""Finding a device in a domain's XML, and naming it.

Everything here is pure (strings in, values out) so it is tested without a
hypervisor.  XML is parsed and serialised with :mod:`xml.etree.ElementTree`;
nothing is ever built by formatting user input into markup.  User-supplied
device XML is refused if it carries a DTD, so no entity tricks reach expat.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from .errors import InvalidRequest

__all__ = ["DeviceRef", "Selector", "find_device", "has_alias", "selector_from"]

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


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A device found in one definition of a domain."""

    tag: str
    alias: str | None
    xml: str
    description: str


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


def find_device(domain_xml: str, sel: Selector) -> DeviceRef | None:
    """Return the device ``sel`` names in ``domain_xml``, or ``None``."""
    tag, key = _matcher(sel)
    kind = key[0] if isinstance(key, tuple) else "alias"
    root = ET.fromstring(domain_xml)  # noqa: S314 - from libvirt, not the user
    devices = root.find("devices")
    if devices is None:
        return None
    for elem in devices:
        if tag is not None and elem.tag != tag:
            continue
        if _key_of(elem, str(kind)) == key:
            return DeviceRef(
                tag=elem.tag,
                alias=_alias_of(elem),
                xml=ET.tostring(elem, encoding="unicode"),
                description=_describe(elem),
            )
    return None


def has_alias(domain_xml: str, alias: str) -> bool:
    """True if any device of ``domain_xml`` carries ``alias`` (the re-check after a timeout)."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - from libvirt
    return any(node.get("name") == alias for node in root.iterfind("devices/*/alias"))
