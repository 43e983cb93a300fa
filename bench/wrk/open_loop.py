"""Open-loop HTTP load: POST unique ~1 KB alerts on a fixed schedule, whatever the server does.

wrk is closed-loop (a connection sends its next request when the previous answer is in),
and wrk2, which is not, is not in Debian. This client sends request i at t0 + i/rate and
measures each latency from that scheduled instant, so a server that stalls is charged
for the requests queued behind it (no coordinated omission). It stays cheap: protocol
callbacks instead of a task per request, bodies made by filling a counter into a byte
template. The scheduler wakes about once a millisecond (epoll's resolution) and sends
everything due, so up to ~1 ms of each latency is the client's. `--rate 0` drives as
fast as it can (closed loop) to show its own ceiling. Prints one JSON line.

    python bench/wrk/open_loop.py --url http://127.0.0.1:8080/integrations/v1/x/tok/ --rate 2000 --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from urllib.parse import urlsplit

try:  # libuv's loop halves the client's CPU per request; plain asyncio works too
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

# uvloop's loop.time() counts whole milliseconds, cached per loop turn: measure with this.
clock = time.perf_counter
PAD = "x" * 700  # brings each body to ~1 KB


def request_maker(url: str, prefix: str):
    """A function n -> the bytes of POST request n: one unique formatted_webhook alert of ~1 KB."""
    parts = urlsplit(url)
    body = json.dumps({
        "alert_uid": f"{prefix}-@@@@@@@@@", "title": "Disk almost full on host@@@@@@@@@", "state": "alerting",
        "link_to_upstream_details": "https://monitor.example.com/hosts/@@@@@@@@@",
        "message": f"/var is 96% full (threshold 90%) {PAD}", "image_url": "",
    }).encode()
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    template = (head + body).replace(b"%", b"%%").replace(b"@@@@@@@@@", b"%09d")

    def make(n: int) -> bytes:
        return template % (n, n % 500, n)

    return make


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time for its Client."""

    def __init__(self, client: "Client"):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scheduled = 0.0

    def connection_made(self, transport):
        self.transport = transport

    def start(self, data: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        self.transport.write(data)

    def data_received(self, data):
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17: stop if stop > 0 else len(head)]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        self.client.done(self, int(head[9:12]))

    def connection_lost(self, exc):
        self.client.lost(self)


class Client:
    """Keep-alive connections opened as needed up to `limit`; requests beyond wait in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, limit: int, closed_loop=None):
        self.loop, self.host, self.port, self.limit = loop, host, port, limit
        self.idle: list[Connection] = []
        self.backlog: deque[tuple[bytes, float]] = deque()
        self.opened = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.outstanding = 0
        self.closed_loop = closed_loop  # for the ceiling: a function giving the next request, or None
        self.finished = loop.create_future()
        self.draining = False  # set once nothing more will be submitted

    async def connect(self, n: int) -> None:
        for _ in range(n):
            self.opened += 1
            _, conn = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
            self.idle.append(conn)

    def submit(self, data: bytes, scheduled: float) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().start(data, scheduled)
        else:
            self.backlog.append((data, scheduled))
            if self.opened < self.limit:
                self.opened += 1
                self.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.opened -= 1
            return
        self._next(conn)

    def _next(self, conn: Connection) -> None:
        if self.backlog:
            conn.start(*self.backlog.popleft())
        elif self.closed_loop is not None:
            request = self.closed_loop()
            if request is not None:
                conn.start(request, clock())
                self.outstanding += 1
        else:
            self.idle.append(conn)

    def done(self, conn: Connection, status: int) -> None:
        now = clock()
        self.latencies.append(now - conn.scheduled)
        if not 200 <= status < 300:
            self.errors += 1
        self.outstanding -= 1
        self._next(conn)
        if self.draining and self.outstanding == 0 and not self.finished.done():
            self.finished.set_result(now)

    def lost(self, conn: Connection) -> None:
        self.opened -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        else:
            self.errors += 1
            self.outstanding -= 1


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


async def open_loop(url: str, rate: float, seconds: float, connections: int, prefix: str) -> dict:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    client = Client(loop, parts.hostname, parts.port, connections)
    make = request_maker(url, prefix)
    await client.connect(min(connections, 32))  # a steady sender would have these open already
    total = int(rate * seconds)
    start = clock() + 0.05
    n = 0
    while n < total:
        now = clock()
        while n < total and start + n / rate <= now:
            client.submit(make(n), start + n / rate)
            n += 1
        if n < total:
            await asyncio.sleep(max(0.0, start + n / rate - clock()))
    sent_done = clock()
    client.draining = True
    finished = await asyncio.wait_for(client.finished, timeout=120) if client.outstanding else sent_done
    lat = sorted(client.latencies)
    return {
        "mode": "open", "scheduled_rate": rate, "sent": total, "completed": len(lat), "errors": client.errors,
        "send_rate": total / (sent_done - start), "rate": len(lat) / (finished - start),
        "p50_ms": percentile(lat, 0.5) * 1000, "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": (lat[-1] * 1000) if lat else float("nan"), "connections": client.opened,
    }


async def closed_loop(url: str, seconds: float, connections: int, prefix: str) -> dict:
    """As fast as the client can over `connections`: its ceiling against `url`."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    make = request_maker(url, prefix)
    counter = iter(range(10**9))
    stop = clock() + seconds + 0.05

    def next_request():
        return make(next(counter)) if clock() < stop else None

    client = Client(loop, parts.hostname, parts.port, connections, closed_loop=next_request)
    client.draining = True
    await client.connect(connections)
    started = clock()
    for _ in range(connections):
        client.submit(make(next(counter)), clock())
    finished = await asyncio.wait_for(client.finished, timeout=seconds + 60)
    lat = sorted(client.latencies)
    return {
        "mode": "closed", "completed": len(lat), "errors": client.errors, "rate": len(lat) / (finished - started),
        "p50_ms": percentile(lat, 0.5) * 1000, "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": (lat[-1] * 1000) if lat else float("nan"), "connections": connections,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=1000, help="alerts/s; 0: as fast as possible (closed loop)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--prefix", default=f"ol{int(time.time())}")
    args = ap.parse_args()
    run = uvloop.run if uvloop is not None else asyncio.run
    if args.rate > 0:
        result = run(open_loop(args.url, args.rate, args.seconds, args.connections, args.prefix))
    else:
        result = run(closed_loop(args.url, args.seconds, args.connections, args.prefix))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
