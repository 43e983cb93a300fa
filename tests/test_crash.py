"""A 200 means on disk: SIGKILL the daemon under concurrent load, restart, find every accepted alert."""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3

import aiohttp

from conftest import API_TOKEN, TOKEN


async def _load(base: str, accepted: list[str], stop: asyncio.Event, worker: int) -> None:
    url = f"{base}/integrations/v1/formatted_webhook/{TOKEN['fw']}/"
    n = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            n += 1
            body = {"alert_uid": f"w{worker}-{n % 7}", "title": "load", "state": "alerting", "n": n}
            try:
                async with session.post(url, data=json.dumps(body),
                                        headers={"Content-Type": "application/json"}) as r:
                    if r.status == 200:
                        accepted.append((await r.json())["alert_id"])
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
                await asyncio.sleep(0.01)  # the daemon is gone; keep trying until told to stop


async def test_sigkill_under_load_loses_no_accepted_alert(spawn, tmp_path):
    proc = spawn(smtp=False)
    accepted: list[str] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_load(proc.base, accepted, stop, w)) for w in range(32)]
    for _ in range(100):  # until a few hundred alerts are in, bounded in time
        await asyncio.sleep(0.05)
        if len(accepted) >= 300:
            break
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=10)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)
    assert len(accepted) >= 50, "the load never got going"

    again = spawn(proc.config_path)  # restart on the same database: recovery runs
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{again.base}/readyz") as r:
                assert r.status == 200
            async with session.get(f"{again.base}/api/v1/alerts/?perpage=1",
                                   headers={"Authorization": API_TOKEN}) as r:
                count = (await r.json())["count"]
    finally:
        assert again.stop() == 0
    db = sqlite3.connect(tmp_path / "tocsin.db")
    stored = {row[0] for row in db.execute("SELECT id FROM alerts")}
    groups_ok = db.execute(
        "SELECT count(*) FROM alert_groups g WHERE alerts_count !="
        " (SELECT count(*) FROM alerts a WHERE a.alert_group_id = g.id)"
    ).fetchone()[0]
    db.close()
    missing = set(accepted) - stored
    assert not missing, f"{len(missing)} of {len(accepted)} accepted alerts lost"
    assert count == len(stored) >= len(accepted)
    assert groups_ok == 0, "group counters disagree with the alerts stored"
