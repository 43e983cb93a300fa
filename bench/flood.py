"""Flood benchmark: tocsin's memory under 2,000 idle connections, 2,000 slow clients,
200 clients that stall one byte short of a 900 KB body, and a burst at 10x an
integration's rate limit.

    .venv/bin/python bench/flood.py [--connections 2000] [--nearly 200] [--limit 1000]

Prints RSS (MiB) at each stage, what the stalled uploads were answered, and what the
burst got: 200s, 429s, alerts/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_ingest import rss_mib, start  # noqa: E402

TOKEN = "flood-token-000001"
OTHER = "flood-other-000001"


async def hold_idle(port: int, n: int) -> list:
    conns = []
    for _ in range(n):
        try:
            conns.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5))
        except (OSError, asyncio.TimeoutError):
            break
    return conns


async def hold_slow(port: int, n: int) -> list:
    """Clients that send half a request (headers, then a trickle of body) and stall."""
    conns = []
    head = (f"POST /integrations/v1/formatted_webhook/{TOKEN}/ HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 900000\r\n\r\n{\"a\": \"").encode()
    for _ in range(n):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            w.write(head + b"x" * 4000)
            conns.append((r, w))
        except (OSError, asyncio.TimeoutError):
            break
    await asyncio.sleep(0.5)
    return conns


async def hold_nearly(port: int, n: int) -> tuple[list, dict]:
    """Clients that send all of a 900 KB body but its last byte, and stall."""
    conns, answers = [], {}
    head = (f"POST /integrations/v1/formatted_webhook/{OTHER}/ HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 900001\r\n\r\n").encode()
    body = b'{"a": "' + b"x" * (900000 - 7)
    for _ in range(n):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            w.write(head + body)
            conns.append((r, w))
        except (OSError, asyncio.TimeoutError):
            break
    await asyncio.sleep(2)
    for r, _ in conns:  # those refused at once have their answer waiting
        try:
            line = await asyncio.wait_for(r.readline(), 0.01)
            answers[line[9:12].decode() or "closed"] = answers.get(line[9:12].decode() or "closed", 0) + 1
        except asyncio.TimeoutError:
            answers["waiting"] = answers.get("waiting", 0) + 1
    return conns, answers


def close_all(conns) -> None:
    for c in conns:
        c[1].close()


async def burst(port: int, total: int, connections: int = 64) -> dict:
    url = f"http://127.0.0.1:{port}/integrations/v1/formatted_webhook/{TOKEN}/"
    codes: dict[int, int] = {}
    counter = iter(range(total))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        async def worker():
            for n in counter:
                async with s.post(url, data=json.dumps({"alert_uid": f"b{n}", "title": "burst"}),
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    codes[r.status] = codes.get(r.status, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
        async with s.post(url.replace(TOKEN, OTHER), json={"alert_uid": "other"}) as r:
            other = r.status
    return {"codes": codes, "rate": total / elapsed, "other": other}


async def run(port: int, pid: int, args) -> None:
    print(f"{'stage':<44}{'RSS MiB':>9}{'peak MiB':>10}")

    def show(stage: str) -> None:
        rss, peak = rss_mib(pid)
        print(f"{stage:<44}{rss:>9.1f}{peak:>10.1f}")

    show("started")
    idle = await hold_idle(port, args.connections)
    await asyncio.sleep(0.5)
    show(f"{len(idle)} idle connections")
    close_all(idle)
    await asyncio.sleep(0.5)
    slow = await hold_slow(port, args.connections)
    show(f"{len(slow)} slow clients (half-sent 900 KB bodies)")
    close_all(slow)
    await asyncio.sleep(1)
    show("after they left")
    nearly, answers = await hold_nearly(port, args.nearly)
    show(f"{len(nearly)} stalled 1 byte short of 900 KB")
    print(f"  their answers meanwhile: {answers}")
    close_all(nearly)
    await asyncio.sleep(1)
    show("after they left")
    result = await burst(port, args.limit * 10)
    show(f"after a burst of {args.limit * 10} (limit {args.limit}/1m)")
    print(f"burst answers: {result['codes']}, {result['rate']:.0f} requests/s; "
          f"another integration meanwhile: {result['other']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--nearly", type=int, default=200)
    ap.add_argument("--limit", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(
            f'[daemon]\ndatabase = "{tmp}/flood.db"\n[http]\nlisten = "127.0.0.1:0"\n[api]\ntokens = ["x"]\n'
            f'[[integrations]]\nid = "flood"\nkind = "formatted_webhook"\ntoken = "{TOKEN}"\n'
            f'rate_limit = "{args.limit}/1m"\n'
            f'[[integrations]]\nid = "other"\nkind = "formatted_webhook"\ntoken = "{OTHER}"\n'
        )
        proc, port = start([sys.executable, "-m", "daemon", "serve", "-c", str(cfg)],
                           r"tocsin ready.*? http=[^ ]+:(\d+)")
        try:
            asyncio.run(run(port, proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
