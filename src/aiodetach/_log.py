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

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(self._struct, method)(event, **fields)
            return
        if not _stdlib.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        extra: dict[str, Any] = {"event": event}
        for key, value in fields.items():
            extra[key + "_" if key in _RESERVED else key] = value
        text = " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])
        # The text is a pre-formatted message, not a format string: no args.
        _stdlib.log(level, "%s", text, extra=extra, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)


_LOG: Final = Log()


def get_log() -> Log:
    """The library's one logger (every module uses it, none configures it)."""
    return _LOG
