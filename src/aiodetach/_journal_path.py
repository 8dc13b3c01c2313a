"""Which file the journal is, and whether to trust it, before anything is read.

See `aiodetach._journal_file` for the whole story: the path is resolved
once (the working directory and the final component's symlinks, each of which
must be ours or root's and must not lead into a directory others can write),
and the file then held is the journal for the owner's life; the file and its
side files must be regular files of ours (or root's) that nobody else can
write, and the journal is created owner-only; the lock's holder is named from
the kernel's lock table, so it follows the file, not the spelling of a path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from .errors import JournalLocked, JournalUnavailable

__all__ = ["SIDES", "check_side", "holder_of", "open_held", "resolve"]

SIDES = ("-wal", "-shm", "-journal")
_MAX_HOPS = 40  # the kernel's own limit on symlinks in one lookup


# ------------------------------------------------------------------ the path
def resolve(given: str | os.PathLike[str]) -> Path:
    """The journal's file, once: absolute (today's working directory), with
    the final component's symlinks followed, each checked.

    A symlink is followed only if it is ours or root's and leads into a
    directory nobody else can write: else whoever can write there decides
    which file is the journal (or creates it where they like).
    """
    shown = os.fspath(given)
    try:
        current = Path(os.path.abspath(shown))
        for _ in range(_MAX_HOPS):
            try:
                link = os.lstat(current)
            except FileNotFoundError:
                break
            if not stat.S_ISLNK(link.st_mode):
                break
            if not _ours(link.st_uid):
                raise JournalUnavailable(
                    f"the journal path {current} is a symlink owned by uid {link.st_uid}: "
                    "not followed (the journal is not trusted to another user's link)",
                    path=shown,
                )
            target = Path(os.path.realpath(current.parent)) / os.readlink(current)
            current = Path(os.path.realpath(target.parent)) / target.name
            _check_directory(current.parent, shown)
        else:
            raise JournalUnavailable(
                f"cannot use the journal path {shown!r}: too many levels of symbolic links",
                path=shown,
            )
        # The directories above are whatever they resolve to now.
        return Path(os.path.realpath(current.parent)) / current.name
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise JournalUnavailable(
            f"cannot use the journal path {shown!r}: {reason}", path=shown
        ) from None


def _ours(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _others_can_write(st: os.stat_result) -> bool:
    return not _ours(st.st_uid) or bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check_directory(directory: Path, shown: str) -> None:
    """A symlink's target directory: nobody but us (and root) may write it,
    sticky or not (a sticky directory still lets others create the target
    before us)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return  # the open says the directory is missing
    if _others_can_write(st):
        raise JournalUnavailable(
            f"the journal path {shown!r} is a symlink into {directory}, a directory "
            f"writable by others (mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}): "
            "whoever can write there could replace the journal; point it at a private "
            "directory",
            path=shown,
        )


# ------------------------------------------------------------------ the file
def _open_or_create(where: Path, shown: str) -> int:
    for _ in range(2):  # created or removed by someone else in between: once more
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block
                raise JournalUnavailable(f"the journal {where} is not a regular file", path=shown)
        try:
            return os.open(where, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            pass
        try:
            # O_EXCL|O_NOFOLLOW: a name planted since resolve() is not followed.
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            return os.open(where, flags, 0o600)
        except FileExistsError:
            pass
    raise JournalUnavailable(f"the journal {where} keeps changing while opened", path=shown)


def open_held(where: Path, shown: str) -> int:
    """Open (or create, owner-only) the journal file, check that nobody else
    can write it or its side files, and lock it.  Returns the descriptor
    that holds the lock."""
    try:
        fd = _open_or_create(where, shown)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
            reason = "it became a symlink while being opened"
        elif isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        else:
            reason = str(exc)
        raise JournalUnavailable(
            f"cannot open the journal {shown!r}: {reason}", path=shown
        ) from None
    try:
        _check_private(where, os.fstat(fd), shown)
        for side in SIDES:
            check_side(where.with_name(where.name + side), shown)
        _lock(fd, where, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_private(path: Path, st: os.stat_result, shown: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise JournalUnavailable(f"the journal {path} is not a regular file", path=shown)
    if not _ours(st.st_uid):
        raise JournalUnavailable(
            f"the journal file {path} is owned by uid {st.st_uid}, who can write it: "
            "not trusted (the journal decides what is re-sent to guests)",
            path=shown,
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise JournalUnavailable(
            f"the journal file {path} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):o}): not trusted (the journal decides what is "
            f"re-sent to guests); if its content is yours, chmod go-w {path}",
            path=shown,
        )


def check_side(path: Path, shown: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalUnavailable(f"cannot check {path}: {exc.strerror}", path=shown) from None
    _check_private(path, st, shown)


def _lock(fd: int, where: Path, shown: str) -> None:
    # flock on the database file itself: the lock follows the file, not how
    # its path is spelled (symlinks, hard links), and SQLite's own POSIX
    # locks on the same file are independent of it.
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise JournalUnavailable(f"cannot lock {where}: {exc.strerror}", path=shown) from None
        holder = holder_of(os.fstat(fd))
        raise JournalLocked(
            f"the journal {where} is in use by another service "
            f"({f'pid {holder}' if holder else 'pid unknown'}); one journal has one writer",
            path=shown,
        ) from None


def holder_of(st: os.stat_result) -> int | None:
    """The process holding the ``flock`` of the file ``st`` is about, from the
    kernel's own table (``/proc/locks``): it names the file by device and
    inode, so it is right however the holder spelled the path, and it is
    never a process that used the file earlier.  None when not visible
    (another PID namespace, no ``/proc``)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            lines = table.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue  # "->": a waiter, not a holder
        try:
            parts = fields[5].split(":")
            major, minor, inode = int(parts[0], 16), int(parts[1], 16), int(parts[2])
            pid = int(fields[4])
        except (ValueError, IndexError):
            continue
        same = (major, minor, inode) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        if same and pid > 0:
            return pid
    return None
