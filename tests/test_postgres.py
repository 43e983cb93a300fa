"""The PostgreSQL engine through the CLI: `tocsin migrate` (two at once migrate once), a schema
newer than the code refused in one line, `tocsin copy-db` from SQLite (checked, only into an
empty database), backup pointing at pg_dump. Against a real server (see conftest.pg_url)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg

from conftest import ROOT, config_text
from grouping import rules
from store import NewAlert, SqliteStore, open_store
from store.postgres import SCHEMA_VERSION


def _config(tmp_path, database) -> str:
    path = tmp_path / f"config-{abs(hash(str(database)))}.toml"
    path.write_text(config_text(tmp_path).replace(f'database = "{tmp_path / "tocsin.db"}"',
                                                  f'database = "{database}"'))
    return str(path)


def _tocsin(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


async def _fetch(url: str, sql: str):
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def test_two_migrates_at_once_migrate_once(tmp_path, pg_url):
    cfg = _config(tmp_path, pg_url)
    procs = [subprocess.Popen([sys.executable, "-m", "daemon", "migrate", "-c", cfg], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = sorted(out for out, _ in outs)
    assert "migrated from schema version 0" in said[0] and "up to date" in said[1], said
    assert "postgres@" in said[0] and pg_url.split("/")[-1] in said[0]
    rows = asyncio.run(_fetch(pg_url, "SELECT version FROM tocsin_schema"))
    assert [r[0] for r in rows] == [SCHEMA_VERSION]


def test_a_newer_schema_is_refused_in_one_line(tmp_path, pg_url):
    cfg = _config(tmp_path, pg_url)
    assert _tocsin("migrate", "-c", cfg).returncode == 0
    asyncio.run(_fetch(pg_url, f"UPDATE tocsin_schema SET version = {SCHEMA_VERSION + 1}"))
    for command in ("serve", "check", "migrate"):
        done = _tocsin(command, "-c", cfg)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "is newer than this tocsin" in lines[0], (command, done.stderr)


def test_an_unreachable_server_is_one_line(tmp_path):
    cfg = _config(tmp_path, "postgresql://tocsin@127.0.0.1:1/none")
    done = _tocsin("serve", "-c", cfg)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "127.0.0.1:1" in lines[0], done.stderr


def test_copy_db_moves_everything_and_checks_it(tmp_path, pg_url):
    source = tmp_path / "tocsin.db"

    async def fill():
        store = SqliteStore(source, rules=rules)
        await store.open()
        try:
            stored = await store.add_alerts([NewAlert("wh", f"k{i % 3}", json.dumps({"n": i}), title=f"t{i}",
                                                      raw=b"raw mail" if i == 0 else None) for i in range(10)])
            await store.act(stored[0].alert_group_id, "acknowledge", by="ann")
            await store.heartbeat("wh")
            await store.maintenance_start("am", "debug", 600, "debug am")
        finally:
            await store.close()
    asyncio.run(fill())
    cfg = _config(tmp_path, source)
    done = _tocsin("copy-db", "-c", cfg, "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert "3 alert_groups, 10 alerts" in done.stdout and "checked" in done.stdout

    async def compare():
        sqlite, pg = SqliteStore(source, rules=rules), open_store(pg_url, rules=rules)
        await sqlite.open()
        await pg.open()
        try:
            for a, b in ((await sqlite.list_groups(), await pg.list_groups()),
                         (await sqlite.list_alerts(), await pg.list_alerts()),
                         (await sqlite.heartbeats(), await pg.heartbeats()),
                         (await sqlite.maintenance(), await pg.maintenance())):
                assert a == b
            first = (await pg.list_groups())[1][-1]
            assert await sqlite.timeline(first.id) == await pg.timeline(first.id)
            _, alerts = await pg.list_alerts()
            with_raw = [a["id"] for a in alerts if json.loads(a["payload"]) == {"n": 0}]
            assert await pg.raw_message(with_raw[0]) == b"raw mail"
            # New rows continue after the copied ones, in the same group for an open key.
            again = (await pg.add_alerts([NewAlert("wh", "k1", "{}")]))[0]
            assert not again.group_created
        finally:
            await sqlite.close()
            await pg.close()
    asyncio.run(compare())
    refused = _tocsin("copy-db", "-c", cfg, "--to", pg_url)
    assert refused.returncode == 1 and "is not empty" in refused.stderr


def test_backup_on_postgresql_points_at_pg_dump(tmp_path, pg_url):
    done = _tocsin("backup", "-c", _config(tmp_path, pg_url), str(tmp_path / "b.db"))
    assert done.returncode == 1 and "pg_dump" in done.stderr


async def test_a_lost_connection_refuses_the_write_then_reconnects(pg_url):
    from store import StoreUnavailable

    store = open_store(pg_url, rules=rules)
    await store.open()
    try:
        first = (await store.add_alerts([NewAlert("wh", "k", "{}")]))[0]
        # The server ends every tocsin connection (a restart, a failover, an administrator).
        conn = await asyncpg.connect(pg_url, timeout=10)
        try:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND pid != pg_backend_pid()")
        finally:
            await conn.close()
        outcomes = []
        for _ in range(3):  # the write on the dead connection is refused (503: the sender retries)…
            try:
                outcomes.append((await store.add_alerts([NewAlert("wh", "k", "{}")]))[0].alert_group_id)
            except StoreUnavailable:
                outcomes.append("refused")
        assert outcomes[-1] == first.alert_group_id and outcomes.count("refused") <= 1, outcomes
        assert await store.readiness() is None  # …and the next ones go through a new connection
        assert (await store.get_group(first.alert_group_id)).alerts_count == 1 + outcomes.count(first.alert_group_id)
    finally:
        await store.close()
