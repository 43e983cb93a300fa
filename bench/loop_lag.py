"""Loop-lag benchmark: how long large legal bodies hold tocsin's event loop.

Starts `python -m daemon serve` on 127.0.0.1, then for each kind of body (1 MB JSON of
200k empty lists, 1 MB JSON of small objects, a 100k-field form, a 10k-field multipart)
sends them from 4 concurrent clients (in a child process, so they never delay the probe)
while a probe GETs /healthz every 10 ms on its own keep-alive connection. A /healthz answer is ~1 ms on an idle loop, so its worst latency
is the worst time the loop was held. Prints healthz p50/p99/max per kind, the daemon's
RSS and that of its body parser processes.

    .venv/bin/python bench/loop_lag.py [--bodies 6] [--concurrency 4] [--kind webhook] [--in-process]

--in-process runs the daemon inside this process instead and measures the loop lag itself:
a task that sleeps 5 ms and records how late it wakes (the senders stay in a child process).
On a shared machine the healthz figures carry the other processes' noise; this does not.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_ingest import rss_mib, start  # noqa: E402

TOKEN = "lag-token-0000001"


def descendants(pid: int) -> list[int]:
    """Every process under pid (the body parser workers and their forkserver)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


def workers_rss(pid: int) -> float:
    total = 0.0
    for child in descendants(pid):
        try:
            total += rss_mib(child)[0]
        except (OSError, KeyError):
            pass
    return total


def bodies() -> dict[str, tuple[bytes, str]]:
    multipart = b"".join(f'--B\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'.encode()
                         for i in range(10_000)) + b"--B--\r\n"
    return {
        "json: 200k empty lists": (b"[" + b",".join([b"[]"] * 200_000) + b"]", "application/json"),
        "json: 30k small objects": (json.dumps([{"k": i, "v": "text"} for i in range(30_000)]).encode(),
                                    "application/json"),
        "form: 100k fields": ("&".join(f"f{i}=v" for i in range(100_000)).encode(),
                              "application/x-www-form-urlencoded"),
        "multipart: 10k fields": (multipart, "multipart/form-data; boundary=B"),
    }


async def probe(base: str, stop: asyncio.Event, out: list[float]) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        while not stop.is_set():
            t0 = time.perf_counter()
            async with s.get(f"{base}/healthz") as r:
                await r.read()
            out.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.01)


async def send(url: str, data: bytes, ctype: str, n: int, concurrency: int) -> dict[int, int]:
    codes: dict[int, int] = {}
    todo = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            for _ in todo:
                async with s.post(url, data=data, headers={"Content-Type": ctype},
                                  timeout=aiohttp.ClientTimeout(total=60)) as r:
                    await r.read()
                    codes[r.status] = codes.get(r.status, 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


def send_in_child(url: str, data: bytes, ctype: str, n: int, concurrency: int, out) -> None:
    out.put(asyncio.run(send(url, data, ctype, n, concurrency)))


async def send_elsewhere(url: str, data: bytes, ctype: str, n: int, concurrency: int) -> dict[int, int]:
    out = multiprocessing.Queue()
    child = multiprocessing.Process(target=send_in_child, args=(url, data, ctype, n, concurrency, out))
    child.start()
    codes = await asyncio.to_thread(out.get, True, 120)
    child.join(10)
    return codes


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def run(port: int, pid: int, args) -> None:
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/integrations/v1/{args.kind}/{TOKEN}/"
    print(f"{'bodies (' + str(args.bodies) + ' each, ' + str(args.concurrency) + ' at once)':<34}"
          f"{'codes':>12}{'s':>6}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'RSS MiB':>9}")
    idle: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(base, stop, idle))
    await asyncio.sleep(1)
    stop.set()
    await task
    print(f"{'idle':<34}{'':>12}{'':>6}{statistics.median(idle):>8.1f}{pct(idle, .99):>8.1f}"
          f"{max(idle):>8.1f}{rss_mib(pid)[0]:>9.1f}")
    for name, (data, ctype) in bodies().items():
        lat: list[float] = []
        stop = asyncio.Event()
        task = asyncio.create_task(probe(base, stop, lat))
        t0 = time.perf_counter()
        codes = await send_elsewhere(url, data, ctype, args.bodies, args.concurrency)
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
        print(f"{name:<34}{json.dumps(codes):>12}{elapsed:>6.1f}{statistics.median(lat):>8.1f}"
              f"{pct(lat, .99):>8.1f}{max(lat):>8.1f}{rss_mib(pid)[0]:>9.1f}")
    print(f"daemon peak RSS {rss_mib(pid)[1]:.1f} MiB; its body parser processes now {workers_rss(pid):.1f} MiB")


async def lag_monitor(stop: asyncio.Event, out: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(0.005)
        out.append(max(0.0, (loop.time() - t0 - 0.005) * 1000))


async def run_in_process(cfg: Path, args) -> None:
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from daemon.app import Daemon, load_config

    daemon = Daemon(load_config(cfg))
    await daemon.start()
    url = f"http://127.0.0.1:{daemon.http_port}/integrations/v1/{args.kind}/{TOKEN}/"
    print(f"{'bodies (' + str(args.bodies) + ' each, ' + str(args.concurrency) + ' at once)':<34}"
          f"{'codes':>12}{'s':>6}{'lag p50':>9}{'lag p99':>9}{'lag max':>9}{'RSS MiB':>9}")
    try:
        for name, (data, ctype) in bodies().items():
            lags: list[float] = []
            stop = asyncio.Event()
            task = asyncio.create_task(lag_monitor(stop, lags))
            t0 = time.perf_counter()
            codes = await send_elsewhere(url, data, ctype, args.bodies, args.concurrency)
            elapsed = time.perf_counter() - t0
            stop.set()
            await task
            print(f"{name:<34}{json.dumps(codes):>12}{elapsed:>6.1f}{statistics.median(lags):>9.1f}"
                  f"{pct(lags, .99):>9.1f}{max(lags):>9.1f}{rss_mib(os.getpid())[0]:>9.1f}")
    finally:
        await daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bodies", type=int, default=6, help="bodies of each kind")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kind", default="formatted_webhook", help="integration kind receiving them")
    ap.add_argument("--in-process", action="store_true", help="measure the loop lag inside the daemon's process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(
            f'[daemon]\ndatabase = "{tmp}/lag.db"\n[http]\nlisten = "127.0.0.1:0"\n[api]\ntokens = ["x"]\n'
            f'[[integrations]]\nid = "lag"\nkind = "{args.kind}"\ntoken = "{TOKEN}"\n'
        )
        if args.in_process:
            asyncio.run(run_in_process(cfg, args))
            return
        proc, port = start([sys.executable, "-m", "daemon", "serve", "-c", str(cfg)],
                           r"tocsin ready http=[^ ]+:(\d+)")
        try:
            asyncio.run(run(port, proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
