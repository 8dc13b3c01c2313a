"""``detach-many``'s batch file: one request per line, a JSON object or
``DOMAIN key=value …``.

Apart from `aiodetach._cli_args` (the options) so that each stays one
thing (and small).  A line is read strictly: a key given twice is a bad line,
never "the last one wins", since the key may be ``uri`` and a line must go
to the host it names and to no other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import InvalidRequest

__all__ = ["parse_batch"]


def parse_batch(text: str) -> list[dict[str, Any]]:
    """Batch lines: a JSON object, or ``DOMAIN key=value …`` (``#`` comments).

    Keys are those of [`aiodetach.DetachRequest`][aiodetach.DetachRequest] (``uri=`` sends the
    line to that host); ``live``/``persistent`` take true/false.  Each key
    once (``DOMAIN`` is the key ``domain``): a second one is a bad line, not
    the one that wins.

    """
    requests: list[dict[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("{", "[")):
            try:
                loaded = json.loads(line, object_pairs_hook=_once(number))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise InvalidRequest(f"line {number}: invalid JSON: {exc}") from None
            if not isinstance(loaded, dict):
                raise InvalidRequest(f"line {number}: expected a JSON object")
            requests.append(loaded)
            continue
        domain, *pairs = line.split()
        item: dict[str, Any] = {"domain": domain}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise InvalidRequest(f"line {number}: expected key=value, got {pair!r}")
            if key in item:
                raise InvalidRequest(_twice(number, key))
            if key in ("live", "persistent"):
                if value.lower() not in ("true", "false"):
                    raise InvalidRequest(f"line {number}: {key} must be true or false")
                item[key] = value.lower() == "true"
            else:
                item[key] = value
        requests.append(item)
    return requests


def _twice(number: int, key: str) -> str:
    return f"line {number}: {key!r} given twice (which one was meant?)"


def _once(number: int) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON object whose keys are each given once.  Python's JSON keeps the
    last of two: a line naming two hosts (or domains, or devices) would run
    on one of them in silence, so it is a bad line instead."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        made: dict[str, Any] = {}
        for key, value in pairs:
            if key in made:
                raise InvalidRequest(_twice(number, key))
            made[key] = value
        return made

    return build
