"""Open-loop HTTP load: POST unique ~1 KB alerts on a fixed schedule, whatever the server does.

wrk is closed-loop (a connection sends its next request when the previous answer is in),
and wrk2, which is not, is not in Debian. This client sends request i at t0 + i/rate and
measures each latency from that scheduled instant, so a server that stalls is charged
for the requests queued behind the stall. Raw asyncio protocols over pre-built requests
keep the client cheap; `--rate 0` drives as fast as it can (closed loop) to show its own
ceiling. Prints one JSON line.

    python bench/wrk/open_loop.py --url http://127.0.0.1:8080/integrations/v1/x/tok/ --rate 2000 --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from urllib.parse import urlsplit

PAD = "x" * 700  # brings each body to ~1 KB


def alert_body(prefix: str, n: int) -> bytes:
    """One unique formatted_webhook alert of about 1 KB."""
    return json.dumps({
        "alert_uid": f"{prefix}-{n}", "title": f"Disk almost full on host{n % 500}", "state": "alerting",
        "link_to_upstream_details": f"https://monitor.example.com/hosts/{n}",
        "message": f"/var is 96% full (threshold 90%) {PAD}", "image_url": "",
    }).encode()


def request_bytes(host: str, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection; `send` resolves to the status code of the response."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport):
        self.transport = transport

    def send(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data):
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._fail(ConnectionError("response without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17: stop if stop > 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(int(head[9:12]))

    def _fail(self, exc: Exception):
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def connection_lost(self, exc):
        self._fail(exc or ConnectionError("connection closed"))


class Pool:
    """Keep-alive connections, opened as needed up to `limit`; a request waits for a free one."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: deque[Connection] = deque()
        self.waiting: deque[asyncio.Future] = deque()
        self.opened = 0

    async def acquire(self) -> Connection:
        if self.idle:
            return self.idle.pop()
        if self.opened < self.limit:
            self.opened += 1
            _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
            return conn
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        return await waiter

    def release(self, conn: Connection) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


async def open_loop(url: str, rate: float, seconds: float, connections: int, prefix: str) -> dict:
    parts = urlsplit(url)
    pool = Pool(parts.hostname, parts.port, connections)
    host = parts.netloc
    total = int(rate * seconds)
    requests = [request_bytes(host, parts.path, alert_body(prefix, n)) for n in range(total)]
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()

    async def one(data: bytes, scheduled: float):
        nonlocal errors
        conn = await pool.acquire()
        lags.append(loop.time() - scheduled)
        try:
            status = await conn.send(data)
        except (ConnectionError, OSError):
            errors += 1
            pool.opened -= 1
            return
        latencies.append(loop.time() - scheduled)
        if not 200 <= status < 300:
            errors += 1
        pool.release(conn)

    # Open a first set of connections before the clock starts, as a steady sender would have.
    for conn in await asyncio.gather(*(pool.acquire() for _ in range(min(connections, 32)))):
        pool.release(conn)
    tasks = []
    start = loop.time() + 0.05
    for n, data in enumerate(requests):
        scheduled = start + n / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif n % 32 == 0:
            await asyncio.sleep(0)  # behind schedule: still let responses in
        tasks.append(loop.create_task(one(data, scheduled)))
    sent_done = loop.time()
    await asyncio.gather(*tasks)
    finished = loop.time()
    latencies.sort()
    lags.sort()
    return {
        "mode": "open", "scheduled_rate": rate, "sent": total, "completed": len(latencies), "errors": errors,
        "send_rate": total / (sent_done - start), "rate": len(latencies) / (finished - start),
        "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        "lag_p99_ms": percentile(lags, 0.99) * 1000, "connections": pool.opened,
    }


async def closed_loop(url: str, seconds: float, connections: int, prefix: str) -> dict:
    """As fast as the client can: the ceiling of this client against `url`."""
    parts = urlsplit(url)
    pool = Pool(parts.hostname, parts.port, connections)
    host = parts.netloc
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    loop = asyncio.get_running_loop()
    conns = await asyncio.gather(*(pool.acquire() for _ in range(connections)))
    stop = loop.time() + seconds

    async def worker(conn: Connection):
        nonlocal errors
        while loop.time() < stop:
            data = request_bytes(host, parts.path, alert_body(prefix, next(counter)))
            sent = loop.time()
            status = await conn.send(data)
            latencies.append(loop.time() - sent)
            if not 200 <= status < 300:
                errors += 1

    started = loop.time()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = loop.time() - started
    latencies.sort()
    return {
        "mode": "closed", "completed": len(latencies), "errors": errors, "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "connections": connections,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=1000, help="alerts/s; 0: as fast as possible (closed loop)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--prefix", default=f"ol{int(time.time())}")
    args = ap.parse_args()
    if args.rate > 0:
        result = asyncio.run(open_loop(args.url, args.rate, args.seconds, args.connections, args.prefix))
    else:
        result = asyncio.run(closed_loop(args.url, args.seconds, args.connections, args.prefix))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
