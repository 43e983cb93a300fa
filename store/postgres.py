"""PostgreSQL storage (asyncpg): what SQLite's engine does, over a database many tocsin
instances share.

One writer connection per instance group-commits whatever is queued, as on SQLite: one
transaction, one COMMIT with synchronous_commit on, so a 200 or a 250 still means the
server has the alert on disk. The writes themselves are store.core's. What makes sharing
safe is the database, not timing: the (integration, key) pairs a batch places alerts for
are locked (transaction advisory locks, taken in one sorted order), the groups it changes
are read FOR UPDATE, due escalation steps and notification attempts are claimed with
FOR UPDATE SKIP LOCKED, and the unique index on open groups backs it all.

asyncpg rather than psycopg 3: the writer's batch shape (bench/pg_drivers.py, 32 alerts per
transaction) took 10.4-17.3 ms per batch on asyncpg against 15.0-22.3 ms on psycopg 3's async
connection, on this busy 2-core machine.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from typing import Callable

import asyncpg

from .core import Batch, Job, Reader, Writer
from .schema_pg import MIGRATIONS
from .values import DatabaseUnusable, InvalidWrite, StoreUnavailable

log = logging.getLogger("tocsin.store")

SCHEMA_VERSION = len(MIGRATIONS)
_MIGRATION_LOCK = 0x746F6373696E  # "tocsin": the advisory lock migrations run under
_SEQ_BLOCK = 64        # row numbers taken from a sequence at a time
_RETRIES = 3           # a batch that lost a deadlock or a race for a key is run again
_CONNECT_TIMEOUT = 10.0
_RETRY_STATES = {"40P01", "40001"}  # deadlock_detected, serialization_failure


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


_PLACEHOLDER = re.compile(r"\?")


def _dialect(sql: str, cache: dict[str, str] = {}) -> str:  # noqa: B006 - a deliberate shared cache
    """store.core's `?` placeholders as PostgreSQL's $1, $2, …"""
    out = cache.get(sql)
    if out is None:
        n = 0

        def number(_):
            nonlocal n
            n += 1
            return f"${n}"
        out = cache[sql] = _PLACEHOLDER.sub(number, sql)
    return out


def _key_lock(integration_id: str, key: str) -> int:
    """A signed 64-bit advisory lock id for one (integration, grouping key)."""
    digest = hashlib.blake2b(f"{integration_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _data_error(exc: BaseException) -> bool:
    """True when this one write is what PostgreSQL cannot store (a NUL in a text, a value out
    of range): the rest of its batch is kept. Anything else is the database's trouble."""
    return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
                            asyncpg.ProgramLimitExceededError)) and not _retryable(exc)


def _retryable(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None)
    if state in _RETRY_STATES:
        return True
    # Two processes opening a group for one key at once: the index refuses the second, whose
    # batch runs again and finds the group (the key locks make this rare).
    return isinstance(exc, asyncpg.UniqueViolationError) and getattr(exc, "constraint_name", "") == "ix_groups_open"


class PgTx:
    """The writer's open PostgreSQL transaction, as store.core's writes use it (store.core.Tx)."""

    skip_locked = " FOR UPDATE SKIP LOCKED"
    for_update = " FOR UPDATE"

    def __init__(self, conn: asyncpg.Connection, seqs: dict[str, list[int]]):
        self.conn = conn
        self._seqs = seqs  # row numbers taken and not yet used (kept across batches: gaps are fine)

    def indexed_by(self, index: str) -> str:
        return ""

    async def fetch(self, sql: str, params=()) -> list[tuple]:
        return [tuple(r) for r in await self.conn.fetch(_dialect(sql), *params)]

    async def execute(self, sql: str, params=()) -> int:
        status = await self.conn.execute(_dialect(sql), *params)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: list[tuple]) -> None:
        await self.conn.executemany(_dialect(sql), rows)

    async def next_seq(self, table: str) -> int:
        free = self._seqs.setdefault(table, [])
        if not free:
            rows = await self.conn.fetch(f"SELECT nextval('{table}_seq') FROM generate_series(1, $1)", _SEQ_BLOCK)
            free.extend(sorted((r[0] for r in rows), reverse=True))
        return free.pop()

    async def lock_keys(self, keys) -> None:
        ids = sorted({_key_lock(i, k) for i, k in keys})
        # One statement, in sorted order: every process takes them in the same order (no deadlock).
        await self.conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k", ids)


class PgStore(Writer, Reader):
    """The tocsin database on a PostgreSQL server (store.Store), shared by any number of instances."""

    recover_all = False  # other live instances may be mid-attempt: take over only ended leases

    def __init__(self, url: str, *, rules, queue_size: int = 20000, stuck_after: float = 5.0,
                 readers: int = 4):
        self.url = url
        self.rules = rules
        self.stuck_after = stuck_after
        self.readers = readers
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._writer: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.on_commit: Callable[[int, float], None] | None = None
        self._expected = 0
        self.lifecycle_events: dict[str, frozenset[str]] = {}
        self._maintenance = None
        self._seqs: dict[str, list[int]] = {}
        self._stalled_since: float | None = None
        self._last_error: str | None = None
        self._reported: str | None = None
        self.closed_cleanly = True
        self.migrated_from: int | None = None

    def __repr__(self) -> str:
        return f"PgStore({redact(self.url)})"

    # -- lifecycle -------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        try:
            # synchronous_commit on (the server default, set here so no server config can
            # loosen it): COMMIT returns once the WAL is flushed.
            return await asyncpg.connect(self.url, timeout=_CONNECT_TIMEOUT,
                                         server_settings={"synchronous_commit": "on",
                                                          "application_name": "tocsin"})
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseUnusable(f"database {redact(self.url)}: {_why(exc)}") from None

    async def open(self) -> None:
        """Connect, migrate (under the migration lock) and start the writer."""
        self._writer = await self._connect()
        try:
            self.migrated_from = await migrate(self._writer, self.url)
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.readers,
                                                   timeout=_CONNECT_TIMEOUT,
                                                   server_settings={"application_name": "tocsin-read"})
        except DatabaseUnusable:
            await self._close_connections()
            raise
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._close_connections()
            raise DatabaseUnusable(f"database {redact(self.url)}: {_why(exc)}") from None
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def close(self) -> None:
        """Finish every queued write, then close (a second call does nothing)."""
        if self._closing:
            return
        self._closing = True
        await self._stop_writer()
        await self._close_connections()

    async def _close_connections(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._writer is not None:
            await self._writer.close()
            self._writer = None

    # -- health ----------------------------------------------------------------------

    def problem(self) -> str | None:
        """What stops writes now, known without trying one."""
        if self._closing or self._task is None or self._task.done():
            return "the database writer is not running"
        stalled = self._stalled_since
        if stalled is not None and time.monotonic() - stalled > self.stuck_after:
            last = f": {self._last_error}" if self._last_error else ""
            return f"writer stuck: no commit for {time.monotonic() - stalled:.0f}s with writes waiting{last}"
        return None

    # -- writes (the rest are store.core's) --------------------------------------------------

    async def ping(self) -> None:
        """Commit one small real write: the database takes writes now."""
        async def write(batch: Batch) -> None:
            await batch.tx.execute("UPDATE tocsin_schema SET checked_at = ?", (time.time(),))
        await self._submit(write)

    async def _commit(self, jobs: list[Job]) -> None:
        """Write the jobs in one transaction; each job's future gets its result after COMMIT.
        A job PostgreSQL cannot store fails alone (InvalidWrite); a lost deadlock or race
        runs the batch again; any other trouble fails them all (StoreUnavailable)."""
        if not jobs:
            return
        if self._stalled_since is None:
            self._stalled_since = time.monotonic()
        started = time.perf_counter()
        results = None
        for attempt in range(_RETRIES + 1):
            try:
                if self._writer is None or self._writer.is_closed():
                    self._writer = await self._connect()
                try:
                    results = await self._transaction(jobs, one_by_one=False)
                except Exception as exc:
                    if not _data_error(exc):
                        raise
                    log.debug("a write in a batch of %d cannot be stored (%s): storing them one by one",
                              len(jobs), exc)
                    results = await self._transaction(jobs, one_by_one=True)
                break
            except Exception as exc:  # noqa: BLE001 - whatever it is, none of these writes is kept
                if _retryable(exc) and attempt < _RETRIES:
                    continue
                if self._writer is not None and self._writer.is_closed():
                    self._writer = None
                self._refuse(jobs, _why(exc))
                return
        self._committed(jobs, results, started)

    async def _transaction(self, jobs: list[Job], *, one_by_one: bool):
        conn = self._writer
        async with conn.transaction():
            if not one_by_one:
                return await self.prepare(Batch(PgTx(conn, self._seqs), time.time()), jobs)
            results = []
            for job in jobs:
                try:
                    async with conn.transaction():  # a savepoint: the job that fails is rolled back alone
                        results += await self.prepare(Batch(PgTx(conn, self._seqs), time.time()), [job])
                except Exception as exc:
                    if not _data_error(exc):
                        raise
                    log.warning("write refused, the rest of its batch kept", extra={"error": str(exc)})
                    results.append((job, None, InvalidWrite(str(exc))))
            return results

    # -- reads -----------------------------------------------------------------------

    async def _fetch(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        if self._pool is None:
            raise StoreUnavailable("the database is closed")
        try:
            return [tuple(r) for r in await self._pool.fetch(_dialect(sql), *params, timeout=30)]
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"database error: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


async def schema_version(conn: asyncpg.Connection) -> int:
    """The schema version a database has (0: none yet)."""
    exists = await conn.fetchval("SELECT to_regclass('tocsin_schema') IS NOT NULL")
    return await conn.fetchval("SELECT version FROM tocsin_schema") if exists else 0


async def migrate(conn: asyncpg.Connection, url: str) -> int:
    """Bring the schema up to date under the migration lock (instances starting together
    migrate once: the others wait, then find nothing to do); the version found before.
    DatabaseUnusable when the schema is newer than this code."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        version = await schema_version(conn)
        if version > SCHEMA_VERSION:
            raise DatabaseUnusable(f"database {redact(url)}: database schema version {version} is newer than this"
                                   f" tocsin (knows {SCHEMA_VERSION}); upgrade tocsin")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            async with conn.transaction():
                if number == 1:
                    await conn.execute("CREATE TABLE tocsin_schema (version INTEGER NOT NULL,"
                                       " checked_at DOUBLE PRECISION)")
                    await conn.execute("INSERT INTO tocsin_schema (version) VALUES (0)")
                await conn.execute(script)
                await conn.execute("UPDATE tocsin_schema SET version = $1", number)
            log.info("schema migrated", extra={"version": number})
        return version
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def examine_url(url: str) -> int:
    """Can tocsin use the PostgreSQL database at `url`? Its schema version (0: empty, serve
    creates the schema); DatabaseUnusable with one line saying why not. Reads only."""
    try:
        conn = await asyncpg.connect(url, timeout=_CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnusable(f"database {redact(url)}: {_why(exc)}") from None
    try:
        version = await schema_version(conn)
    except asyncpg.PostgresError as exc:
        raise DatabaseUnusable(f"database {redact(url)}: {_why(exc)}") from None
    finally:
        await conn.close()
    if version > SCHEMA_VERSION:
        raise DatabaseUnusable(f"database {redact(url)}: database schema version {version} is newer than this"
                               f" tocsin (knows {SCHEMA_VERSION}); upgrade tocsin")
    return version
