"""HTTP ingestion benchmark: tocsin (durable commits) against a bare aiohttp JSON handler.

Three servers run as child processes on 127.0.0.1: a static 200 responder (raw asyncio, no
HTTP library: it shows the client's own ceiling), bare aiohttp (parse the JSON, answer
200) and tocsin, whose formatted_webhook integration "bench" renders the kind's defaults
natively and "bench-sandbox" renders the same templates in the sandbox. Every request is
a unique ~1 KB alert.

- Closed loop: wrk (Debian's package) with 64 keep-alive connections, bare aiohttp and
  tocsin alternating round by round.
- Open loop: bench/wrk/open_loop.py sends on a fixed schedule (1,000 and 2,000 alerts/s)
  and measures latency from each scheduled send; its own ceiling is measured first.

Prints alerts/s, p50/p99 and the ratio to bare aiohttp; then checks that tocsin stored
every alert it acknowledged. A full run takes about two minutes.

    make bench      # installs wrk when missing, then runs this
    .venv/bin/python bench/http_ingest.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = ROOT / "bench" / "wrk" / "alerts.lua"
OPEN_LOOP = ROOT / "bench" / "wrk" / "open_loop.py"
TOKEN = "bench-token-000001"
SANDBOX_TOKEN = "bench-token-000002"

STATIC_SERVER = r"""
import asyncio

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"

class Static(asyncio.Protocol):
    # Answers every request with the same 200, reading only as much HTTP as framing needs.
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end].lower()
            at = head.find(b"content-length:")
            stop = head.find(b"\r\n", at) if at >= 0 else -1
            length = int(head[at + 15:stop if stop > 0 else len(head)]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length:]
            self.transport.write(RESPONSE)
        self.buffer = buffer

async def main():
    server = await asyncio.get_running_loop().create_server(Static, "127.0.0.1", 0, backlog=1024)
    print("ready port", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

BARE_SERVER = r"""
import asyncio, json
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
    await asyncio.Event().wait()

asyncio.run(main())
"""


def tocsin_config(tmp: str) -> str:
    sys.path.insert(0, str(ROOT))
    from grouping.kinds import KINDS

    # The same defaults plus a comment: equal output, but no longer the default text, so
    # they render in the sandbox (grouping/native.py finds natives by exact text).
    sandboxed = "\n".join(
        f"{name} = {json.dumps(text + '{# sandbox #}')}"
        for name, text in KINDS["formatted_webhook"].templates.items() if text
    )
    return (
        f'[daemon]\ndatabase = "{tmp}/bench.db"\nlog_level = "INFO"\n'
        '[http]\nlisten = "127.0.0.1:0"\n[api]\ntokens = ["x"]\n'
        f'[[integrations]]\nid = "bench"\nkind = "formatted_webhook"\ntoken = "{TOKEN}"\n'
        f'[[integrations]]\nid = "bench-sandbox"\nkind = "formatted_webhook"\ntoken = "{SANDBOX_TOKEN}"\n'
        f"[integrations.templates]\n{sandboxed}\n"
    )


def start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, int(m.group(1))
    proc.kill()
    raise SystemExit(f"bench: {cmd[-1]} did not start: {''.join(lines[-3:]).strip()}")


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def wrk(url: str, seconds: float, connections: int, threads: int, prefix: str) -> dict:
    """One closed-loop wrk run; alerts/s, p50/p99 in ms, errors (non-2xx and socket errors)."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
         "-s", str(WRK_SCRIPT), url, "--", prefix],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    m = re.search(r"WRK_RESULT (\{.*\})", out.stdout)
    if m is None:
        raise SystemExit(f"bench: wrk gave no result: {(out.stderr or out.stdout).strip()[-300:]}")
    r = json.loads(m.group(1))
    return {
        "rate": r["requests"] / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000,
        "errors": r["status_errors"] + r["socket_errors"], "ok": r["requests"] - r["status_errors"],
    }


def open_loop(url: str, rate: float, seconds: float, prefix: str, connections: int = 256) -> dict:
    out = subprocess.run(
        [sys.executable, str(OPEN_LOOP), "--url", url, "--rate", str(rate), "--seconds", str(seconds),
         "--connections", str(connections), "--prefix", prefix],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench: open-loop client failed: {out.stderr.strip()[-300:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["p50"], r["p99"], r["ok"] = r["p50_ms"], r["p99_ms"], r["completed"] - r["errors"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8, help="length of each closed-loop run")
    ap.add_argument("--rounds", type=int, default=2, help="closed-loop rounds, servers alternating")
    ap.add_argument("--open-seconds", type=float, default=10, help="length of each open-loop run")
    ap.add_argument("--rates", default="1000,2000", help="open-loop rates, alerts/s")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--quick", action="store_true", help="short runs (about 40 s in all), for a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.open_seconds = 3, 1, 4
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk not found; `make bench` installs it (Debian package wrk)")
    rates = [float(r) for r in args.rates.split(",") if r]
    started = time.monotonic()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(tocsin_config(tmp))
        procs = {}
        try:
            procs["static"] = start([sys.executable, "-c", STATIC_SERVER], r"ready port (\d+)")
            procs["bare"] = start([sys.executable, "-c", BARE_SERVER], r"ready port (\d+)")
            procs["tocsin"] = start([sys.executable, "-m", "daemon", "serve", "-c", str(cfg)],
                                    r"tocsin ready.*? http=[^ ]*:(\d+)")
            path = f"/integrations/v1/formatted_webhook/{TOKEN}/"
            urls = {
                "static 200": f"http://127.0.0.1:{procs['static'][1]}{path}",
                "bare aiohttp": f"http://127.0.0.1:{procs['bare'][1]}{path}",
                "tocsin": f"http://127.0.0.1:{procs['tocsin'][1]}{path}",
                "tocsin, sandboxed defaults":
                    f"http://127.0.0.1:{procs['tocsin'][1]}/integrations/v1/formatted_webhook/{SANDBOX_TOKEN}/",
            }
            acknowledged = 0
            for n, name in enumerate(("bare aiohttp", "tocsin", "tocsin, sandboxed defaults")):  # warm-up
                result = wrk(urls[name], 1, args.connections, args.threads, f"warm{n}")
                if name.startswith("tocsin"):
                    acknowledged += result["ok"]

            ceiling = wrk(urls["static 200"], args.seconds, args.connections, args.threads, "ceiling")
            closed: dict[str, list[dict]] = {n: [] for n in ("bare aiohttp", "tocsin", "tocsin, sandboxed defaults")}
            for r in range(args.rounds):
                for n, name in enumerate(closed):
                    result = wrk(urls[name], args.seconds, args.connections, args.threads, f"c{r}-{n}")
                    closed[name].append(result)
                    if name.startswith("tocsin"):
                        acknowledged += result["ok"]

            ol_ceiling = {name: open_loop(urls[name], 0, args.open_seconds / 2, f"olc{n}", args.connections)
                          for n, name in enumerate(("static 200", "bare aiohttp"))}
            opened: list[tuple[float, str, dict]] = []
            for rate in rates:
                for name in ("bare aiohttp", "tocsin"):
                    result = open_loop(urls[name], rate, args.open_seconds, f"o{rate:g}-{name[:5]}")
                    opened.append((rate, name, result))
                    if name == "tocsin":
                        acknowledged += result["ok"]
            rss, peak = rss_mib(procs["tocsin"][0].pid)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
            for proc, _ in procs.values():
                proc.wait(timeout=30)
        with sqlite3.connect(Path(tmp) / "bench.db") as conn:
            stored = conn.execute("SELECT count(*) FROM alerts").fetchone()[0]

    print(f"unique ~1 KB alerts over HTTP keep-alive; {os.cpu_count()} cores shared by client and server; "
          f"{time.monotonic() - started:.0f} s in all")
    print(f"\nclosed loop: wrk, {args.threads} threads, {args.connections} connections, "
          f"{args.rounds} x {args.seconds:g} s per server, servers alternating")
    print(f"  client ceiling (wrk against a static 200 responder): {ceiling['rate']:.0f} req/s, "
          f"p50 {ceiling['p50']:.1f} ms")
    print(f"  {'server':<28}{'alerts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x bare':>8}{'errors':>8}")
    bare_rates = [r["rate"] for r in closed["bare aiohttp"]]
    for name, runs in closed.items():
        ratio = statistics.median(r["rate"] / b for r, b in zip(runs, bare_rates))
        print(f"  {name:<28}{statistics.median(r['rate'] for r in runs):>10.0f}"
              f"{statistics.median(r['p50'] for r in runs):>9.1f}{statistics.median(r['p99'] for r in runs):>9.1f}"
              f"{ratio:>8.2f}{sum(r['errors'] for r in runs):>8}")
    for name, runs in closed.items():
        print(f"    {name}, alerts/s by round: " + ", ".join(f"{r['rate']:.0f}" for r in runs))

    top = max(rates) if rates else 0
    print("\nopen loop: bench/wrk/open_loop.py, fixed schedule, latency from each scheduled send")
    for name, r in ol_ceiling.items():
        verdict = f", {r['rate'] / top:.1f}x the highest scheduled rate" if top else ""
        print(f"  client ceiling against {name}: {r['rate']:.0f} req/s{verdict}")
    print(f"  {'rate':>6}  {'server':<14}{'sent/s':>8}{'done/s':>8}{'x bare':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'p99 x bare':>11}{'errors':>8}")
    bare = {rate: r for rate, name, r in opened if name == "bare aiohttp"}
    for rate, name, r in opened:
        print(f"  {rate:>6.0f}  {name:<14}{r['send_rate']:>8.0f}{r['rate']:>8.0f}{r['rate'] / bare[rate]['rate']:>8.2f}"
              f"{r['p50']:>9.1f}{r['p99']:>9.1f}{r['max_ms']:>9.1f}{r['p99'] / bare[rate]['p99']:>11.1f}{r['errors']:>8}")

    print(f"\ntocsin RSS {rss:.0f} MiB (peak {peak:.0f}); stored {stored} alerts, acknowledged {acknowledged}: "
          + ("ok" if stored >= acknowledged else "LOST ALERTS"))


if __name__ == "__main__":
    main()
