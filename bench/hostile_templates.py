"""Hostile templates against an innocent neighbour: does one integration's template stall
or bloat the daemon for everyone else?

Starts `python -m daemon serve` as a child with one innocent webhook integration and one
integration per hostile template (its grouping_id and title). For each hostile template in
turn it keeps several hostile alerts (a ~1 MB payload: a 150k-item list and a 600k-char
string) in flight for a few seconds, while one client posts innocent alerts one after
another and another polls /healthz every 10 ms. Prints, per template: the innocent POSTs'
p50/p99/max latency, the worst /healthz answer (event-loop lag, measured from outside),
how the hostile alerts were answered, and the daemon's RSS before/after and its peak.

    .venv/bin/python bench/hostile_templates.py [--seconds 2.5] [--in-flight 6] [--only NAME]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
INNOCENT_TOKEN = "innocent-token-0001"

HOSTILE = {
    "control (benign)": "{{ payload.n }}",
    "batch-list": "{{ (payload.big * 1) | batch(1) | list | length }}",
    "list-sort-join": "{{ payload.s | list | sort | join }}",
    "sort-unique": "{{ payload.big | sort | unique | list | length }}",
    "map-join": "{{ payload.big | map('string') | join(',') | length }}",
    "select-reverse-sum": "{{ payload.big | select('even') | reverse | list | sum }}",
    "dictsort-groupby": "{{ payload.big | groupby('real') | length }}{{ payload.d | dictsort | length }}",
    "tojson-pretty": "{{ payload | tojson | length }}{{ payload | tojson_pretty | length }}",
    "min-max-sum": "{{ payload.big | min }}{{ payload.big | max }}{{ payload.big | sum }}",
    "wordwrap-wordcount": "{{ payload.s | wordwrap(3) | length }}{{ payload.s | wordcount }}",
    "center-indent-replace": "{{ payload.s | center(9000000) | indent(2, true) | replace(' ', '  ') | length }}",
    "urlize-title-format": "{{ payload.s | urlize | title | length }}{{ '%s' | format(payload.big) | length }}",
    "split-methods": "{{ payload.s.split() | length }}{{ payload.s.splitlines() | length }}{{ (payload.s * 9).split(' ') | length }}",
    "append-loop": "{% set l = [] %}{% for i in payload.big %}{% set _ = l.append(payload.s * 9) %}{% endfor %}{{ l | length }}",
    "recursion": "{% macro f(n, s) %}{% if n < 300 %}{{ f(n + 1, s ~ 'y') | length }}{% endif %}{% endmacro %}{{ f(0, payload.s) }}",
    "namespace-grow": "{% set ns = namespace(t='') %}{% for i in payload.big %}{% set ns.t = ns.t ~ payload.s[:100000] %}{% endfor %}{{ ns.t | length }}",
    "slice": "{{ payload.big | slice(3) | list | length }}{{ payload.s | slice(100000) | list | length }}",
}


def hostile_payload(n: int) -> dict:
    # ~1 MB of JSON, tocsin's default body limit: a 150k-item list and a 600k-char string.
    return {
        "big": [i % 10 for i in range(150_000)],
        "s": "ab " * 200_000,
        "d": {str(i): i for i in range(10_000)},
        "n": n,
    }


def config(tmp: Path) -> str:
    lines = [
        "[daemon]", f'database = "{tmp / "tocsin.db"}"', 'public_url = "http://127.0.0.1:8080"',
        "[http]", 'listen = "127.0.0.1:0"', "max_body_bytes = 2097152",
        "[[integrations]]", 'id = "innocent"', 'kind = "webhook"', f'token = "{INNOCENT_TOKEN}"',
    ]
    for i, (name, template) in enumerate(HOSTILE.items()):
        lines += ["[[integrations]]", f'id = "h{i}"', f'name = "{name}"', 'kind = "webhook"',
                  f'token = "hostile-token-{i:04d}"', "[integrations.templates]",
                  f"grouping_id = {json.dumps(template)}", f"title = {json.dumps(template)}"]
    return "\n".join(lines) + "\n"


def start_daemon(config_path: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "-c", str(config_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"tocsin ready http=[^ ]+:(\d+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(m.group(1))
    proc.kill()
    raise SystemExit("daemon did not start")


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def phase(session, base: str, token: str, body: bytes, seconds: float, in_flight: int) -> dict:
    stop = time.monotonic() + seconds
    innocent, healthz, answers = [], [], {}

    async def hostile_sender():
        while time.monotonic() < stop:
            async with session.post(f"{base}/integrations/v1/webhook/{token}/", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                answers[r.status] = answers.get(r.status, 0) + 1

    async def innocent_sender():
        n = 0
        while time.monotonic() < stop:
            n += 1
            t0 = time.monotonic()
            async with session.post(f"{base}/integrations/v1/webhook/{INNOCENT_TOKEN}/",
                                    json={"title": "disk full", "n": n}) as r:
                await r.read()
                assert r.status == 200, r.status
            innocent.append(time.monotonic() - t0)

    async def healthz_poller():
        while time.monotonic() < stop:
            t0 = time.monotonic()
            async with session.get(f"{base}/healthz") as r:
                await r.read()
            healthz.append(time.monotonic() - t0)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(*(hostile_sender() for _ in range(in_flight)), innocent_sender(),
                                          healthz_poller()), timeout=seconds + 120)
    return {"innocent": innocent, "healthz": healthz, "answers": answers}


async def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(config(Path(tmp)))
        proc, port = start_daemon(path)
        base = f"http://127.0.0.1:{port}"
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
                first = status_kb(proc.pid)
                print(f"daemon RSS at start {first['VmRSS'] / 1024:.0f} MB; payload "
                      f"{len(json.dumps(hostile_payload(0))) / 1e6:.1f} MB; {args.in_flight} hostile alerts "
                      f"in flight for {args.seconds} s per template\n")
                print(f"{'template':24} {'innocent p50/p99/max ms':>26} {'healthz max ms':>15} "
                      f"{'hostile answers':>18} {'RSS before->after (peak) MB':>30}")
                for i, name in enumerate(HOSTILE):
                    if args.only and name not in args.only:
                        continue
                    before = status_kb(proc.pid)
                    body = json.dumps(hostile_payload(i)).encode()
                    r = await phase(session, base, f"hostile-token-{i:04d}", body, args.seconds, args.in_flight)
                    after = status_kb(proc.pid)
                    ms = [x * 1000 for x in r["innocent"]]
                    print(f"{name:24} {statistics.median(ms):8.1f} /{percentile(ms, 99):7.1f} /{max(ms):7.1f} "
                          f"{max(r['healthz']) * 1000:15.1f} {json.dumps(r['answers']):>18} "
                          f"{before['VmRSS'] / 1024:11.0f} ->{after['VmRSS'] / 1024:5.0f} ({after['VmHWM'] / 1024:.0f})")
                async with session.get(f"{base}/api/v1/alert_groups/?perpage=1") as r:
                    pass
                last = status_kb(proc.pid)
                print(f"\nRSS start {first['VmRSS'] / 1024:.0f} MB, end {last['VmRSS'] / 1024:.0f} MB, "
                      f"peak {last['VmHWM'] / 1024:.0f} MB")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="hostile traffic per template")
    parser.add_argument("--in-flight", type=int, default=6, help="hostile alerts in flight at once")
    parser.add_argument("--only", nargs="*", help="template names to run")
    asyncio.run(main(parser.parse_args()))
