"""SQLite storage: one writer that group-commits whatever is queued, and readers.

Every write (new alerts, group actions) is a function on one bounded queue. The writer
takes all queued writes, runs them in one transaction over the groups they touch and
fsyncs once (WAL, synchronous=FULL); each write's future resolves only after that commit,
so a caller's "accepted" means "on disk". What the writes do is store.core's, shared with
the PostgreSQL engine.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import aiosqlite

from .core import Batch, Job, Reader, Writer
from .schema import MIGRATIONS
from .values import (GROUP_COLUMNS, DatabaseUnusable, Group, InvalidTransition, InvalidWrite,  # noqa: F401
                     NewAlert, NotFound, OverLimit, StoredAlert, StoreUnavailable, public_id, row_id)

log = logging.getLogger("tocsin.store")

SCHEMA_VERSION = len(MIGRATIONS)  # the newest schema this code knows
# Another process (an operator's sqlite3 shell, `tocsin ack`) may hold the write lock. The
# writer waits for it without blocking the loop, polling every _LOCK_POLL seconds, and gives
# the batch up after lock_wait seconds (503/451: the senders retry).
_LOCK_POLL = 0.01


# -- what SQLite's errors mean for a write ---------------------------------------------

# Primary result codes (https://sqlite.org/rescode.html) that say the storage, not the
# data, is in trouble: every write would fail the same way now.
_BUSY, _LOCKED, _FULL = 5, 6, 13
_TROUBLE = {
    _BUSY: "the database is locked by another process",
    _LOCKED: "the database is locked by another process",
    7: "out of memory",
    8: "the database is read-only",
    9: "the write was interrupted",
    10: "disk I/O error",
    11: "the database file is corrupt",
    _FULL: "the disk is full",
    14: "cannot open the database file",
    15: "the database locking protocol failed",
    26: "the file is not a SQLite database",
}


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def storage_trouble(exc: BaseException) -> bool:
    """True when `exc` means the database cannot take writes now (disk full, read-only,
    I/O, locked…); False when the write itself is what SQLite cannot store."""
    if isinstance(exc, (OSError, MemoryError)):
        return True
    if isinstance(exc, sqlite3.Error):
        code = _code(exc)
        if code is not None:
            return code in _TROUBLE
        return isinstance(exc, sqlite3.OperationalError) or "closed" in str(exc)
    return False


def describe(exc: BaseException) -> str:
    """A storage error in plain words, SQLite's own text after it."""
    reason = _TROUBLE.get(_code(exc))
    return f"{reason} ({exc})" if reason else str(exc)


def examine(path: Path) -> int | None:
    """Can tocsin use the database at `path`? Its schema version, or None when there is no
    file yet (serve creates it); DatabaseUnusable with one line saying why not.

    Reads only: the file is opened read-only, and the schema version is read before
    anything else, so a newer tocsin's database is never touched. `tocsin check` and
    every start run this same test."""
    try:
        return _examine(Path(path))
    except OSError as exc:  # a path we may not even look at
        raise DatabaseUnusable(f"database {path}: {exc.strerror}: {exc.filename}") from None


def _examine(path: Path) -> int | None:
    if not path.exists():
        place = path.parent
        while not place.exists():
            place = place.parent
        if not place.is_dir():
            raise DatabaseUnusable(f"cannot create database {path}: {place} is not a directory")
        if not os.access(place, os.W_OK | os.X_OK):
            raise DatabaseUnusable(f"cannot create database {path}: directory {place} is not writable")
        return None
    if path.is_dir():
        raise DatabaseUnusable(f"database {path} is a directory")
    if not os.access(path, os.R_OK):
        raise DatabaseUnusable(f"database {path} is not readable")
    unwritable = [str(p) for p in (path.parent, path, *sidecars(path)) if p.exists() and not os.access(p, os.W_OK)]
    if unwritable:
        raise DatabaseUnusable(f"database {path}: not writable: {', '.join(unwritable)}"
                               " (check owner, mode, attributes and mount)")
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version <= SCHEMA_VERSION:
                # Reading the schema and the two big tables' last rows finds a damaged
                # header, schema or b-tree root cheaply (a full integrity check reads every
                # page: seconds on a big database, too slow for each start).
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if version >= 1:
                    db.execute("SELECT max(seq) FROM alert_groups").fetchone()
                    db.execute("SELECT max(seq) FROM alerts").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise DatabaseUnusable(f"database {path}: {describe(exc)}") from None
    if version > SCHEMA_VERSION:
        raise DatabaseUnusable(f"database {path}: database schema version {version} is newer than this tocsin"
                               f" (knows {SCHEMA_VERSION}); upgrade tocsin")
    return version


def sidecars(path: Path) -> tuple[Path, Path]:
    """The WAL files SQLite keeps beside a database: `-wal` and `-shm`."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


class SqliteTx:
    """The writer's open SQLite transaction, as store.core's writes use it (store.core.Tx).
    Plain sqlite3 calls on the loop: the coroutines never wait, so a batch still runs as
    one synchronous step."""

    skip_locked = for_update = ""  # one writer at a time already: SQLite locks the whole database

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        # Under the write lock nobody else inserts: number this batch's rows from here.
        self._seq = {table: db.execute(f"SELECT coalesce(max(seq), 0) + 1 FROM {table}").fetchone()[0]
                     for table in ("alert_groups", "alerts")}

    def indexed_by(self, index: str) -> str:
        return f"INDEXED BY {index}"

    async def fetch(self, sql: str, params=()) -> list[tuple]:
        return self.db.execute(sql, params).fetchall()

    async def execute(self, sql: str, params=()) -> int:
        return self.db.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.db.executemany(sql, rows)

    async def next_seq(self, table: str) -> int:
        seq = self._seq[table]
        self._seq[table] = seq + 1
        return seq

    async def lock_keys(self, keys) -> None:
        """Nothing to do: BEGIN IMMEDIATE already made this the only writer."""


class SqliteStore(Writer, Reader):
    """The tocsin database in one SQLite file: open it, submit writes, query it (store.Store).

    `rules` are the alert-group rules (the grouping.rules module): the writer calls them for
    every placement and transition, so each engine applies the same ones."""

    label_join = " CROSS JOIN "  # see Reader.label_join

    def __init__(self, path: Path, *, rules, queue_size: int = 20000, lock_wait: float = 5.0,
                 stuck_after: float = 5.0):
        self.path = Path(path)
        self.rules = rules
        self.lock_wait = lock_wait      # seconds a batch waits for another process's write lock
        self.stuck_after = stuck_after  # seconds without a commit, writes waiting, before "writer stuck"
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        # The writer is a plain sqlite3 connection used on the event loop: one batch (reads,
        # decisions, writes, COMMIT with its fsync) runs as one synchronous step, about
        # 1-2 ms for a batch of 16 here. Measured under load, every thread hop lost more
        # than it saved: a hop per statement through aiosqlite cost 13 ms per commit, and
        # a batch or just its COMMIT in a thread waited on the GIL at each sqlite3 step
        # (9 ms per commit, half the throughput). Readers use aiosqlite.
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.on_commit: Callable[[int, float], None] | None = None  # (batch size, seconds)
        self._expected = 0
        # notifier name -> lifecycle events it is told about (set from config by the daemon)
        self.lifecycle_events: dict[str, frozenset[str]] = {}
        self._maintenance: tuple[float, dict[str, dict]] | None = None  # (read at, integration id -> info)
        self._identity: dict[Path, tuple[int, int]] = {}  # (st_dev, st_ino) of the files we opened
        self._stalled_since: float | None = None  # when the writer took work it has not yet committed
        self._last_error: str | None = None
        self._reported: str | None = None  # the problem last logged, so each is logged once
        self.closed_cleanly = True
        self.migrated_from: int | None = None  # the schema version found when opened

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, creating and migrating it; DatabaseUnusable says why it cannot be used."""
        examine(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnusable(f"cannot create the database directory {self.path.parent}: {exc.strerror}") from None
        self._connect_writer()
        try:
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            await self._close_connections()
            raise DatabaseUnusable(f"database {self.path}: {describe(exc)}") from None
        self._reader.row_factory = None
        self._task = asyncio.create_task(self._run(), name="store-writer")

    def _connect_writer(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise DatabaseUnusable(f"database {self.path}: {describe(exc)}") from None
        try:
            # The version first: every pragma below may write, and a newer tocsin's file is not ours.
            (version,) = db.execute("PRAGMA user_version").fetchone()
            self.migrated_from = version
            if version > SCHEMA_VERSION:
                raise DatabaseUnusable(f"database {self.path}: database schema version {version} is newer than"
                                       f" this tocsin (knows {SCHEMA_VERSION}); upgrade tocsin")
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
                db.execute(f"PRAGMA {pragma}")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, script.split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {number}")
                    db.execute("COMMIT")
                except Exception:
                    db.execute("ROLLBACK")
                    raise
                log.info("schema migrated", extra={"version": number})
            # One real write, as readiness does: a read-only file, an unwritable -shm or a full
            # disk stops the start here, in one line, instead of failing the first alert.
            db.execute("BEGIN IMMEDIATE")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
            # From here the writer never blocks the loop on another process's lock: _begin polls.
            db.execute("PRAGMA busy_timeout=0")
        except DatabaseUnusable:
            db.close()
            raise
        except sqlite3.Error as exc:
            db.close()
            raise DatabaseUnusable(f"database {self.path}: {describe(exc)}") from None
        self._writer = db
        self._identity = {}
        for p in (self.path, *sidecars(self.path)):
            if p.exists():  # all three in WAL mode
                st = os.stat(p)
                self._identity[p] = (st.st_dev, st.st_ino)

    async def close(self) -> None:
        """Finish every queued write, then close (a second call does nothing)."""
        if self._closing:
            return
        self._closing = True
        await self._stop_writer()
        shm = sidecars(self.path)[1]
        if self._writer is not None and shm.exists() and not os.access(shm, os.W_OK):
            # Closing writes to the -shm through its memory map: with the file unwritable
            # that is a SIGBUS, not an error. Leave the connections to the process's exit;
            # SQLite recovers the WAL at the next start.
            log.error("database -shm file not writable: the database is left for SQLite to recover at the next start",
                      extra={"file": str(shm)})
            self.closed_cleanly = False
            return
        await self._close_connections()

    async def _close_connections(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- health ----------------------------------------------------------------------

    def problem(self) -> str | None:
        """What stops writes now, known without trying one: the writer stopped or stuck,
        or the database files removed, replaced or unwritable. None when nothing is known."""
        if self._closing or self._task is None or self._task.done():
            return "the database writer is not running"
        stalled = self._stalled_since
        if stalled is not None and time.monotonic() - stalled > self.stuck_after:
            last = f": {self._last_error}" if self._last_error else ""
            return f"writer stuck: no commit for {time.monotonic() - stalled:.0f}s with writes waiting{last}"
        return self._files_problem()

    def _files_problem(self) -> str | None:
        """Are the files we opened still the ones at the path, and writable? An alert written
        to a removed file is lost at the next start, so this runs before every commit: three
        stat and four access calls, 60-90 us measured on the busy 2-core test machine, lost
        in the noise of bench/http_ingest.py next to a commit's fsync."""
        problem = self._identity_problem()
        if problem is not None:
            return problem
        unwritable = [str(p) for p in (self.path.parent, *self._identity) if not os.access(p, os.W_OK)]
        if unwritable:
            return f"not writable: {', '.join(unwritable)} (check owner, mode, attributes and mount)"
        return None

    def _identity_problem(self) -> str | None:
        for p, identity in self._identity.items():
            try:
                st = os.stat(p)
            except FileNotFoundError:
                return f"{p} was removed or moved away while tocsin runs; put it back, or restart tocsin"
            except OSError as exc:
                return f"{p}: {exc.strerror}"
            if (st.st_dev, st.st_ino) != identity:
                return f"{p} was replaced by another file while tocsin runs; restart tocsin to use it"
        return None

    def _shm_problem(self) -> str | None:
        """Readers write to the -shm through a memory map too: an unwritable one is a SIGBUS."""
        shm = sidecars(self.path)[1]
        if shm in self._identity and not os.access(shm, os.W_OK):
            return f"not writable: {shm} (check owner, mode, attributes and mount)"
        return None

    # -- writes (the rest are store.core's) ----------------------------------------------

    async def ping(self) -> None:
        """Commit one small real write: the database takes writes now."""
        async def write(batch: Batch) -> None:
            # Rewrites the header page: the commit appends a real frame and fsyncs, so a full
            # disk or a read-only file fails here as an alert would.
            await batch.tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await self._submit(write)

    async def _commit(self, jobs: list[Job]) -> None:
        """Write the jobs in one transaction and fsync once; each job's future gets its result
        after the commit. A job SQLite cannot store fails alone (InvalidWrite); storage trouble
        fails them all (StoreUnavailable), and so does a database file that is no longer the
        one at its path: what a restart would not find was never accepted."""
        if not jobs:
            return
        if self._stalled_since is None:
            self._stalled_since = time.monotonic()
        problem = self._files_problem()
        if problem is not None:
            self._refuse(jobs, problem)
            return
        started = time.perf_counter()
        db = self._writer
        try:
            await self._begin()
            try:
                results = self._prepare(jobs)
            except Exception as exc:
                if storage_trouble(exc):
                    raise
                db.execute("ROLLBACK")
                log.debug("a write in a batch of %d cannot be stored (%s): storing them one by one", len(jobs), exc)
                await self._begin()
                results = self._prepare_one_by_one(jobs)
            db.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - whatever it is, none of these writes is kept
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the connection may be unusable; report the first error
                pass
            self._refuse(jobs, describe(exc))
            return
        problem = self._identity_problem()
        if problem is not None:  # removed between the check and the commit: into a file nobody will open again
            self._refuse(jobs, problem)
            return
        self._committed(jobs, results, started)

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting up to lock_wait for another process's write lock while the
        loop keeps serving (a blocking busy_timeout would freeze every listener meanwhile)."""
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if _code(exc) not in (_BUSY, _LOCKED) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(_LOCK_POLL)

    def _prepare(self, jobs: list[Job]) -> list[tuple[Job, Any, BaseException | None]]:
        """Write the batch inside the open transaction, up to (not including) COMMIT."""
        batch = Batch(SqliteTx(self._writer), time.time())
        return _run_sync(self.prepare(batch, jobs))

    def _prepare_one_by_one(self, jobs: list[Job]) -> list[tuple[Job, Any, BaseException | None]]:
        """The slow path, taken only after a batch failed on its data: each job in its own
        savepoint, so the one SQLite cannot store is rolled back alone. Later jobs see the
        earlier ones' rows, as they would have in the batch; still one commit."""
        db = self._writer
        results: list[tuple[Job, Any, BaseException | None]] = []
        for job in jobs:
            db.execute("SAVEPOINT job")
            try:
                results += self._prepare([job])
            except Exception as exc:
                if storage_trouble(exc):
                    raise
                db.execute("ROLLBACK TO job")
                log.warning("write refused, the rest of its batch kept", extra={"error": str(exc)})
                results.append((job, None, InvalidWrite(str(exc))))
            db.execute("RELEASE job")
        return results

    # -- reads -----------------------------------------------------------------------

    async def _fetch(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        problem = self._shm_problem()
        if problem is not None:
            raise StoreUnavailable(problem)
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"database error: {exc}") from exc


def _run_sync(coroutine):
    """Run a coroutine that never waits (SqliteTx's calls are synchronous) to its end, here:
    the batch stays one synchronous step of the loop, as the writer's timing needs."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a SQLite write waited on something; writes must not")
