"""Why asyncpg: the PostgreSQL writer's shape timed on asyncpg and on psycopg 3 (async), one
connection, batches of 32 alerts (advisory locks, a group SELECT FOR UPDATE, two executemany
INSERTs, an UPDATE, COMMIT with synchronous_commit on). Prints ms per batch and alerts/s.

    .venv/bin/pip install 'psycopg[binary]'   # not a tocsin dependency: only for this comparison
    .venv/bin/python bench/pg_drivers.py [postgresql://postgres@127.0.0.1:5432/postgres]
"""
import asyncio
import os
import secrets
import sys
import time

import asyncpg

try:
    import psycopg
except ImportError:
    sys.exit("psycopg is not installed: .venv/bin/pip install 'psycopg[binary]' to compare")

ADMIN = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TOCSIN_PG_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = ("CREATE TABLE g (id text primary key, k text, n int);"
          " CREATE TABLE a (id text primary key, g text, payload text, at double precision);")
BATCHES, SIZE = 300, 32
LOCKS = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest({}::bigint[]) AS k"
GROUPS = "SELECT id, k, n FROM g WHERE k = ANY({}) FOR UPDATE"


def rows(b: int):
    keys = [f"k{i}" for i in range(SIZE)]
    groups = [(f"g{b}-{i}", f"k{i}") for i in range(SIZE)]
    alerts = [(f"a{b}-{i}", f"g{b}-{i}", '{"x": 1}', time.time()) for i in range(SIZE)]
    return keys, groups, alerts


async def with_asyncpg(url: str) -> float:
    c = await asyncpg.connect(url)
    t0 = time.perf_counter()
    for b in range(BATCHES):
        keys, groups, alerts = rows(b)
        async with c.transaction():
            await c.execute(LOCKS.format("$1"), list(range(SIZE)))
            await c.fetch(GROUPS.format("$1"), keys)
            await c.executemany("INSERT INTO g VALUES ($1, $2, 1)", groups)
            await c.executemany("INSERT INTO a VALUES ($1, $2, $3, $4)", alerts)
            await c.execute("UPDATE g SET n = n + 1 WHERE id = $1", f"g{b}-0")
    dt = time.perf_counter() - t0
    await c.close()
    return dt


async def with_psycopg(url: str) -> float:
    c = await psycopg.AsyncConnection.connect(url)
    t0 = time.perf_counter()
    for b in range(BATCHES):
        keys, groups, alerts = rows(b)
        async with c.transaction():
            async with c.cursor() as cur:
                await cur.execute(LOCKS.format("%s"), (list(range(SIZE)),))
                await cur.execute(GROUPS.format("%s"), (keys,))
                await cur.fetchall()
                await cur.executemany("INSERT INTO g VALUES (%s, %s, 1)", groups)
                await cur.executemany("INSERT INTO a VALUES (%s, %s, %s, %s)", alerts)
                await cur.execute("UPDATE g SET n = n + 1 WHERE id = %s", (f"g{b}-0",))
    dt = time.perf_counter() - t0
    await c.close()
    return dt


async def main() -> None:
    admin = await asyncpg.connect(ADMIN)
    for name, fn in (("asyncpg", with_asyncpg), ("psycopg", with_psycopg)) * 2:
        db = f"tocsin_drv_{secrets.token_hex(4)}"
        await admin.execute(f"CREATE DATABASE {db}")
        url = ADMIN.rsplit("/", 1)[0] + "/" + db
        c = await asyncpg.connect(url)
        await c.execute(SCHEMA)
        await c.close()
        try:
            dt = await fn(url)
            print(f"{name:8} {BATCHES} batches of {SIZE}: {dt / BATCHES * 1000:.2f} ms per batch,"
                  f" {BATCHES * SIZE / dt:.0f} alerts/s")
        finally:
            await admin.execute(f"DROP DATABASE {db} WITH (FORCE)")
    await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
