"""The value a successful detach returns."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DetachResult", "Recovered"]


class DetachResult(BaseModel):
    """What was detached, how, and what it cost.

    ``live`` and ``persistent`` say which parts were *actually* detached by this
    request, not which were asked for: with the defaults a device present only
    in the persistent definition comes back with ``live=False``.
    """

    model_config = ConfigDict(frozen=True)

    domain_uuid: str
    domain_name: str
    alias: str | None = Field(description="Live alias of the device (None if it had none).")
    device: str = Field(description="Human description, e.g. \"disk target='vdb'\".")
    live: bool = Field(description="The device was removed from the running guest.")
    persistent: bool = Field(description="The device was removed from the persistent definition.")
    attempts: int = Field(ge=0, description="Live detach requests sent to libvirt.")
    elapsed: float = Field(ge=0, description="Seconds from the call to its result.")
    confirmed_by: Literal["event", "xml"] | None = Field(
        default=None,
        description="How the live removal was learnt: libvirt's DEVICE_REMOVED event, or "
        "the live XML re-read after a timeout or reconnect (the event was lost).",
    )
    joined: bool = Field(
        default=False,
        description="This caller joined a detach of the same device already in flight.",
    )
    resumed: bool = Field(
        default=False,
        description="The unplug joined was taken up from the journal: an earlier run of "
        "this process sent its request(s) and none was sent again before its window ended.",
    )


class Recovered(BaseModel):
    """An unplug an earlier run of this process left unfinished in the journal,
    as ``open()`` found it (`aiodetach.DetachService.recovered()`).

    ``outcome``: ``"pending"`` (still attached; taken up, see
    ``svc.pending()``: a ``detach()`` of it joins it), ``"removed"`` (gone
    from the live XML: the guest finished while no agent ran), ``"stopped"``
    (the domain is gone, shut off or was re-started since: the request died
    with its QEMU process).
    """

    model_config = ConfigDict(frozen=True)

    domain_uuid: str
    domain_name: str
    alias: str
    device: str | None = Field(
        description="What identified the device, e.g. \"disk target='vdb'\"."
    )
    outcome: Literal["pending", "removed", "stopped"]
    confirmed_by: Literal["xml"] | None = None
    reason: str | None = Field(
        default=None, description="Why, when not plain: 'undefined', 'shut off', 'restarted'."
    )
    sent: int = Field(ge=0, description="Requests the earlier run(s) sent.")
    sent_at: float = Field(description="Wall-clock time (time.time()) of the last request.")
