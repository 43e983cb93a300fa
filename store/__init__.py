"""tocsin's ground floor: the database. Nothing else writes SQL; this imports nothing of ours."""
from .db import (
    SCHEMA_VERSION,
    DatabaseUnusable,
    Group,
    InvalidTransition,
    InvalidWrite,
    NewAlert,
    NotFound,
    OverLimit,
    SqliteStore,
    StoredAlert,
    StoreUnavailable,
    examine,
    public_id,
)
from .core import LEASE_MARGIN
from .lock import DatabaseLocked, ServeLock
from .protocol import Store


def is_url(database) -> bool:
    """True when the configured database names a PostgreSQL server, not an SQLite file."""
    return isinstance(database, str) and database.startswith(("postgresql://", "postgres://"))


def open_store(database, *, rules, **options) -> Store:
    """The engine the configured database names: a postgresql:// URL or an SQLite file path.
    `rules` are the alert-group rules (grouping.rules); the store is not opened yet."""
    if is_url(database):
        from .postgres import PgStore  # asyncpg loads only for the engine that uses it

        return PgStore(database, rules=rules, **options)
    return SqliteStore(database, rules=rules, **options)


def examine_database(database) -> int | None:
    """examine() for either engine: the schema version (None or 0: not created yet), or
    DatabaseUnusable with one line."""
    if is_url(database):
        import asyncio

        from .postgres import examine_url

        return asyncio.run(examine_url(database))
    return examine(database)

__all__ = [
    "LEASE_MARGIN", "DatabaseLocked", "DatabaseUnusable", "Group", "InvalidTransition", "InvalidWrite", "NewAlert",
    "NotFound", "OverLimit", "SCHEMA_VERSION", "ServeLock", "SqliteStore", "Store", "StoredAlert", "StoreUnavailable", "examine",
    "public_id", "examine_database", "is_url", "open_store",
]
