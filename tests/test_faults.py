"""Storage faults while running: /readyz and ingestion tell the truth (503 with the reason),
recover by themselves when the cause is fixed, and a 200 is always where a restart finds it.
One write SQLite cannot store fails alone.

Faults are made for real: the immutable attribute (root ignores file modes), files moved
or removed under the daemon, another process holding the write lock, a small tmpfs filled
up (mounting needs root; that test skips without it).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest

from conftest import TOKEN, write_config
from grouping import rules
from store import InvalidWrite, NewAlert, SqliteStore, StoredAlert, StoreUnavailable

TIMEOUT = aiohttp.ClientTimeout(total=30)


def with_database(tmp_path: Path, database: Path) -> Path:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(f'database = "{tmp_path / "tocsin.db"}"', f'database = "{database}"'))
    return cfg


def chattr(flag: str, *paths: Path) -> None:
    r = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr {flag} is not available here: {r.stderr.strip()}")


class Client:
    """HTTP against a spawned daemon, every wait bounded."""

    def __init__(self, base: str):
        self.base = base
        self.session = aiohttp.ClientSession(timeout=TIMEOUT)
        self.n = 0

    async def ready(self) -> tuple[int, dict]:
        async with self.session.get(f"{self.base}/readyz") as r:
            return r.status, await r.json()

    async def post(self, title: str = "disk full") -> tuple[int, dict]:
        self.n += 1
        body = json.dumps({"alert_uid": f"fault-{self.n}", "title": title, "state": "alerting"})
        async with self.session.post(f"{self.base}/integrations/v1/formatted_webhook/{TOKEN['fw']}/", data=body,
                                     headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    async def close(self) -> None:
        await self.session.close()


async def until_ready(client: Client) -> dict:
    """Poll /readyz until 200 (bounded); recovery needs no restart."""
    for _ in range(100):
        status, body = await client.ready()
        if status == 200:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"never ready again: {body}")


def stored_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM alerts")}
    finally:
        conn.close()


# -- read-only, vanished, unwritable -shm ---------------------------------------------------

@pytest.mark.parametrize("made_read_only", ["file", "directory"])
async def test_read_only_database_then_recovery(spawn, tmp_path, made_read_only):
    db = tmp_path / "data" / "tocsin.db"
    proc = spawn(with_database(tmp_path, db))
    target = db if made_read_only == "file" else db.parent
    client = Client(proc.base)
    try:
        assert (await client.post())[0] == 200
        chattr("+i", target)
        try:
            status, body = await client.ready()
            assert status == 503 and "not writable" in body["error"] and str(target) in body["error"]
            status, body = await client.post()
            assert status == 503 and "not writable" in body["error"]
        finally:
            chattr("-i", target)
        await until_ready(client)
        status, body = await client.post()
        assert status == 200
    finally:
        await client.close()
    assert proc.stop() == 0
    assert any("database unavailable" in line and "not writable" in line for line in proc.output)
    assert any("database available again" in line for line in proc.output)


async def test_database_moved_away_and_back(spawn, tmp_path):
    data = tmp_path / "data"
    db = data / "tocsin.db"
    proc = spawn(with_database(tmp_path, db))
    client = Client(proc.base)
    accepted = []
    try:
        status, body = await client.post()
        assert status == 200
        accepted.append(body["alert_id"])
        data.rename(tmp_path / "elsewhere")
        status, body = await client.ready()
        assert status == 503 and "removed or moved" in body["error"]
        status, body = await client.post()
        assert status == 503  # would have gone into a file no restart opens
        (tmp_path / "elsewhere").rename(data)  # the same file back at its path: ready again
        await until_ready(client)
        status, body = await client.post()
        assert status == 200
        accepted.append(body["alert_id"])
    finally:
        await client.close()
    assert proc.stop() == 0
    assert set(accepted) <= stored_ids(db)


async def test_database_removed_is_not_replaced_silently(spawn, tmp_path):
    data = tmp_path / "data"
    db = data / "tocsin.db"
    proc = spawn(with_database(tmp_path, db))
    client = Client(proc.base)
    try:
        assert (await client.post())[0] == 200
        shutil.rmtree(data)
        status, body = await client.ready()
        assert status == 503 and "removed or moved" in body["error"]
        assert (await client.post())[0] == 503
        # A new file at the path is not adopted under the running daemon, nor created by it.
        data.mkdir()
        sqlite3.connect(db).close()
        status, body = await client.ready()
        assert status == 503 and "replaced" in body["error"]
        assert (await client.post())[0] == 503
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0  # not migrated, not written
        conn.close()
    finally:
        await client.close()
    assert proc.stop() == 0


async def test_shm_not_writable_while_running(spawn, tmp_path):
    """An immutable -shm used to kill the process with SIGBUS, silently."""
    db = tmp_path / "tocsin.db"
    shm = tmp_path / "tocsin.db-shm"
    proc = spawn()
    client = Client(proc.base)
    try:
        status, body = await client.post()
        assert status == 200
        first = body["alert_id"]
        chattr("+i", shm)
        try:
            status, body = await client.ready()
            assert status == 503 and str(shm) in body["error"]
            assert (await client.post())[0] == 503
            await asyncio.sleep(1.5)  # housekeeping and the engine read meanwhile
            assert proc.proc.poll() is None
        finally:
            chattr("-i", shm)
        await until_ready(client)
        assert (await client.post())[0] == 200
        # Stopping with the -shm unwritable: no SIGBUS either; the database is left for recovery.
        chattr("+i", shm)
        try:
            code = proc.stop()
        finally:
            chattr("-i", shm)
        assert code == 1, proc.output
    finally:
        await client.close()
    assert any("database unavailable" in line and str(shm) in line for line in proc.output)
    assert any("left for SQLite to recover" in line for line in proc.output)
    again = spawn(proc.config_path)
    assert again.stop() == 0
    assert first in stored_ids(db)


# -- another process holds the write lock ------------------------------------------------------

async def test_writer_stuck_behind_a_foreign_lock(spawn, tmp_path):
    proc = spawn()
    client = Client(proc.base)
    holder = sqlite3.connect(tmp_path / "tocsin.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # an operator's sqlite3 shell left in a transaction
        post = asyncio.create_task(client.post())
        for _ in range(40):  # the loop keeps serving while the writer waits: readyz answers
            status, body = await client.ready()
            if "stuck" in body.get("error", ""):
                break
            await asyncio.sleep(0.25)
        assert status == 503 and "stuck" in body["error"], body
        status, body = await post
        assert status == 503 and "locked" in body["error"]
        holder.execute("ROLLBACK")
        await until_ready(client)
        assert (await client.post())[0] == 200
    finally:
        holder.close()
        await client.close()
    assert proc.stop() == 0


# -- disk full ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs; skips where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros until the filesystem has no block left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 512):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


async def test_disk_full_then_recovery(spawn, tmp_path, small_disk):
    db = small_disk / "tocsin.db"
    proc = spawn(with_database(tmp_path, db))
    client = Client(proc.base)
    accepted = []
    try:
        status, body = await client.post()
        assert status == 200
        accepted.append(body["alert_id"])
        fill(small_disk / "filler")
        answers = []
        for _ in range(20):  # a 200 on a full disk is fine if it was committed (checked below)
            status, body = await client.post("x" * 2000)
            answers.append(status)
            if status == 200:
                accepted.append(body["alert_id"])
            else:
                assert status == 503 and "disk is full" in body["error"], body
                break
        assert 503 in answers
        status, body = await client.ready()
        assert status == 503 and "disk is full" in body["error"]
        (small_disk / "filler").unlink()
        await until_ready(client)
        status, body = await client.post()
        assert status == 200
        accepted.append(body["alert_id"])
    finally:
        await client.close()
    assert proc.stop() == 0
    assert set(accepted) <= stored_ids(db)


# -- one poisoned write fails alone ------------------------------------------------------------

def _alert(i: int, poisoned: bool = False) -> NewAlert:
    title = f"alert {i}" + ("\ud800" if poisoned else "")  # a lone surrogate: no UTF-8 for it
    return NewAlert("wh", f"poison-{i}" if poisoned else f"key-{i % 5}", json.dumps({"n": i}), title=title)


async def test_poisoned_write_fails_alone_in_its_batch(tmp_path):
    store = SqliteStore(tmp_path / "t.db", rules=rules)
    batches: list[int] = []
    store.on_commit = lambda size, seconds: batches.append(size)
    await store.open()
    try:
        # Queued together before the writer runs: one batch.
        futures = [store.add_alerts([_alert(i, poisoned=i % 7 == 3)]) for i in range(40)]
        futures.append(store.add_alerts([_alert(100), _alert(101, poisoned=True)]))  # one request, all or nothing
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert batches == [41]
        for i, result in enumerate(results[:40]):
            if i % 7 == 3:
                assert isinstance(result, InvalidWrite) and "surrogate" in str(result), result
            else:
                assert isinstance(result, list) and isinstance(result[0], StoredAlert), result
        assert isinstance(results[40], InvalidWrite)
        kept = {r[0].alert_id for r in results[:40] if isinstance(r, list)}
        assert len(kept) == 34
        # The writer goes on as before.
        assert len(await store.add_alerts([_alert(200)])) == 1
        assert await store.readiness() is None
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "t.db")
    try:
        assert kept <= {r[0] for r in conn.execute("SELECT id FROM alerts")}
        assert conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 35
        assert conn.execute("SELECT count(*) FROM alert_groups g WHERE alerts_count !="
                            " (SELECT count(*) FROM alerts a WHERE a.alert_group_id = g.id)").fetchone()[0] == 0
    finally:
        conn.close()


async def test_storage_trouble_still_fails_the_whole_batch(tmp_path):
    """A full database (here PRAGMA max_page_count on the writer's connection, the same
    SQLITE_FULL a full disk gives) is not blamed on one write: every one is refused, 503."""
    store = SqliteStore(tmp_path / "t.db", rules=rules)
    await store.open()
    try:
        await store.add_alerts([_alert(0)])
        pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
        store._writer.execute(f"PRAGMA max_page_count = {pages}")
        big = [NewAlert("wh", f"big-{i}", json.dumps({"pad": "x" * 20000}), title="big") for i in range(5)]
        results = await asyncio.gather(*(store.add_alerts([a]) for a in big), store.add_alerts([_alert(1, True)]),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) and "full" in str(r) for r in results), results
        store._writer.execute("PRAGMA max_page_count = 1073741823")
        assert len(await store.add_alerts([_alert(2)])) == 1
    finally:
        await store.close()


async def test_poisoned_http_posts_among_innocent_ones(tocsin):
    url = f"{tocsin.base}/integrations/v1/formatted_webhook/{TOKEN['fw']}/"

    async def post(i: int, poisoned: bool):
        title = f"title {i}" + ("\ud800" if poisoned else "")
        body = json.dumps({"alert_uid": f"poison-{i}", "title": title, "state": "alerting"})  # \ud800 escaped: valid JSON
        async with tocsin.session.post(url, data=body, headers={"Content-Type": "application/json"},
                                       timeout=TIMEOUT) as r:
            return r.status

    poisoned = {i for i in range(64) if i % 9 == 4}
    statuses = await asyncio.gather(*(post(i, i in poisoned) for i in range(64)))
    assert [s for i, s in enumerate(statuses) if i not in poisoned] == [200] * (64 - len(poisoned))
    assert [s for i, s in enumerate(statuses) if i in poisoned] == [400] * len(poisoned)
    groups = await tocsin.groups(integration_id="fw")
    assert len(groups) == 64 - len(poisoned)
