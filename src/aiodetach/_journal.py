"""The journal: what this process asked of libvirt, kept across its restarts.

libvirt keeps no record of "an unplug was requested at T": the live XML
shows the device until the guest lets go.  A host agent that restarts
while an unplug is pending (an upgrade, an OOM kill, a crash) would send a
fresh request into the unplug still in progress, and would never learn the
outcome of one that finished while it was down.  The journal is an SQLite
file (stdlib `sqlite3`, WAL mode) with one row per live unplug of ours:

- a row is written **and committed before** each live request goes to
  libvirt (in the worker thread that then sends it), with the request's
  wall-clock time, its number, the attempts used so far and the settings in
  force.  A crash between the commit and the request leaves a row that says
  "sent" though maybe nothing was: the row is read as *maybe sent* and its
  window is waited out, which is only ever later, never earlier;
- a request libvirt refused without taking it (another job held the domain,
  "guest is busy" with nothing of ours pending, a call failed in the
  client) uses no attempt: its row goes back to the unplug's latest request
  libvirt took, or is deleted with none (`Journal.not_taken_soon`);
- its outcome is written when it is known (off the event loop, in the
  journal's own thread);
- at ``open()`` the unfinished rows of the service's URI are reconciled
  against the live XML (see [`aiodetach.DetachService.open()`][aiodetach.DetachService.open]).

Durability: ``synchronous=FULL`` by default (each commit is fsynced before
the request goes out), so a row survives a power cut of the agent's host,
which matters when the guests run elsewhere (``qemu+ssh://``, ``qemu+tcp://``):
their unplugs go on while the agent's host reboots.  With the guests on the
agent's own host a power cut kills them too, and ``synchronous=NORMAL`` (WAL
commits that survive a process kill but maybe not a power cut) is enough:
``DetachSettings(journal_sync="normal")``.  Either way WAL keeps the file
consistent (a lost commit rolls back, it never corrupts).

Nothing but identifiers and times is stored: URI, domain UUID and name, the
domain's run id, the alias and the device's identifying description (e.g.
``disk target='vdb'``).  Never XML.  Finished rows are deleted after
``journal_retention`` seconds.

One writer: the database file itself is held with ``flock`` for the
owner's life (the lock follows the file, not its path's spelling; a forked
child drops it); a second opener gets [`JournalLocked`][aiodetach.errors.JournalLocked], naming the
holder.  Which file is the journal, whether it is trusted and whether it is
a journal at all is decided before anything writes to it
(`._journal_file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._journal_file import (
    FORMAT_VERSION,
    SCHEMA,
    check_row,
    classify,
    expected_columns,
    inspect,
)
from ._journal_path import open_held, resolve
from ._log import get_log
from .errors import JournalError, JournalUnavailable

__all__ = [
    "FORMAT_VERSION",
    "Entry",
    "Journal",
    "JournalOutcome",
    "Noted",
    "RequestNote",
    "fault_point",
    "open_journal",
]

_log = get_log()

PRUNE_EVERY = 60.0
"""Seconds between two prunes of finished rows (plus one at open)."""

BUSY_WAIT = 10.0
"""Seconds a write waits for another process's write lock (a backup, the
sqlite3 shell) before it fails as `JournalUnavailable`: long enough for a
checkpoint or a short transaction, short enough that a caller hears of a
journal that is held open for good."""

JournalOutcome = Literal["removed", "failed", "timeout", "stopped", "error", "abandoned"]

fault: Callable[[str], None] | None = None
"""Test-only: called at named points around every journal write (the
power-cut tests kill the process there).  ``None`` in normal use."""


def fault_point(point: str) -> None:
    hook = fault
    if hook is not None:
        hook(point)


@dataclass(frozen=True, slots=True)
class RequestNote:
    """What is recorded before a live request goes out."""

    uri: str
    domain_uuid: str
    domain_name: str
    run_id: str | None
    alias: str
    device: str | None
    sent: int  # requests counted, this one included
    used: int  # attempts used up before this request's window
    timeout: float  # the settings in force
    attempts: int
    persistent_done: bool
    started_at: float  # wall clock, when the unplug started


@dataclass(frozen=True, slots=True)
class Noted:
    """A request as its row records it: its number, and when it was sent
    and answered (wall clock)."""

    sent: int
    sent_at: float
    answered_at: float | None


@dataclass(frozen=True, slots=True)
class Entry:
    """An unfinished row, as read back at open."""

    row: int
    uri: str
    domain_uuid: str
    domain_name: str
    run_id: str | None
    alias: str
    device: str | None
    sent: int
    used: int
    sent_at: float  # wall clock, just before the request was handed to libvirt
    timeout: float
    attempts: int
    persistent_done: bool
    started_at: float
    answered_at: float | None = None  # wall clock, when libvirt answered (if recorded)

    def window_end(self, opened_at: float) -> float:
        """Wall-clock end of the last request's window.

        The guest's window starts when libvirt has the request, which may be
        long after ``sent_at`` (a request queued behind the domain's job).  So
        it is counted from ``answered_at``; if that was never recorded (the
        process died inside the call), from ``opened_at`` (now) at the
        earliest: later, never earlier.
        """
        if self.answered_at is not None:
            return self.answered_at + self.timeout
        return max(self.sent_at, opened_at) + self.timeout


_T = TypeVar("_T")


def _forget_in_child() -> None:
    """A forked child (multiprocessing's default start method) must not keep
    the parent's journal locked: the lock belongs to the open file, which the
    child shares, so a child outliving a killed agent would lock its restart
    out.  The child drops its copies; it has no business writing anyway."""
    for journal in list(_open_journals):
        fd, journal._lock_fd = journal._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        journal.closed = True


_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()
os.register_at_fork(after_in_child=_forget_in_child)


class Journal:
    """One journal file, locked for the life of this object.

    The blocking methods are safe from any thread (one lock around the one
    SQLite connection); the service calls them from worker threads only.
    """

    def __init__(
        self, path: Path, db: sqlite3.Connection, lock_fd: int, *, retention: float
    ) -> None:
        self.path = path
        self._db = db
        self._lock_fd: int | None = lock_fd
        self._lock = threading.Lock()
        self._retention = retention
        self._last_prune = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiodetach-journal")
        self.closed = False
        _open_journals.add(self)

    # ---------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, synchronous: str, retention: float) -> Journal:
        """Resolve, lock, check and open the journal at ``path`` (blocking).

        The path is resolved once, here (see `._journal_file`): the file
        held is the journal from then on.  Nothing is written to the file
        before it is accepted: held by another (`JournalLocked`), not
        trusted ([`JournalUnavailable`][aiodetach.errors.JournalUnavailable]), newer
        (`JournalVersionError`), not a journal or a damaged row
        (`JournalCorrupt`) all leave it, and its side files, byte for
        byte as they were, and nothing is held.
        """
        shown = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
        where = resolve(path)
        try:
            is_dir = where.is_dir()
        except (OSError, ValueError) as exc:
            raise JournalUnavailable(
                f"cannot use the journal path {shown!r}: {exc}", path=shown
            ) from None
        if is_dir:
            raise JournalUnavailable(f"the journal path {where} is a directory", path=shown)
        fd = open_held(where, shown)
        try:
            version = inspect(where, fd)
            db = cls._open_db(where, synchronous, version)
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        journal = cls(where, db, fd, retention=retention)
        try:
            journal.prune()
        except BaseException:
            journal.close()
            raise
        return journal

    @staticmethod
    def _open_db(path: Path, synchronous: str, version: int) -> sqlite3.Connection:
        """Open the accepted file for writing (``version``: what
        `inspect()` found): WAL mode, and the schema of a new journal."""
        try:
            db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=BUSY_WAIT
            )
        except sqlite3.Error as exc:
            raise classify(exc, path, "opening") from None
        try:
            db.execute("PRAGMA trusted_schema=OFF")
            found = int(db.execute("PRAGMA user_version").fetchone()[0])
            if found != version:  # we hold the lock: only a writer ignoring it
                raise JournalUnavailable(
                    f"the journal {path} changed while it was being opened", path=str(path)
                )
            mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise JournalUnavailable(
                    f"the journal {path} cannot use WAL mode (got {mode!r})", path=str(path)
                )
            db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            if version == 0:
                # Schema and version in one transaction: a crash leaves either
                # nothing or a whole journal.
                db.execute("BEGIN IMMEDIATE")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                fault_point("open.schema")
                db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                db.execute("COMMIT")
        except JournalError:
            db.close()
            raise
        except sqlite3.Error as exc:
            db.close()
            raise classify(exc, path, "opening") from None
        return db

    # --------------------------------------------------------- blocking I/O
    def _write(self, doing: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            if self.closed:
                raise JournalUnavailable(f"the journal {self.path} is closed", path=str(self.path))
            self._check_still_there()
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                result = fn(db)
                db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise classify(exc, self.path, doing) from None
                raise
            return result

    def _check_still_there(self) -> None:
        """The file at our path is still the one we hold: a journal deleted or
        replaced under a running service would take rows that no restart
        reads (one stat per write, a few microseconds)."""
        fd = self._lock_fd
        if fd is None:
            return
        try:
            here, held = os.stat(self.path), os.fstat(fd)
        except OSError as exc:
            raise JournalUnavailable(
                f"the journal {self.path} is gone ({exc.strerror}); its rows would be lost",
                path=str(self.path),
            ) from None
        if (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
            raise JournalUnavailable(
                f"the journal {self.path} was replaced by another file under this service",
                path=str(self.path),
            )

    def note_request(self, row: int | None, note: RequestNote, at: float | None = None) -> int:
        """Record a live request about to be sent; durable (committed) on
        return.  Returns the unplug's row (a new one for its first request).
        ``at``: its wall-clock time (default: now)."""
        now = time.time() if at is None else at
        fault_point("request.begin")

        def write(db: sqlite3.Connection) -> int:
            if row is not None:
                # answered_at: this request's, once libvirt answers it; the
                # previous request's would count its window from long ago.
                db.execute(
                    "UPDATE unplugs SET sent=?, used=?, sent_at=?, answered_at=NULL, timeout=?, "
                    "attempts=?, persistent_done=? WHERE id=?",
                    (
                        note.sent,
                        note.used,
                        now,
                        note.timeout,
                        note.attempts,
                        int(note.persistent_done),
                        row,
                    ),
                )
                fault_point("request.written")
                return row
            # An older unfinished row of the device (never the case when open()
            # reconciled it) is closed rather than left to be resumed twice.
            db.execute(
                "UPDATE unplugs SET finished_at=?, outcome='superseded' "
                "WHERE uri=? AND domain_uuid=? AND alias=? AND finished_at IS NULL",
                (now, note.uri, note.domain_uuid, note.alias),
            )
            cursor = db.execute(
                "INSERT INTO unplugs (uri, domain_uuid, domain_name, run_id, alias, device, "
                "sent, used, sent_at, timeout, attempts, persistent_done, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    note.uri,
                    note.domain_uuid,
                    note.domain_name,
                    note.run_id,
                    note.alias,
                    note.device,
                    note.sent,
                    note.used,
                    now,
                    note.timeout,
                    note.attempts,
                    int(note.persistent_done),
                    note.started_at,
                ),
            )
            fault_point("request.written")
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        written = self._write("recording a request", write)
        fault_point("request.committed")
        return written

    def finish(
        self,
        row: int,
        outcome: JournalOutcome,
        confirmed_by: str | None = None,
        at: float | None = None,
    ) -> None:
        """Record how the unplug of ``row`` ended (and prune now and then)."""
        now = time.time() if at is None else at

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE unplugs SET finished_at=?, outcome=?, confirmed_by=? "
                "WHERE id=? AND finished_at IS NULL",
                (now, outcome, confirmed_by, row),
            )
            fault_point("finish.written")

        self._write("recording an outcome", write)
        fault_point("finish.committed")
        if now - self._last_prune >= PRUNE_EVERY:
            self.prune()

    def unfinished(self, uri: str) -> list[Entry]:
        """The unfinished unplugs of ``uri``, oldest first.  Every row was
        checked at open; one damaged since (a writer that ignores the lock)
        is `JournalCorrupt` all the same, never a half-read entry."""
        columns = expected_columns()
        with self._lock:
            try:
                rows = self._db.execute(
                    f"SELECT {', '.join(columns)} FROM unplugs "  # noqa: S608 - constant columns
                    "WHERE uri=? AND finished_at IS NULL ORDER BY id",
                    (uri,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise classify(exc, self.path, "reading") from None
        entries = []
        for values in rows:
            r = dict(zip(columns, values, strict=True))
            check_row(r, self.path)
            entries.append(
                Entry(
                    row=int(r["id"]),
                    uri=str(r["uri"]),
                    domain_uuid=str(r["domain_uuid"]),
                    domain_name=str(r["domain_name"]),
                    run_id=None if r["run_id"] is None else str(r["run_id"]),
                    alias=str(r["alias"]),
                    device=None if r["device"] is None else str(r["device"]),
                    sent=int(r["sent"]),
                    used=int(r["used"]),
                    sent_at=float(r["sent_at"]),
                    timeout=float(r["timeout"]),
                    attempts=int(r["attempts"]),
                    persistent_done=bool(r["persistent_done"]),
                    started_at=float(r["started_at"]),
                    answered_at=None if r["answered_at"] is None else float(r["answered_at"]),
                )
            )
        return entries

    def unfinished_uris(self) -> list[str]:
        """URIs with unfinished unplugs (a fleet opens their services)."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT DISTINCT uri FROM unplugs WHERE finished_at IS NULL ORDER BY uri"
                ).fetchall()
            except sqlite3.Error as exc:
                raise classify(exc, self.path, "reading") from None
        return [str(r[0]) for r in rows]

    def prune(self) -> int:
        """Delete rows finished more than ``retention`` seconds ago."""
        now = time.time()
        self._last_prune = now

        def write(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "DELETE FROM unplugs WHERE finished_at IS NOT NULL AND finished_at < ?",
                (now - self._retention,),
            )
            return cursor.rowcount

        return self._write("pruning", write)

    def rows(self) -> list[dict[str, Any]]:
        """Every row, as dicts (tests and diagnostics)."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM unplugs ORDER BY id")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

    def close(self) -> None:
        """Finish the queued writes, close the file, release the lock (blocking)."""
        self._executor.shutdown(wait=True)
        with self._lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)

    # --------------------------------------------------------- from the loop
    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking method in the journal's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    def request_sent(self) -> None:
        """A live request of a journalled unplug was handed to libvirt.  Nothing
        is written: this is where the power-cut tests stop the process
        (`fault`, point ``request.sent``), so that the protocol code
        calls the journal, never the test hook itself."""
        fault_point("request.sent")

    def answered_soon(self, row: int) -> float:
        """Queue "libvirt answered the request of ``row``, now" (any thread;
        never blocks); returns that time.  Not made durable on its own: if it
        is lost, a restart counts the window from its own start instead (see
        Entry.window_end)."""
        at = time.time()

        def write() -> None:
            def update(db: sqlite3.Connection) -> None:
                db.execute("UPDATE unplugs SET answered_at=? WHERE id=?", (at, row))

            try:
                self._write("recording an answer", update)
            except JournalError as exc:
                _log.warning("aiodetach.journal_write_failed", error=str(exc))

        with contextlib.suppress(RuntimeError):  # closed: the restart is conservative
            self._executor.submit(write)
        return at

    def not_taken_soon(self, row: int, taken: Noted | None) -> Future[None] | None:
        """Queue "libvirt did not take the request just noted in ``row``" (any
        thread; never blocks): a request refused without being taken (another
        job held the domain, "guest is busy" with nothing of ours pending, a
        call failed inside the client) uses no attempt, so a restart must not
        take it up as *maybe sent*.  The row goes back to ``taken``, the
        unplug's latest request libvirt did take; with none, it is deleted:
        nothing of ours is pending, nothing is taken up.

        Returns the write's future: the unplug's next request waits for it
        before its own row is written (else this would undo that row).  A
        failed write is logged and leaves the row *maybe sent*: a restart
        then waits, later, never earlier."""

        def write() -> None:
            def update(db: sqlite3.Connection) -> None:
                if taken is None:
                    db.execute("DELETE FROM unplugs WHERE id=? AND finished_at IS NULL", (row,))
                else:
                    db.execute(
                        "UPDATE unplugs SET sent=?, sent_at=?, answered_at=? "
                        "WHERE id=? AND finished_at IS NULL",
                        (taken.sent, taken.sent_at, taken.answered_at, row),
                    )

            try:
                self._write("recording a request not taken", update)
            except JournalError as exc:
                _log.warning("aiodetach.journal_write_failed", error=str(exc))

        try:
            return self._executor.submit(write)
        except RuntimeError:  # closed: the restart is conservative
            return None

    def finish_soon(
        self, row: int, outcome: JournalOutcome, confirmed_by: str | None = None
    ) -> None:
        """Queue an outcome write (loop thread; never blocks it).  A failure
        is logged: the row stays unfinished and the next open reconciles it
        against the live XML, which is what it would learn anyway."""
        at = time.time()

        def write() -> None:
            try:
                self.finish(row, outcome, confirmed_by, at)
            except JournalError as exc:
                _log.warning("aiodetach.journal_write_failed", error=str(exc))

        try:
            self._executor.submit(write)
        except RuntimeError:  # closed: the next open reconciles the row
            _log.warning("aiodetach.journal_write_failed", error="journal closed", row=row)

    async def aclose(self) -> None:
        """`close()` off the loop, shielded from cancellation."""
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, self.close)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.shield(done)
            raise


async def open_journal(
    path: str | os.PathLike[str], *, synchronous: str, retention: float
) -> Journal:
    """`Journal.open()` off the loop.  A cancelled open releases what the
    thread still opens."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(
        None, lambda: Journal.open(path, synchronous=synchronous, retention=retention)
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def release(done: asyncio.Future[Journal]) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().close()

        future.add_done_callback(release)
        raise
