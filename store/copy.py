"""Moving up: copy an SQLite database into an empty PostgreSQL one (`tocsin copy-db`), in one
transaction, then check that every table holds the same rows on both sides.

Run it with tocsin stopped (or accept that alerts after the copy began stay behind).
"""
from __future__ import annotations

import hashlib
import sqlite3
import urllib.parse
from pathlib import Path

import asyncpg

from .db import examine
from .postgres import _CONNECT_TIMEOUT, migrate, redact
from .values import DatabaseUnusable

# Every table, with the column that identifies a row (for the check).
TABLES = (("alert_groups", "id"), ("alerts", "id"), ("heartbeats", "integration_id"), ("escalations", "group_id"),
          ("notifications", "id"), ("timeline", "seq"), ("maintenance", "integration_id"), ("receipts", "key"),
          ("group_labels", "group_seq"))
_CHUNK = 5000


class CopyFailed(Exception):
    """The copy could not be made or did not check; the PostgreSQL database is left as it was."""


async def copy_database(source: Path, url: str) -> dict[str, int]:
    """Copy every row of the SQLite database at `source` into the PostgreSQL database at `url`
    (which must hold no tocsin rows); the rows per table, once checked."""
    try:
        if not examine(source):
            raise CopyFailed(f"no tocsin database at {source}")
    except DatabaseUnusable as exc:
        raise CopyFailed(str(exc)) from None
    db = sqlite3.connect(f"file:{urllib.parse.quote(str(source))}?mode=ro", uri=True)
    try:
        conn = await asyncpg.connect(url, timeout=_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        db.close()
        raise CopyFailed(f"database {redact(url)}: {exc}") from None
    try:
        await migrate(conn, url)
        for table, _ in TABLES:
            if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                raise CopyFailed(f"{redact(url)} is not empty (table {table} has rows); copy into an empty database")
        counts: dict[str, int] = {}
        async with conn.transaction():
            for table, key in TABLES:
                counts[table] = await _copy_table(db, conn, table)
            for table, sequence in (("alert_groups", "alert_groups_seq"), ("alerts", "alerts_seq"),
                                    ("timeline", "timeline_seq_seq")):
                # New rows continue after the copied ones.
                await conn.execute(f"SELECT setval('{sequence}', (SELECT coalesce(max(seq), 0) + 1 FROM {table}),"
                                   " false)")
            for table, key in TABLES:
                problem = await _check(db, conn, table, key)
                if problem:
                    raise CopyFailed(f"the copy of {table} does not match: {problem}; nothing was kept")
        return counts
    except (asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error) as exc:
        raise CopyFailed(f"{exc}; nothing was kept") from None
    finally:
        db.close()
        await conn.close()


async def _copy_table(db: sqlite3.Connection, conn: asyncpg.Connection, table: str) -> int:
    types = {r[0]: r[1] for r in await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1", table)}
    cur = db.execute(f"SELECT * FROM {table}")
    columns = [d[0] for d in cur.description if d[0] in types]
    convert = [_converter(types[c]) for c in columns]
    index = {d[0]: i for i, d in enumerate(cur.description)}
    picks = [index[c] for c in columns]
    total = 0
    while True:
        rows = cur.fetchmany(_CHUNK)
        if not rows:
            return total
        records = [tuple(f(row[i]) for f, i in zip(convert, picks)) for row in rows]
        await conn.copy_records_to_table(table, records=records, columns=columns)
        total += len(records)


def _converter(pg_type: str):
    """SQLite keeps what it was given (an integer in a REAL column): PostgreSQL's columns want their own type."""
    if pg_type == "double precision":
        return lambda v: None if v is None else float(v)
    if pg_type in ("integer", "bigint"):
        return lambda v: None if v is None else int(v)
    if pg_type == "bytea":
        return lambda v: None if v is None else bytes(v)
    return lambda v: None if v is None else str(v)


async def _check(db: sqlite3.Connection, conn: asyncpg.Connection, table: str, key: str) -> str | None:
    """The same number of rows and the same row identities on both sides."""
    mine = _digest(str(r[0]) for r in db.execute(f"SELECT {key} FROM {table}"))
    theirs = _digest(str(r[0]) for r in await conn.fetch(f"SELECT {key} FROM {table}"))
    if mine != theirs:
        return f"{mine[0]} rows in SQLite, {theirs[0]} in PostgreSQL" if mine[0] != theirs[0] else "different rows"
    return None


def _digest(keys) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    for k in sorted(keys):
        h.update(k.encode() + b"\0")
        n += 1
    return n, h.hexdigest()
