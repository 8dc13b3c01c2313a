"""What ``aiodetach … --json`` prints: one JSON object per line, each of a
documented type.

The models here are used both to emit the objects (every line goes through
`line`) and to document them (`schema_markdown` writes the field
tables of ``docs/cli.md``; a test checks the page holds exactly that), so the
page cannot drift from what the command prints.  Scripts branch on ``type``
and can check ``schema_version``: it changes only when a field is removed or
changes meaning (fields may be added within a version).
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ._result import DetachResult
from .errors import DetachError, DetachTimeout

__all__ = [
    "SCHEMA_VERSION",
    "BatchDetached",
    "BatchFailed",
    "BatchSummary",
    "DetachFailure",
    "DetachSuccess",
    "DryRun",
    "DryRunHalf",
    "ErrorInfo",
    "Interrupted",
    "InterruptedSummary",
    "Output",
    "ResultInfo",
    "WatchEvent",
    "error_info",
    "line",
    "result_info",
    "schema_markdown",
]

SCHEMA_VERSION: Final = 1


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Versioned(_Out):
    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="Version of this schema."
    )


class ResultInfo(_Out):
    """The fields of a detach that succeeded (the library's ``DetachResult``)."""

    domain_uuid: str = Field(description="The domain's UUID.")
    domain_name: str = Field(description="The domain's name.")
    alias: str | None = Field(description="Live alias of the device (null: it had none).")
    device: str = Field(description="The device, e.g. \"disk target='vdb'\".")
    live: bool = Field(description="Removed from the running guest by this command.")
    persistent: bool = Field(description="Removed from the persistent definition.")
    attempts: int = Field(description="Live detach requests sent.")
    elapsed: float = Field(description="Seconds from the start of the detach to its end.")
    confirmed_by: Literal["event", "xml"] | None = Field(
        description="How the live removal was learnt: DEVICE_REMOVED, or the live XML "
        "re-read (the event was lost); null when there was no live half."
    )
    joined: bool = Field(description="Joined a detach of the same device already in flight.")
    resumed: bool = Field(description="Joined an unplug taken up from the journal.")


class ErrorInfo(_Out):
    """The fields of a detach that failed (a ``DetachError``)."""

    error: str = Field(description="The error class, e.g. DetachTimeout (see errors.md).")
    message: str = Field(description="What went wrong, for a person.")
    domain: str | None = Field(description="The domain concerned, when known.")
    alias: str | None = Field(description="The device alias concerned, when known.")
    libvirt_code: int | None = Field(description="libvirt's VIR_ERR_* code, when from libvirt.")
    persistent_done: bool = Field(
        description="The device was already removed from the persistent definition when "
        "the live half failed: the next cold boot will not have it."
    )
    attempts: int | None = Field(
        description="Live detach requests sent before the failure (null: not known)."
    )
    elapsed: float | None = Field(description="Seconds until the failure (null: not known).")


class DetachSuccess(_Versioned, ResultInfo):
    """``detach``: the device is gone (exit 0)."""

    type: Literal["result"] = Field(default="result", description='"result"')
    ok: Literal[True] = Field(default=True, description="true")
    uri: str = Field(description="The host's libvirt URI.")


class DetachFailure(_Versioned, ErrorInfo):
    """Any command that failed as a whole, including a usage error (error
    ``UsageError``, exit 2): printed instead of its result."""

    type: Literal["error"] = Field(default="error", description='"error"')
    ok: Literal[False] = Field(default=False, description="false")
    exit_code: int = Field(description="The command's exit status.")
    uri: str | None = Field(description="The host's libvirt URI (null: not yet known).")


class _InBatch(_Versioned):
    type: Literal["outcome"] = Field(default="outcome", description='"outcome"')
    index: int = Field(description="The request's position in the batch (0-based, its line).")
    request: dict[str, Any] = Field(
        description="The request as read (keys of DetachRequest, those given)."
    )
    uri: str = Field(description="The host it was sent to.")


class BatchDetached(_InBatch, ResultInfo):
    """``detach-many``: a device of the batch was detached (printed as it
    ends): the fields of a ``result``, with the request's."""

    ok: Literal[True] = Field(default=True, description="true")


class BatchFailed(_InBatch, ErrorInfo):
    """``detach-many``: a device of the batch was not detached (printed as it
    ends): the fields of an ``error``, with the request's."""

    ok: Literal[False] = Field(default=False, description="false")


class BatchSummary(_Versioned):
    """``detach-many``: the last line, once every device has ended."""

    type: Literal["summary"] = Field(default="summary", description='"summary"')
    total: int = Field(description="Requests in the batch.")
    detached: int = Field(description="Devices detached.")
    failed: int = Field(description="Devices not detached.")
    exit_code: int = Field(description="The command's exit status (0, or 12: some failed).")


class WatchEvent(_Versioned):
    """``watch``: one device event."""

    type: Literal["event"] = Field(default="event", description='"event"')
    kind: Literal["device-removed", "device-removal-failed", "domain-stopped"] = Field(
        description="What happened."
    )
    domain_uuid: str = Field(description="The domain's UUID.")
    domain: str = Field(description="The domain's name.")
    alias: str | None = Field(description="The device alias (null for domain-stopped).")
    detail: str | None = Field(description="libvirt's detail (domain-stopped: why).")
    timestamp: float = Field(description="When it was received (Unix time).")


class DryRunHalf(_Out):
    """One definition's part of a dry run."""

    device: str = Field(description="The device found, e.g. \"disk target='vdb'\".")
    alias: str | None = Field(description="Its alias in this definition (null: none).")
    identity: str | None = Field(
        description="What names it in both definitions (target, MAC, source, address)."
    )
    request: str = Field(description="The libvirt call that would be made.")
    xml: str = Field(description="The device's XML in this definition.")


class DryRun(_Versioned):
    """``detach --dry-run``: what would be done; nothing was."""

    type: Literal["dry_run"] = Field(default="dry_run", description='"dry_run"')
    uri: str = Field(description="The host's libvirt URI.")
    domain_uuid: str = Field(description="The domain's UUID.")
    domain_name: str = Field(description="The domain's name.")
    running: bool = Field(description="The domain runs (or is paused).")
    live: DryRunHalf | None = Field(description="The running guest's device (null: not touched).")
    persistent: DryRunHalf | None = Field(
        description="The persistent definition's device (null: not touched)."
    )


class Interrupted(_Versioned):
    """``detach`` and ``detach-many`` ended by SIGINT or SIGTERM: what happened to
    one device, one line each in the batch's order (after the lines already
    printed), then an ``interrupted_summary``."""

    type: Literal["interrupted"] = Field(default="interrupted", description='"interrupted"')
    request: dict[str, Any] | None = Field(
        description="The batch line, or the command's device options, as given."
    )
    domain: str | None = Field(description="The domain's name once known, else as given.")
    alias: str | None = Field(description="The live alias once known, else as given.")
    state: Literal[
        "removed",
        "failed",
        "request_outstanding",
        "persistent_changed",
        "unchanged",
        "not_started",
    ] = Field(description="What happened (the table above).")
    persistent_changed: bool = Field(
        description="The persistent definition no longer has the device."
    )
    requests_sent: int = Field(description="Live requests that counted.")
    error: str | None = Field(description="For failed: the error's class, else null.")
    message: str | None = Field(description="For failed: the error's message, else null.")


class InterruptedSummary(_Versioned):
    """The last line of an interrupted command."""

    type: Literal["interrupted_summary"] = Field(
        default="interrupted_summary", description='"interrupted_summary"'
    )
    signal: Literal["SIGINT", "SIGTERM"] = Field(description="The signal that ended it.")
    exit_code: int = Field(description="The command's exit status (130 or 143).")
    devices: int = Field(description="Devices the command was asked about.")
    states: dict[str, int] = Field(description="How many devices ended in each state.")


def _tag(obj: Any) -> str:
    """Which model an object is: its ``type``, and for a batch line ``ok`` too."""
    kind = obj.get("type") if isinstance(obj, dict) else getattr(obj, "type", None)
    ok = obj.get("ok") if isinstance(obj, dict) else getattr(obj, "ok", None)
    return f"{kind}:{ok}" if kind == "outcome" else str(kind)


Output = Annotated[
    Union[  # noqa: UP007
        Annotated[DetachSuccess, Tag("result")],
        Annotated[DetachFailure, Tag("error")],
        Annotated[BatchDetached, Tag("outcome:True")],
        Annotated[BatchFailed, Tag("outcome:False")],
        Annotated[BatchSummary, Tag("summary")],
        Annotated[WatchEvent, Tag("event")],
        Annotated[DryRun, Tag("dry_run")],
        Annotated[Interrupted, Tag("interrupted")],
        Annotated[InterruptedSummary, Tag("interrupted_summary")],
    ],
    Discriminator(_tag),
]
"""Every object ``--json`` prints, told apart by ``type`` (and, for a batch's
lines, ``ok``)."""

DOCUMENTED: tuple[type[BaseModel], ...] = (
    DetachSuccess,
    DetachFailure,
    BatchDetached,
    BatchFailed,
    BatchSummary,
    WatchEvent,
    DryRun,
    DryRunHalf,
    Interrupted,
    InterruptedSummary,
)


def line(obj: BaseModel) -> str:
    """One object as its JSON line (no newline), ``schema_version`` and
    ``type`` first (a person reading a log sees what each line is)."""
    fields = obj.model_dump(mode="json")
    first = {key: fields.pop(key) for key in ("schema_version", "type", "ok") if key in fields}
    return json.dumps(first | fields)


def result_info(result: DetachResult) -> ResultInfo:
    return ResultInfo(**result.model_dump())


def error_info(
    exc: DetachError, *, attempts: int | None = None, elapsed: float | None = None
) -> ErrorInfo:
    """The fields of `ErrorInfo` for ``exc``; ``attempts``/``elapsed``
    as counted by the caller (a `DetachTimeout` knows its own attempts)."""
    if isinstance(exc, DetachTimeout) and exc.attempts:
        attempts = exc.attempts
    return ErrorInfo(
        error=type(exc).__name__,
        message=exc.message,
        domain=exc.domain,
        alias=exc.alias,
        libvirt_code=exc.libvirt_code,
        persistent_done=bool(exc.persistent_done),
        attempts=attempts,
        elapsed=None if elapsed is None else round(elapsed, 6),
    )


# -- the documentation -------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        nullable = type(None) in typing.get_args(annotation)
        return " or ".join(names) + (" or null" if nullable else "")
    if origin is dict:
        return "object"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"{annotation.__name__} object"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        annotation, str(annotation)
    )


def schema_markdown() -> str:
    """The field tables of ``docs/cli.md``, from the models themselves."""
    parts: list[str] = []
    for model in DOCUMENTED:
        doc = " ".join((model.__doc__ or "").split())
        fields = model.model_fields
        names: list[str] = [n for n in ("schema_version", "type", "ok") if n in fields]
        names += [n for n in fields if n not in names]
        rows = [
            f"| `{name}` | {_type_name(fields[name].annotation)} | {fields[name].description} |"
            for name in names
        ]
        parts.append(
            f"#### {model.__name__}\n\n{doc}\n\n| field | type | meaning |\n|---|---|---|\n"
            + "\n".join(rows)
        )
    return "\n\n".join(parts) + "\n"
