"""The journal's file: which file it is, whether to trust it, and whether it
is a journal of this aiodetach, all decided before anything writes to it
(which file, and whether to trust it: `aiodetach._journal_path`; whether
it is a journal: here).

A journal decides which requests are sent to guests after a restart, so a
file is only written once it is accepted, and a refused file is left byte
for byte as it was (its ``-wal``, ``-shm`` and ``-journal`` too):

- the path is resolved once (the working directory and the final
  component's symlinks, each of which must be ours or root's and must not
  lead into a directory others can write); the file then held is the
  journal for the owner's life;
- the file and its side files must be regular files of ours (or root's)
  that nobody else can write: the journal is created owner-only;
- its content is read without writing: SQLite reading a file also
  *recovers* it (a killed writer's ``-wal`` is replayed into the ``-shm``,
  checkpointed into the file and deleted when the connection closes; a hot
  rollback journal is played back), so a file with nothing to recover is
  read as immutable, and one with something to recover is read from a
  private copy;
- a journal is accepted only with this version's format number, exactly
  its table, and rows that are all what this aiodetach writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from .errors import (
    JournalCorrupt,
    JournalError,
    JournalUnavailable,
    JournalVersionError,
)

FORMAT_VERSION = 1
"""The journal's format (SQLite ``user_version``).  A file with a higher one
was written by a newer aiodetach and is refused, untouched."""

SCHEMA = """
CREATE TABLE unplugs (
    id INTEGER PRIMARY KEY,
    uri TEXT NOT NULL,
    domain_uuid TEXT NOT NULL,
    domain_name TEXT NOT NULL,
    run_id TEXT,
    alias TEXT NOT NULL,
    device TEXT,
    sent INTEGER NOT NULL,
    used INTEGER NOT NULL,
    sent_at REAL NOT NULL,
    answered_at REAL,
    timeout REAL NOT NULL,
    attempts INTEGER NOT NULL,
    persistent_done INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    outcome TEXT,
    confirmed_by TEXT
);
CREATE INDEX unplugs_open ON unplugs (uri) WHERE finished_at IS NULL;
CREATE INDEX unplugs_finished ON unplugs (finished_at) WHERE finished_at IS NOT NULL;
"""

OUTCOMES = frozenset(
    {"removed", "failed", "timeout", "stopped", "error", "abandoned", "superseded"}
)
"""Every outcome this version writes (``superseded``: an older unfinished row
of a device closed when a new unplug of it starts)."""

_CONFIRMATIONS = frozenset({"event", "xml"})


# --------------------------------------------------------------- the content
def inspect(where: Path, fd: int) -> int:
    """Decide, without writing a byte of the file or its side files, whether
    the held file is a journal this aiodetach may use.  Returns its format
    number: 0 for a new journal (an empty file or an empty database, such as
    one left by a first open killed before its schema committed), else
    `FORMAT_VERSION`.  Raises [`JournalVersionError`][aiodetach.errors.JournalVersionError] or
    [`JournalCorrupt`][aiodetach.errors.JournalCorrupt]."""
    sides = [where.with_name(where.name + s) for s in ("-wal", "-journal")]
    pending = [p for p in sides if _size(p) > 0]
    if not pending:
        if os.fstat(fd).st_size == 0:
            return 0
        # Nothing to recover: read as immutable (no locks, no side files, no write).
        return _inspect_copy_or_file(where, Path(where).as_uri() + "?immutable=1", uri=True)
    # A writer died with something to recover.  SQLite recovers on reading,
    # into the file itself, so it reads a private copy; the real file is
    # recovered identically once it is accepted.
    try:
        with tempfile.TemporaryDirectory(prefix="aiodetach-journal-") as scratch:
            copy = Path(scratch) / where.name
            shutil.copyfile(where, copy)
            for side in pending:
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(side, copy.with_name(copy.name + side.name[len(where.name) :]))
            return _inspect_copy_or_file(where, str(copy), uri=False)
    except OSError as exc:
        raise JournalUnavailable(
            f"cannot inspect the journal {where} (it has a killed writer's changes to "
            f"recover, read from a private copy in {tempfile.gettempdir()}): {exc.strerror}",
            path=str(where),
        ) from None


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def _inspect_copy_or_file(where: Path, name: str, *, uri: bool) -> int:
    try:
        db = sqlite3.connect(name, uri=uri, isolation_level=None)
    except sqlite3.Error as exc:
        raise classify(exc, where, "inspecting") from None
    try:
        return check_database(db, where)
    except sqlite3.Error as exc:
        raise classify(exc, where, "inspecting") from None
    finally:
        db.close()


def classify(err: sqlite3.Error, path: Path, doing: str) -> JournalError:
    """A typed error for an SQLite failure."""
    text = str(err)
    corrupt = any(m in text for m in ("not a database", "malformed", "corrupt", "no such column"))
    if corrupt and ("no such column" in text or not isinstance(err, sqlite3.OperationalError)):
        return JournalCorrupt(f"the journal {path} is corrupted ({doing}: {text})", path=str(path))
    return JournalUnavailable(
        f"the journal {path} cannot be used ({doing}: {text})", path=str(path)
    )


def check_database(db: sqlite3.Connection, path: Path) -> int:
    """Format number, objects, integrity, table and rows of a journal
    database, read only.  See `inspect()`."""
    shown = str(path)
    db.execute("PRAGMA trusted_schema=OFF")  # a foreign schema's functions never run
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > FORMAT_VERSION:
        raise JournalVersionError(
            f"the journal {path} has format {version}; this aiodetach reads up to "
            f"{FORMAT_VERSION} (written by a newer version?)",
            path=shown,
        )
    objects = {
        (str(kind), str(name))
        for kind, name in db.execute("SELECT type, name FROM sqlite_master")
        if not str(name).startswith("sqlite_")
    }
    if version < 0 or (version == 0 and objects):
        raise JournalCorrupt(
            f"{path} is an SQLite database but not an aiodetach journal "
            f"(format number {version}, {len(objects)} objects)",
            path=shown,
        )
    if version == 0:
        return 0
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise JournalCorrupt(f"the journal {path} failed its integrity check: {check}", path=shown)
    foreign = sorted(
        f"{kind} {name}"
        for kind, name in objects
        if kind != "index" and (kind, name) != ("table", "unplugs")
    )
    if ("table", "unplugs") not in objects or foreign:
        what = f"has {', '.join(foreign)}" if foreign else "lacks its table"
        raise JournalCorrupt(f"the journal {path} {what}: not the journal's schema", path=shown)
    # The columns read must be there; then each row (a damaged one is named,
    # even in a table declared otherwise); then the rest of the declarations.
    declared = _declared(db, path)
    columns = expected_columns()
    for row in db.execute(f"SELECT {', '.join(columns)} FROM unplugs ORDER BY id"):  # noqa: S608 - constant columns
        check_row(dict(zip(columns, row, strict=True)), path)
    _check_declarations(db, path, declared)
    return version


@cache
def _expected() -> tuple[tuple[str, str, int, int], ...]:
    """(name, declared type, not null, primary key) of each column, as SQLite
    reads `SCHEMA`."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return tuple(
            (str(r[1]), str(r[2]), int(r[3]), int(r[5]))
            for r in db.execute("PRAGMA table_info(unplugs)")
        )
    finally:
        db.close()


def expected_columns() -> tuple[str, ...]:
    return tuple(c[0] for c in _expected())


def _declared(db: sqlite3.Connection, path: Path) -> dict[str, tuple[str, str, int, int]]:
    """The table's columns as declared; every column the journal reads must be
    among them."""
    found = {
        str(r[1]): (str(r[1]), str(r[2]), int(r[3]), int(r[5]))
        for r in db.execute("PRAGMA table_info(unplugs)")
    }
    missing = [name for name in expected_columns() if name not in found]
    if missing:
        raise JournalCorrupt(
            f"the journal {path} lacks the columns {', '.join(missing)}: not the journal's schema",
            path=str(path),
        )
    return found


def _check_declarations(
    db: sqlite3.Connection, path: Path, found: dict[str, tuple[str, str, int, int]]
) -> None:
    """No column this version does not know (a newer one's, whose rows it
    could not read right), and each known column declared as the schema
    does (a declared type decides how SQLite stores what is written)."""
    shown = str(path)
    expected = {c[0]: c for c in _expected()}
    unknown = [name for name in found if name not in expected]
    if unknown:
        quoted = " OR ".join('"' + n.replace('"', '""') + '" IS NOT NULL' for n in unknown)
        first = db.execute(f"SELECT id FROM unplugs WHERE {quoted} ORDER BY id LIMIT 1").fetchone()  # noqa: S608 - names read from the file, quoted
        carried = f"; row {first[0]} carries values in them" if first else ""
        err = JournalCorrupt(
            f"the journal {path} has columns this aiodetach does not know "
            f"({', '.join(unknown)}: a newer version's?){carried}",
            path=shown,
        )
        err.row = first[0] if first and isinstance(first[0], int) else None
        raise err
    changed = [name for name, column in expected.items() if found[name] != column]
    if changed:
        raise JournalCorrupt(
            f"the journal {path} declares the columns {', '.join(changed)} otherwise than "
            "the journal's schema",
            path=shown,
        )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_row(row: Mapping[str, object], path: Path) -> None:
    """A row is exactly what this aiodetach writes, else `JournalCorrupt`
    naming the file and the row.  (SQLite stores whatever a statement gives
    it, whatever a column is declared as; so types are checked here.)"""
    problem = _row_problem(row)
    if problem is None:
        return
    rowid = row.get("id")
    err = JournalCorrupt(
        f"the journal {path} is damaged: row {rowid}: {problem}; "
        "not taken up (nothing is sent for it)",
        path=str(path),
    )
    err.row = rowid if isinstance(rowid, int) else None
    raise err


def _row_problem(row: Mapping[str, object]) -> str | None:
    def bad(column: str, what: str) -> str:
        return f"{column} is {row.get(column)!r}, not {what}"

    if not isinstance(row.get("id"), int):
        return bad("id", "a whole number")
    for column in ("uri", "domain_uuid", "domain_name"):
        if not isinstance(row.get(column), str):
            return bad(column, "a text")
    alias = row.get("alias")
    if not isinstance(alias, str) or not alias:
        return bad("alias", "a non-empty text")
    for column in ("run_id", "device"):
        if not isinstance(row.get(column), (str, type(None))):
            return bad(column, "a text or NULL")
    for column, least in (("sent", 1), ("used", 0), ("attempts", 1)):
        value = row.get(column)
        if not isinstance(value, int) or value < least:
            return bad(column, f"a whole number of at least {least}")
    if row.get("persistent_done") not in (0, 1) or not isinstance(row.get("persistent_done"), int):
        return bad("persistent_done", "0 or 1")
    for column in ("sent_at", "started_at", "timeout"):
        if not _finite(row.get(column)):
            return bad(column, "a finite number")
    timeout = row.get("timeout")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        return bad("timeout", "a positive number")
    for column in ("answered_at", "finished_at"):
        value = row.get(column)
        if value is not None and not _finite(value):
            return bad(column, "a finite number or NULL")
    outcome, finished = row.get("outcome"), row.get("finished_at")
    if outcome is not None and outcome not in OUTCOMES:
        return bad("outcome", f"one of {', '.join(sorted(OUTCOMES))} or NULL")
    if (outcome is None) != (finished is None):
        return f"finished_at is {finished!r} but outcome is {outcome!r} (both or neither)"
    confirmed = row.get("confirmed_by")
    if confirmed is not None and confirmed not in _CONFIRMATIONS:
        return bad("confirmed_by", "'event', 'xml' or NULL")
    return None
