"""Helpers shared by the journal tests (fake hypervisor)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from aiodetach import DetachService, DetachSettings
from aiodetach.errors import ServiceClosed
from aiodetach.testing import FakeHypervisor


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
