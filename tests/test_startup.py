"""What `tocsin serve` and `tocsin check` refuse: one line on stderr, exit 1, no traceback,
nothing left running. Real processes on real files and sockets.

We run as root, and root ignores file modes: `chmod 555` stops nobody. What does stop
root here is a path through a regular file (ENOTDIR) and the immutable attribute
(`chattr +i`, which also makes access(2) say no); those are what these tests use.
"""
from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import API_TOKEN, ROOT, config_text, write_config
from grouping import rules
from store import SCHEMA_VERSION, NewAlert, SqliteStore


def run(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m daemon ARGS`; a process that does not exit fails the test (it is killed)."""
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """Assert a one-line refusal on stderr naming `words`; return the line."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def serve(cfg: Path) -> subprocess.CompletedProcess:
    return run("serve", "-c", str(cfg))


def check(cfg: Path) -> subprocess.CompletedProcess:
    return run("check", "-c", str(cfg))


def listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def with_database(tmp_path: Path, database: Path, **kw) -> Path:
    cfg = write_config(tmp_path, **kw)
    cfg.write_text(cfg.read_text().replace(f'database = "{tmp_path / "tocsin.db"}"', f'database = "{database}"'))
    return cfg


def make_database(path: Path) -> None:
    """A real tocsin database with a few alerts, closed cleanly."""
    async def fill():
        store = SqliteStore(path, rules=rules)
        await store.open()
        for i in range(20):
            await store.add_alerts([NewAlert("wh", f"key-{i % 4}", '{"n": %d}' % i, title=f"alert {i}")])
        await store.close()

    asyncio.run(fill())


def chattr(flag: str, *paths: Path) -> None:
    r = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr {flag} is not available here: {r.stderr.strip()}")


# -- listeners --------------------------------------------------------------------------

def test_taken_http_port(tmp_path):
    taken = listening()
    try:
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path)
        cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1))
        refused(serve(cfg), "HTTP", f"127.0.0.1:{port}", "address already in use")
    finally:
        taken.close()


def test_taken_smtp_port(tmp_path):
    taken = listening()
    try:
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, smtp=True)
        text = cfg.read_text()
        smtp_at = text.index("[smtp]")
        cfg.write_text(text[:smtp_at] + text[smtp_at:].replace('listen = "127.0.0.1:0"',
                                                                 f'listen = "127.0.0.1:{port}"', 1))
        # The HTTP listener and the database were up when SMTP failed: all torn down again.
        refused(serve(cfg), "SMTP", f"127.0.0.1:{port}", "address already in use")
    finally:
        taken.close()


# -- the database file ------------------------------------------------------------------

def test_directory_is_a_file(tmp_path):
    (tmp_path / "plain").write_text("not a directory")
    cfg = with_database(tmp_path, tmp_path / "plain" / "tocsin.db")
    refused(serve(cfg), "plain", "not a directory")
    refused(check(cfg), "plain", "not a directory")


def test_directory_not_writable(tmp_path):
    place = tmp_path / "ro"
    place.mkdir()
    cfg = with_database(tmp_path, place / "tocsin.db")
    chattr("+i", place)
    try:
        refused(serve(cfg), str(place), "not writable")
        refused(check(cfg), str(place), "not writable")
        assert list(place.iterdir()) == []
    finally:
        chattr("-i", place)


def test_database_file_not_writable(tmp_path):
    db = tmp_path / "tocsin.db"
    make_database(db)
    cfg = write_config(tmp_path)
    chattr("+i", db)
    try:
        refused(serve(cfg), str(db), "not writable")
        refused(check(cfg), str(db), "not writable")
    finally:
        chattr("-i", db)


def test_not_a_database(tmp_path):
    db = tmp_path / "tocsin.db"
    db.write_text("these are my notes, not a database\n" * 200)
    cfg = write_config(tmp_path)
    refused(serve(cfg), str(db), "not a SQLite database")
    refused(check(cfg), str(db), "not a SQLite database")
    assert db.read_text().startswith("these are my notes")


@pytest.mark.parametrize("damage", ["schema page", "truncated"])
def test_corrupt_database(tmp_path, damage):
    db = tmp_path / "tocsin.db"
    make_database(db)
    if damage == "schema page":
        with db.open("r+b") as f:  # page 1 past the 100-byte header: the schema's b-tree
            f.seek(100)
            f.write(bytes(range(256)) * 8)
    else:
        with db.open("r+b") as f:
            f.truncate(db.stat().st_size // 2)
    cfg = write_config(tmp_path)
    refused(serve(cfg), str(db), "corrupt")
    refused(check(cfg), str(db), "corrupt")


def test_newer_schema_refused_and_untouched(tmp_path):
    db = tmp_path / "tocsin.db"
    newer = SCHEMA_VERSION + 4
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE from_the_future (x)")
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    cfg = write_config(tmp_path)
    line = refused(serve(cfg), f"database schema version {newer} is newer than this tocsin (knows {SCHEMA_VERSION})",
                   "upgrade tocsin")
    assert str(db) in line
    refused(check(cfg), f"database schema version {newer} is newer")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tocsin.db")) == ["tocsin.db"]


def test_stale_shm_not_writable(tmp_path):
    """A -shm left behind that this process may not write (here: immutable)."""
    db = tmp_path / "tocsin.db"
    make_database(db)
    shm = db.with_name("tocsin.db-shm")
    shm.write_bytes(b"\0" * 32768)
    cfg = write_config(tmp_path)
    chattr("+i", shm)
    try:
        refused(serve(cfg), str(shm), "not writable")
        refused(check(cfg), str(shm), "not writable")
    finally:
        chattr("-i", shm)


def test_check_missing_database_is_fine_and_creates_nothing(tmp_path):
    cfg = with_database(tmp_path, tmp_path / "var" / "tocsin.db")
    r = check(cfg)
    assert r.returncode == 0, r.stderr
    assert "not created yet" in r.stdout
    assert not (tmp_path / "var").exists()


async def test_second_daemon_on_the_same_database(spawn, tmp_path):
    first = spawn()
    cfg = first.config_path
    line = refused(serve(cfg), "already served by another tocsin", f"pid {first.proc.pid}",
                   str(tmp_path / "tocsin.db.lock"))
    assert str(tmp_path / "tocsin.db") in line
    # check reads the same file without the lock: validating a config beside a running daemon works.
    r = check(cfg)
    assert r.returncode == 0, r.stderr
    assert f"schema version {SCHEMA_VERSION}" in r.stdout
    async with aiohttp.ClientSession() as session:  # the first one never noticed
        async with session.get(f"{first.base}/readyz", timeout=aiohttp.ClientTimeout(total=20)) as resp:
            assert resp.status == 200
    assert first.stop() == 0
    # Once it is gone, the lock is free again.
    again = spawn(cfg)
    assert again.stop() == 0


# -- empty or truncated configuration (start, check and reload share one rule) ------------

def _no_integrations(tmp_path: Path) -> str:
    text = config_text(tmp_path)
    return text[:text.index("[[integrations]]")]


def test_empty_config_refused_by_check_and_serve(tmp_path):
    cfg = tmp_path / "config.toml"
    for text in ("", _no_integrations(tmp_path)):
        cfg.write_text(text)
        for r in (check(cfg), serve(cfg)):
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert "no [[integrations]]" in r.stderr
    # new-integration still starts from such a file, and the result passes.
    r = run("new-integration", "-c", str(cfg), "--kind", "webhook", "--name", "First")
    assert r.returncode == 0, r.stderr
    assert check(cfg).returncode == 0


async def _integration_ids(base: str) -> list[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.get(f"{base}/api/v1/integrations/", headers={"Authorization": API_TOKEN}) as r:
            assert r.status == 200
            return sorted(i["id"] for i in (await r.json())["results"])


async def _refused_reload(proc, cfg: Path, text: str, words: str) -> None:
    seen = len(proc.output)
    cfg.write_text(text)
    proc.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        await asyncio.sleep(0.1)
        if any("reload refused" in line for line in proc.output[seen:]):
            break
    refusals = [line for line in proc.output[seen:] if "reload refused" in line]
    assert len(refusals) == 1 and words in refusals[0], proc.output[seen:]


async def test_reload_refuses_empty_and_truncated_files(spawn, tmp_path):
    proc = spawn()
    cfg = proc.config_path
    good = cfg.read_text()
    ids = await _integration_ids(proc.base)
    assert len(ids) > 1
    await _refused_reload(proc, cfg, "", "no [[integrations]]")
    await _refused_reload(proc, cfg, _no_integrations(tmp_path), "no [[integrations]]")
    # Integrations kept but the [api] tokens lost: everyone would be locked out of the API.
    api = good.index("[api]")
    await _refused_reload(proc, cfg, good[:api] + good[good.index("[[integrations]]"):], "[api] tokens: none left")
    assert await _integration_ids(proc.base) == ids  # the running config stayed
    assert check(cfg).returncode == 0  # (no tokens is valid on its own: only a reload knows what it had)
    assert proc.stop() == 0
