"""A hostile template cannot stall or bloat the daemon for another integration (issue 10.3).

A real daemon (`python -m daemon serve`) has an innocent webhook integration and one whose
grouping_id and title are hostile (multi-megabyte work in one filter call, memory bombs,
endless loops). Hostile alerts and hostile previews go in concurrently with innocent
alerts. Figures are printed (speed is for bench/hostile_templates.py); what is asserted is
behaviour: every innocent alert answered 200, every hostile alert stored with a
`Template Error: …` title, and the daemon's peak RSS grew by less than 256 MB.
"""
import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp

from conftest import API_TOKEN, TOKEN, integration

HOSTILE = {
    "batch-list": "{{ (payload.big * 1) | batch(1) | list | length }}",
    "list-sort-join": "{{ payload.s | list | sort | join }}",
    "sort-unique": "{{ payload.big | sort | unique | list | length }}",
    "append-loop": "{% set l = [] %}{% for i in payload.big %}{% set _ = l.append(payload.s * 9) %}{% endfor %}"
                   "{{ l | length }}",
    "recursion": "{% macro f(n, s) %}{% if n < 300 %}{{ f(n + 1, s ~ 'y') | length }}{% endif %}{% endmacro %}"
                 "{{ f(0, payload.s) }}",
    "split": "{{ (payload.s * 9).split(' ') | length }}",
    "wordwrap-indent": "{{ payload.s | center(9000000) | indent(2, true) | wordwrap(3) | length }}",
    "endless-loop": "{% for a in payload.big %}{% for b in payload.big %}{{ a }}{% endfor %}{% endfor %}",
}
# Under the default 1 MiB body limit: a 120k-item list and a 540k-character string.
PAYLOAD = {"big": [i % 10 for i in range(120_000)], "s": "ab " * 180_000}
TIMEOUT = aiohttp.ClientTimeout(total=120)


def rss_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def hostile_integrations() -> str:
    blocks = []
    for i, (name, template) in enumerate(HOSTILE.items()):
        table = (f"[integrations.templates]\ngrouping_id = {json.dumps(template)}\n"
                 f"title = {json.dumps(template)}\n")
        blocks.append(integration(f"hostile{i}", "webhook", f"tok-hostile-{i:04d}", table, name=name))
    return "".join(blocks)


async def test_hostile_templates_do_not_stall_or_bloat_another_integration(spawn):
    daemon = spawn(extra_integrations=hostile_integrations())
    base, pid = daemon.base, daemon.proc.pid
    body = json.dumps(PAYLOAD, separators=(",", ":"))
    assert len(body) < 1024 * 1024
    start = rss_kb(pid)
    stop = asyncio.Event()
    innocent: list[tuple[int, float]] = []

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def hostile_alert(i: int) -> int:
            async with session.post(f"{base}/integrations/v1/webhook/tok-hostile-{i:04d}/", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status

        async def hostile_preview(template: str) -> dict:
            request = {"payload": PAYLOAD, "templates": {"title": template, "message": template}}
            async with session.post(f"{base}/api/v1/integrations/wh/preview", json=request,
                                    headers={"Authorization": API_TOKEN}) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        async def innocent_alerts() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                async with session.post(f"{base}/integrations/v1/webhook/{TOKEN['wh']}/",
                                        json={"title": "disk full", "n": n}) as r:
                    await r.read()
                    innocent.append((r.status, time.monotonic() - started))

        innocents = asyncio.create_task(innocent_alerts())
        await asyncio.sleep(0.2)
        # Three hostile requests in flight at a time: a burst of two dozen 0.8 MB bodies
        # stalls the loop by itself (JSON parsing), whatever the templates.
        in_flight = asyncio.Semaphore(3)

        async def limited(request):
            async with in_flight:
                return await request

        hostile = [hostile_alert(i) for i in range(len(HOSTILE)) for _ in range(2)]
        previews = [hostile_preview(t) for t in HOSTILE.values()]
        results = await asyncio.wait_for(asyncio.gather(*map(limited, hostile + previews)), timeout=100)
        stop.set()
        await asyncio.wait_for(innocents, timeout=30)
        end = rss_kb(pid)

        statuses, shown = results[:len(hostile)], results[len(hostile):]
        assert statuses == [200] * len(hostile)
        for preview in shown:
            assert preview["title"].startswith("Template Error: "), preview["title"]

        async with session.get(f"{base}/api/v1/alert_groups/?perpage=200",
                               headers={"Authorization": API_TOKEN}) as r:
            groups = (await r.json())["results"]

    latencies = [seconds * 1000 for _, seconds in innocent]
    print(f"\ninnocent alerts: {len(latencies)}, p50 {statistics.median(latencies):.0f} ms, "
          f"max {max(latencies):.0f} ms; RSS {start['VmRSS'] // 1024} MB -> {end['VmRSS'] // 1024} MB, "
          f"peak {end['VmHWM'] // 1024} MB")
    assert innocent and all(status == 200 for status, _ in innocent)
    titles: dict[str, list[str]] = {}
    for g in groups:
        titles.setdefault(g["integration_id"], []).append(g["title"])
    for i in range(len(HOSTILE)):
        stored = titles.get(f"hostile{i}", [])
        assert len(stored) == 2, (i, stored)  # a failed grouping id: each alert its own group
        assert all(t.startswith("Template Error: ") for t in stored), stored
    assert (end["VmHWM"] - start["VmRSS"]) < 256 * 1024
