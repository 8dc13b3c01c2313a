"""Every kind of damage a row can carry is ``JournalCorrupt`` at ``open()``,
naming the file and the row, before libvirt is contacted: nothing is sent
for a row that cannot be read as what this aiodetach wrote."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.errors import JournalCorrupt
from aiodetach.testing import FakeHypervisor

from ._journal_files import execute, journal_with_pending_row, snapshot
from ._journal_support import journal_settings

DAMAGE: dict[str, str | tuple[str, ...]] = {
    "a newer version's column holding a value": (
        "ALTER TABLE unplugs ADD COLUMN lane TEXT",
        "UPDATE unplugs SET lane='fast'",
    ),
    "a timestamp that is not a number": "UPDATE unplugs SET sent_at='yesterday'",
    "a start that is not a number": "UPDATE unplugs SET started_at=x'00'",
    "an answer time that is text": "UPDATE unplugs SET answered_at='soon'",
    "an infinite timestamp": "UPDATE unplugs SET sent_at=9e999",
    "a count that is text": "UPDATE unplugs SET sent='one'",
    "a count that is a fraction": "UPDATE unplugs SET used=0.5",
    "no requests sent": "UPDATE unplugs SET sent=0",
    "negative attempts used": "UPDATE unplugs SET used=-1",
    "no attempts allowed": "UPDATE unplugs SET attempts=0",
    "a timeout that is not positive": "UPDATE unplugs SET timeout=-2",
    "a timeout that is text": "UPDATE unplugs SET timeout='2s'",
    "a flag that is not 0 or 1": "UPDATE unplugs SET persistent_done=7",
    "a uuid that is a blob": "UPDATE unplugs SET domain_uuid=x'6f1c'",
    "a uri that is a blob": "UPDATE unplugs SET uri=zeroblob(0)",
    "an empty alias": "UPDATE unplugs SET alias=''",
    "an alias that is a blob": "UPDATE unplugs SET alias=x'7561'",
    "a run id that is a blob": "UPDATE unplugs SET run_id=x'33'",
    "a device that is a blob": "UPDATE unplugs SET device=zeroblob(3)",
    "an unknown outcome": "UPDATE unplugs SET finished_at=1, outcome='vanished'",
    "an outcome without an end": "UPDATE unplugs SET outcome='removed'",
    "an end without an outcome": "UPDATE unplugs SET finished_at=1",
    "an unknown confirmation": (
        "UPDATE unplugs SET finished_at=1, outcome='removed', confirmed_by='guess'"
    ),
    "an end that is text": "UPDATE unplugs SET finished_at='done', outcome='removed'",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_damaged_row_is_journal_corrupt_before_libvirt(tmp_path: Path, damage: str) -> None:
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    change = DAMAGE[damage]
    execute(journal, *((change,) if isinstance(change, str) else change))
    before = snapshot(journal)
    fake = FakeHypervisor()
    fake.add_domain("vm").add_disk("vdb", alias="ua-d")
    with pytest.raises(JournalCorrupt) as caught:
        await DetachService(backend=fake, settings=journal_settings(), journal=journal).open()
    assert fake.calls == [], f"libvirt contacted for a damaged row: {fake.calls}"
    assert fake.requests == []
    assert snapshot(journal) == before
    message = caught.value.message
    assert str(journal) in message
    assert "row 1" in message, message
    assert caught.value.row == 1


async def test_a_null_where_the_journal_never_writes_one(tmp_path: Path) -> None:
    """A table rebuilt by hand without its NOT NULL constraints, holding a
    NULL: reported as the row's damage (before the declarations' difference)."""
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    db = sqlite3.connect(journal)
    [(table,)] = db.execute("SELECT sql FROM sqlite_master WHERE name='unplugs'").fetchall()
    db.close()
    loose = str(table).replace(" NOT NULL", "").replace("unplugs", "loose")
    execute(
        journal,
        loose,
        "INSERT INTO loose SELECT * FROM unplugs",
        "DROP TABLE unplugs",
        "ALTER TABLE loose RENAME TO unplugs",
        "UPDATE unplugs SET sent_at=NULL",
    )
    fake = FakeHypervisor()
    with pytest.raises(JournalCorrupt) as caught:
        await DetachService(backend=fake, settings=journal_settings(), journal=journal).open()
    assert "row 1: sent_at is None" in caught.value.message, caught.value.message
    assert fake.calls == []


async def test_a_damaged_finished_row_is_damage_too(tmp_path: Path) -> None:
    """Not only the unfinished rows: a finished row that is not what this
    aiodetach wrote means the file is not what it seems."""
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    execute(
        journal,
        "INSERT INTO unplugs SELECT 2, uri, domain_uuid, domain_name, run_id, alias, device, "
        "sent, used, sent_at, answered_at, timeout, attempts, persistent_done, started_at, "
        "1.0, 'removed', 'event' FROM unplugs",
        "UPDATE unplugs SET attempts='many' WHERE id=2",
    )
    fake = FakeHypervisor()
    with pytest.raises(JournalCorrupt) as caught:
        await DetachService(backend=fake, settings=journal_settings(), journal=journal).open()
    assert "row 2" in caught.value.message
    assert fake.calls == []


async def test_an_intact_journal_of_every_outcome_is_accepted(tmp_path: Path) -> None:
    """The counterpart: rows as this aiodetach writes them, finished in every
    way it finishes them, are accepted."""
    journal = tmp_path / "j.db"
    fake = await journal_with_pending_row(journal)
    outcomes = [
        ("removed", "event"),
        ("removed", "xml"),
        ("failed", None),
        ("timeout", None),
        ("stopped", None),
        ("error", None),
        ("abandoned", None),
        ("superseded", None),
    ]
    for i, (outcome, by) in enumerate(outcomes, start=2):
        execute(
            journal,
            "INSERT INTO unplugs SELECT ?, uri, domain_uuid, domain_name, NULL, alias, NULL, "
            "sent, used, sent_at, NULL, timeout, attempts, persistent_done, started_at, "
            "?, ?, ? FROM unplugs WHERE id=1",
            params=(i, 1e12, outcome, by),
        )
    async with DetachService(backend=fake, settings=journal_settings(), journal=journal) as svc:
        assert [r.outcome for r in svc.recovered()] == ["pending"]
