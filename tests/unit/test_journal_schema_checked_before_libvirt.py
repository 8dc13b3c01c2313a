"""A file with the journal's format number but not the journal's schema is
refused at ``open()`` before libvirt is contacted (``JournalCorrupt``), and
left as it was: its table is compared with the journal's, column by column,
and nothing else (a trigger, a view, another table) may ride along."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiodetach import DetachService
from aiodetach.errors import JournalCorrupt
from aiodetach.testing import FakeHypervisor

from ._journal_files import execute, journal_with_pending_row, snapshot
from ._journal_support import journal_settings

CHANGES = {
    # One column fewer: SQLite would only say so when the take-up reads it.
    "a column dropped": ["ALTER TABLE unplugs DROP COLUMN answered_at"],
    "a column renamed": ["ALTER TABLE unplugs RENAME COLUMN sent_at TO sent_when"],
    "a newer version's column": ["ALTER TABLE unplugs ADD COLUMN lane TEXT"],
    "a column of another type": [
        "ALTER TABLE unplugs RENAME TO old",
        "CREATE TABLE unplugs AS SELECT * FROM old",  # declared types lost
        "DROP TABLE old",
    ],
    "a trigger": [
        "CREATE TRIGGER t AFTER INSERT ON unplugs BEGIN DELETE FROM unplugs; END",
    ],
    "another table": ["CREATE TABLE notes (x)"],
    "a view instead of the table": [
        "ALTER TABLE unplugs RENAME TO rows",
        "CREATE VIEW unplugs AS SELECT * FROM rows",
    ],
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_wrong_schema_is_refused_before_libvirt(tmp_path: Path, change: str) -> None:
    journal = tmp_path / "j.db"
    await journal_with_pending_row(journal)
    execute(journal, *CHANGES[change])
    before = snapshot(journal)
    fake = FakeHypervisor()
    fake.add_domain("vm")
    with pytest.raises(JournalCorrupt) as caught:
        await DetachService(backend=fake, settings=journal_settings(), journal=journal).open()
    assert fake.calls == [], f"libvirt contacted before the refusal: {fake.calls}"
    assert snapshot(journal) == before
    assert str(journal) in caught.value.message
