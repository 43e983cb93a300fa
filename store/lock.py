"""The serve lock: one `tocsin serve` owns a database file at a time.

An flock on `<database>.lock`, held for the life of the process. flock belongs to the
open file, not to a process: workers forked by a serving parent inherit it, and the
lock is free again the moment the last of them exits, however it exits (no stale pid
files). SQLite's own locks are not used for this: its exclusive locking mode would
also lock out tocsin's reader connection and the operator commands.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .db import DatabaseUnusable


class DatabaseLocked(DatabaseUnusable):
    """Another tocsin serve already holds this database."""


def lock_path(database: Path) -> Path:
    """Where the serve lock of a database lives: beside it, `<name>.lock`."""
    return database.with_name(database.name + ".lock")


class ServeLock:
    """The serve lock of one database file; `acquire` takes it or says who holds it."""

    def __init__(self, database: Path):
        self.database = Path(database)
        # Beside the real file: two paths to one database (a symlink) meet at one lock.
        self.path = lock_path(self.database.resolve())
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and record our pid in it; DatabaseLocked if another process has it."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DatabaseUnusable(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "another process"
                raise DatabaseLocked(f"database {self.database} is already served by another tocsin"
                                     f" ({who} holds {self.path})") from None
            raise DatabaseUnusable(f"cannot lock {self.path}: {exc.strerror}") from None
        # The pid is for the refusal message only; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Let go (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
