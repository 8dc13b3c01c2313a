"""Where the library's log events go: the host's structlog, or stdlib ``logging``.

A library embedded in an agent must not write to the agent's stdout (some
agents speak a protocol there) nor configure anything process-wide.  An
*unconfigured* structlog prints every event to stdout, so the events only go
through structlog when the host configured it (its processors then see them
exactly as before); otherwise they become records of the stdlib ``aiodetach``
logger and the host's ``logging`` configuration decides: levels, handlers,
and silence until it configures anything (the ``NullHandler`` below keeps
``logging``'s last-resort handler from printing warnings to stderr, as the
logging HOWTO asks of libraries).

The choice is made at every call, because a host may configure structlog
after importing aiodetach; ``structlog.is_configured()`` is one attribute
read, and a stdlib record is built only when its level is enabled.

A stdlib record carries the event name in ``record.event`` and every field as
an attribute of the record (``record.domain``, ``record.alias``…; a field
whose name a ``LogRecord`` already uses, i.e. ``message``, gets a trailing
underscore); its message is the event name followed by ``key=value`` pairs,
readable under any format.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import structlog

__all__ = ["LOGGER_NAME", "Log", "get_log"]

LOGGER_NAME: Final = "aiodetach"

_stdlib = logging.getLogger(LOGGER_NAME)
_stdlib.addHandler(logging.NullHandler())

# Attributes every LogRecord has (plus the two Formatter adds): ``extra``
# may not overwrite them.
_RESERVED: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _value(v: object) -> str:
    if isinstance(v, str) and v and not any(c.isspace() or c in "='\"" for c in v):
        return v
    return repr(v) if isinstance(v, str) else str(v)


class Log:
    """structlog-style calls (``info("aiodetach.x", domain=…)``), routed per call."""

    __slots__ = ("_struct",)

    def __init__(self) -> None:
        self._struct = structlog.get_logger(LOGGER_NAME)

    # Each level tests structlog inline: the configured path, the one the
    # benchmarks and most structlog hosts take, is then one more call than a
    # direct structlog call.
    def debug(self, event: str, **fields: Any) -> None:
        if structlog.is_configured():
            self._struct.debug(event, **fields)
        elif _stdlib.isEnabledFor(logging.DEBUG):
            _to_stdlib(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if structlog.is_configured():
            self._struct.info(event, **fields)
        elif _stdlib.isEnabledFor(logging.INFO):
            _to_stdlib(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if structlog.is_configured():
            self._struct.warning(event, **fields)
        elif _stdlib.isEnabledFor(logging.WARNING):
            _to_stdlib(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if structlog.is_configured():
            self._struct.error(event, **fields)
        elif _stdlib.isEnabledFor(logging.ERROR):
            _to_stdlib(logging.ERROR, event, fields)


def _to_stdlib(level: int, event: str, fields: dict[str, Any]) -> None:
    exc_info = fields.pop("exc_info", None)
    extra: dict[str, Any] = {"event": event}
    for key, value in fields.items():
        extra[key + "_" if key in _RESERVED else key] = value
    text = " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])
    # The text is the message, not a format string (a value may hold a "%").
    # stacklevel 3: the record names the line that logged, not this module.
    _stdlib.log(level, "%s", text, extra=extra, exc_info=exc_info, stacklevel=3)


_LOG: Final = Log()


def get_log() -> Log:
    """The library's one logger (every module uses it, none configures it)."""
    return _LOG
