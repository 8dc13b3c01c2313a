"""Helpers shared by the journal tests (fake hypervisor)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from aiodetach import DetachFleet, DetachService, DetachSettings
from aiodetach.errors import ServiceClosed
from aiodetach.testing import FakeHypervisor, Unplug


def journal_settings(**kw: object) -> DetachSettings:
    """Short windows, and commits that survive a process kill (enough here)."""
    base: dict[str, object] = {"attempts": 3, "timeout": 2.0, "journal_sync": "normal"}
    base.update(kw)
    return DetachSettings(**base)  # type: ignore[arg-type]


def journal_rows(path: Path) -> list[dict[str, object]]:
    """Every row of the journal at ``path``, read as another process would."""
    db = sqlite3.connect(path)
    try:
        cursor = db.execute("SELECT * FROM unplugs ORDER BY id")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    finally:
        db.close()


async def killed_mid_unplug(
    fake: FakeHypervisor, journal: Path, settings: DetachSettings, alias: str = "ua-d"
) -> None:
    """A service sends one request, then "dies" (closes) with it pending."""
    async with DetachService(backend=fake, settings=settings, journal=journal) as svc:
        task = asyncio.create_task(svc.detach("vm", alias=alias))
        while not fake.requests:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)
    with pytest.raises(ServiceClosed):
        await task


async def fleet_killed_mid_unplug(
    tmp_path: Path, settings: DetachSettings, unplug: Unplug | None = None
) -> tuple[dict[str, FakeHypervisor], Path]:
    """Two hosts behind one fleet journal, each with one request sent, and the
    fleet "dies" (closes) with both pending."""
    hosts = {uri: FakeHypervisor(uri) for uri in ("fake://a/system", "fake://b/system")}
    for fake in hosts.values():
        fake.add_domain("vm").add_disk(
            "vdb", alias="ua-d", unplug=unplug if unplug is not None else Unplug.manual()
        )
    journal = tmp_path / "j.db"
    async with DetachFleet(
        settings=settings, backend_factory=hosts.__getitem__, journal=journal
    ) as fleet:
        tasks = [asyncio.create_task(fleet.detach(uri, "vm", alias="ua-d")) for uri in hosts]
        while not all(f.requests for f in hosts.values()):
            await asyncio.sleep(0.005)
    await asyncio.gather(*tasks, return_exceptions=True)
    return hosts, journal


async def until_uris(fleet: DetachFleet, uris: list[str]) -> None:
    """Hosts with unfinished unplugs are connected to at entry, in the background."""
    for _ in range(300):
        if sorted(fleet.uris) == uris:
            return
        await asyncio.sleep(0.01)
    assert sorted(fleet.uris) == uris
