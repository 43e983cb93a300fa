"""Storage engines compared in one run: tocsin on SQLite, on PostgreSQL with one instance, and
on PostgreSQL with two instances sharing the database (the client splits its connections
between them). Each setup gets the same unique alerts over keep-alive HTTP; prints alerts/s,
p50/p99 latency, and the rows each database holds afterwards.

    .venv/bin/python bench/storage_engines.py [--requests 6000] [--connections 64]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres]

A throwaway PostgreSQL database is created per setup (CREATE DATABASE rights needed) and dropped.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_ingest import TOKEN, alert, start  # noqa: E402 - the same alerts and process start as the HTTP bench


async def drive(ports: list[int], total: int, connections: int) -> dict:
    urls = [f"http://127.0.0.1:{p}/integrations/v1/formatted_webhook/{TOKEN}/" for p in ports]
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def worker(url: str):
            nonlocal errors
            for n in counter:
                t0 = time.perf_counter()
                async with session.post(url, data=alert(n), headers=headers) as r:
                    await r.read()
                    errors += r.status != 200
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(session.post(urls[i % len(urls)], data=alert(-1 - i), headers=headers)
                               for i in range(64)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(urls[i % len(urls)]) for i in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rate": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[int(len(latencies) * 0.99)] * 1000, "errors": errors}


async def _admin(url: str, sql: str):
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def run_setup(name: str, database: str, instances: int, tmp: Path, args) -> dict:
    cfg = tmp / f"{name.replace(' ', '-')}.toml"
    cfg.write_text(f'[daemon]\ndatabase = "{database}"\nlog_level = "INFO"\n'
                   '[http]\nlisten = "127.0.0.1:0"\n[api]\ntokens = ["x"]\n'
                   f'[[integrations]]\nid = "bench"\nkind = "formatted_webhook"\ntoken = "{TOKEN}"\n')
    procs = []
    try:
        for _ in range(instances):
            procs.append(start([sys.executable, "-m", "daemon", "serve", "-c", str(cfg)],
                               r"tocsin ready.*? http=[^ ]+:(\d+)"))
        result = asyncio.run(drive([port for _, port in procs], args.requests, args.connections))
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=30)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--pg", default=os.environ.get("TOCSIN_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    server = urllib.parse.urlsplit(args.pg)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        results["SQLite"] = run_setup("sqlite", str(db), 1, Path(tmp), args)
        with sqlite3.connect(db) as conn:
            results["SQLite"]["stored"] = conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
        for label, instances in (("PostgreSQL x1", 1), ("PostgreSQL x2", 2)):
            name = f"tocsin_bench_{secrets.token_hex(4)}"
            asyncio.run(_admin(args.pg, f"CREATE DATABASE {name}"))
            url = urllib.parse.urlunsplit(server._replace(path=f"/{name}"))
            try:
                results[label] = run_setup(label, url, instances, Path(tmp), args)
                results[label]["stored"] = asyncio.run(_admin(url, "SELECT count(*) FROM alerts"))
            finally:
                asyncio.run(_admin(args.pg, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    print(f"{args.requests} unique alerts, {args.connections} keep-alive connections, {os.cpu_count()} cores;"
          f" PostgreSQL at {server.hostname}:{server.port or 5432} (synchronous_commit on)")
    print(f"{'setup':<16}{'alerts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'stored':>8}")
    for label, r in results.items():
        print(f"{label:<16}{r['rate']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>8}{r['stored']:>8}")


if __name__ == "__main__":
    main()
