"""HTTP ingestion benchmark: tocsin (durable commits) against a bare aiohttp JSON handler.

Both servers run as child processes on 127.0.0.1; one client drives each in turn with
64 concurrent keep-alive connections of unique alerts, and prints alerts/s, p50/p99
latency, server RSS and tocsin's share of the bare rate.

    .venv/bin/python bench/http_ingest.py [--requests 20000] [--connections 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-000001"

BARE_SERVER = r"""
import json, sys
from aiohttp import web

async def handle(request):
    json.loads(await request.read())
    return web.json_response({"ok": True})

app = web.Application()
app.router.add_post("/integrations/v1/{kind}/{token}/", handle)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print("ready port", runner.addresses[0][1], flush=True)
    import asyncio
    await asyncio.Event().wait()
import asyncio
asyncio.run(main())
"""


def start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def alert(n: int) -> bytes:
    return json.dumps({
        "alert_uid": f"bench-{n}", "title": f"Disk almost full on host{n % 500}", "state": "alerting",
        "link_to_upstream_details": f"https://monitor.example.com/hosts/{n}",
        "message": "/var is 96% full (threshold 90%)", "image_url": "",
    }).encode()


async def drive(port: int, total: int, connections: int) -> dict:
    url = f"http://127.0.0.1:{port}/integrations/v1/formatted_webhook/{TOKEN}/"
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=connections)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker():
            nonlocal errors
            for n in counter:
                body = alert(n)
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        # warm-up so both servers are measured hot
        await asyncio.gather(*(session.post(url, data=alert(-1 - i), headers=headers) for i in range(64)))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(
            f'[daemon]\ndatabase = "{tmp}/bench.db"\nlog_level = "INFO"\n'
            '[http]\nlisten = "127.0.0.1:0"\n[api]\ntokens = ["x"]\n'
            f'[[integrations]]\nid = "bench"\nkind = "formatted_webhook"\ntoken = "{TOKEN}"\n'
        )
        results = {}
        for name, cmd, pattern in (
            ("bare aiohttp", [sys.executable, "-c", BARE_SERVER], r"ready port (\d+)"),
            ("tocsin", [sys.executable, "-m", "daemon", "serve", "-c", str(cfg)], r"tocsin ready.*? http=[^ ]+:(\d+)"),
        ):
            proc, port = start(cmd, pattern)
            try:
                results[name] = asyncio.run(drive(port, args.requests, args.connections))
                results[name]["rss"], results[name]["peak"] = rss_mib(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        if "tocsin" in results:
            db = Path(tmp) / "bench.db"
            import sqlite3

            with sqlite3.connect(db) as conn:
                stored = conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
            results["tocsin"]["stored"] = stored

    print(f"{args.requests} unique alerts, {args.connections} keep-alive connections, "
          f"{os.cpu_count()} cores")
    print(f"{'server':<14}{'alerts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'RSS MiB':>9}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<14}{r['rate']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['rss']:>9.1f}{r['errors']:>8}")
    bare, ours = results["bare aiohttp"], results["tocsin"]
    print(f"ratio tocsin/bare: {ours['rate'] / bare['rate']:.2f}  (target >= 0.50, p99 <= 50 ms)")
    print(f"tocsin stored {ours['stored']} alerts (sent {args.requests} + 64 warm-up)")


if __name__ == "__main__":
    main()
