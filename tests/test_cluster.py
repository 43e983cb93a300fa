"""Many instances, one truth: two real `tocsin serve` processes on one PostgreSQL database.
Alerts for the same keys through both join one open group per key and every one is counted;
each escalation step and notification runs once across them, also when one is killed;
maintenance started through one applies on the other.

Needs a PostgreSQL server (TOCSIN_PG_URL, default postgresql://postgres@127.0.0.1:5432/postgres).
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from conftest import API_TOKEN, TOKEN, config_text, integration


def cluster_config(tmp_path, pg_url: str, **kw):
    """One config for every instance: the same integrations, the database on PostgreSQL."""
    text = config_text(tmp_path, **kw).replace(f'database = "{tmp_path / "tocsin.db"}"', f'database = "{pg_url}"')
    assert pg_url in text
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


class Receiver:
    """A webhook receiver on loopback: records every request it answers."""

    def __init__(self):
        self.requests: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append({"body": await request.json(), "key": request.headers.get("Idempotency-Key")})
        return web.json_response({"ok": True})


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield rec
    await runner.cleanup()


async def _until(check, timeout: float, what: str):
    """Poll `check()` (plain or async) until it returns something true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


async def _post(session, base: str, body: dict) -> tuple[int, dict]:
    url = f"{base}/integrations/v1/formatted_webhook/{TOKEN['fw']}/"
    async with session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=15)) as r:
        return r.status, (await r.json() if r.status == 200 else {})


async def _load(bases: list[str], accepted: list[str], stop: asyncio.Event, worker: int, keys: int) -> None:
    n = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            n += 1
            base = bases[(worker + n) % len(bases)]  # interleaved: each key through every instance
            try:
                status, body = await _post(session, base, {"alert_uid": f"key-{(worker + n) % keys}",
                                                           "title": "load", "state": "alerting", "n": n})
                if status == 200:
                    accepted.append(body["alert_id"])
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
                await asyncio.sleep(0.01)  # an instance is gone: the next request goes to the other


async def _db(pg_url: str, sql: str, *args):
    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _consistent(pg_url: str, accepted: list[str]) -> None:
    """Every accepted alert stored, one open group per key, every group's count right."""
    stored = {r[0] for r in await _db(pg_url, "SELECT id FROM alerts")}
    missing = set(accepted) - stored
    assert not missing, f"{len(missing)} of {len(accepted)} accepted alerts lost"
    dup = await _db(pg_url, "SELECT grouping_key, count(*) FROM alert_groups WHERE open = 1"
                            " GROUP BY integration_id, grouping_key HAVING count(*) > 1")
    assert not dup, f"keys with more than one open group: {dup}"
    wrong = await _db(pg_url, "SELECT id FROM alert_groups g WHERE alerts_count !="
                              " (SELECT count(*) FROM alerts a WHERE a.alert_group_id = g.id)")
    assert not wrong, f"group counters disagree with the alerts stored: {wrong}"


async def test_interleaved_alerts_through_two_instances_make_one_group_per_key(spawn, tmp_path, pg_url):
    cfg = cluster_config(tmp_path, pg_url)
    a, b = spawn(cfg), spawn(cfg)
    accepted: list[str] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_load([a.base, b.base], accepted, stop, w, keys=5)) for w in range(16)]
    await _until(lambda: len(accepted) >= 400, 60, "400 accepted alerts")
    stop.set()
    await asyncio.gather(*workers)
    await _consistent(pg_url, accepted)
    groups = await _db(pg_url, "SELECT grouping_key, alerts_count FROM alert_groups")
    assert len(groups) == 5 and sum(g[1] for g in groups) == len(accepted)
    # Either instance's API shows every group.
    async with aiohttp.ClientSession(headers={"Authorization": API_TOKEN}) as session:
        for p in (a, b):
            async with session.get(f"{p.base}/api/v1/alert_groups/") as r:
                assert (await r.json())["count"] == 5
    assert a.stop() == 0 and b.stop() == 0


async def test_sigkill_of_one_instance_under_load_loses_nothing(spawn, tmp_path, pg_url):
    cfg = cluster_config(tmp_path, pg_url)
    a, b = spawn(cfg), spawn(cfg)
    accepted: list[str] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_load([a.base, b.base], accepted, stop, w, keys=7)) for w in range(16)]
    await _until(lambda: len(accepted) >= 200, 60, "200 accepted alerts")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    before = len(accepted)
    await _until(lambda: len(accepted) >= before + 100, 60, "100 more through the survivor")
    stop.set()
    await asyncio.gather(*workers)
    await _consistent(pg_url, accepted)
    assert b.stop() == 0


def _paging(url: str) -> str:
    return integration("pg", "alertmanager", "tok-paged-000001", name="Paged") + f"""
[[integrations.routes]]
id = "all"
escalation = "page"

[[notifiers]]
name = "hook"
kind = "webhook"
url = "{url}"
timeout = 2

[[escalations]]
name = "page"
steps = [ {{ notify = ["hook"] }}, {{ wait = "3s" }}, {{ notify = ["hook"] }} ]
"""


async def _page(base: str, name: str) -> None:
    body = {"status": "firing", "groupKey": name, "alerts": [{"status": "firing", "labels": {"alertname": name},
                                                                "fingerprint": name}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/integrations/v1/alertmanager/tok-paged-000001/", json=body,
                                timeout=aiohttp.ClientTimeout(total=15)) as r:
            assert r.status == 200, await r.text()


async def test_each_escalation_step_runs_once_across_instances(spawn, tmp_path, pg_url, receiver):
    cfg = cluster_config(tmp_path, pg_url, extra_integrations=_paging(receiver.url))
    a, b = spawn(cfg), spawn(cfg)
    await _page(a.base, "disk-full")
    await _until(lambda: len(receiver.requests) >= 2, 20, "both notify steps")
    await asyncio.sleep(1.5)  # long enough for a duplicate from the other instance to show
    assert [r["body"]["step"] for r in receiver.requests] == [0, 2]
    assert len({r["key"] for r in receiver.requests}) == 2
    assert a.stop() == 0 and b.stop() == 0


async def test_the_survivor_delivers_the_due_step_of_a_killed_instance(spawn, tmp_path, pg_url, receiver):
    cfg = cluster_config(tmp_path, pg_url, extra_integrations=_paging(receiver.url))
    a, b = spawn(cfg), spawn(cfg)
    await _page(a.base, "db-down")
    await _until(lambda: len(receiver.requests) >= 1, 15, "the first notify step")
    a.proc.send_signal(signal.SIGKILL)  # during the 3 s wait, whichever instance ran the first step
    a.proc.wait(timeout=10)
    await _until(lambda: len(receiver.requests) >= 2, 20, "the second step from the survivor")
    await asyncio.sleep(1.5)
    assert [r["body"]["step"] for r in receiver.requests] == [0, 2]
    rows = await _db(pg_url, "SELECT state FROM notifications ORDER BY created_at")
    assert [r[0] for r in rows] == ["sent", "sent"]
    assert b.stop() == 0


async def test_maintenance_started_through_one_instance_applies_on_the_other(spawn, tmp_path, pg_url):
    cfg = cluster_config(tmp_path, pg_url)
    a, b = spawn(cfg), spawn(cfg)
    async with aiohttp.ClientSession(headers={"Authorization": API_TOKEN}) as session:
        async with session.post(f"{a.base}/api/v1/integrations/fw/maintenance_start",
                                json={"mode": "maintenance", "duration": 600}) as r:
            assert r.status == 200, await r.text()

        async def shown_on_b():
            async with session.get(f"{b.base}/api/v1/integrations/fw") as r:
                return (await r.json())["maintenance_mode"] == "maintenance"
        await _until(shown_on_b, 5, "instance b to show the maintenance")
        status, body = await _post(session, b.base, {"alert_uid": "during", "title": "x", "state": "alerting"})
        assert status == 200
    (root,) = await _db(pg_url, "SELECT root_group_id FROM alert_groups WHERE id = $1", body["alert_group_id"])
    (maintenance,) = await _db(pg_url, "SELECT group_id FROM maintenance WHERE integration_id = 'fw'")
    assert root[0] == maintenance[0] is not None
    assert a.stop() == 0 and b.stop() == 0


async def test_a_heartbeat_expires_once_across_instances(spawn, tmp_path, pg_url):
    extra = integration("hb", "alertmanager", "tok-heartbeat-0001", name="Beating", rest='heartbeat_timeout = "1s"')
    cfg = cluster_config(tmp_path, pg_url, extra_integrations=extra)
    a, b = spawn(cfg), spawn(cfg)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{a.base}/integrations/v1/alertmanager/tok-heartbeat-0001/heartbeat/") as r:
            assert r.status == 200

    async def expired():
        return [r[0] for r in await _db(pg_url, "SELECT state FROM heartbeats WHERE integration_id = 'hb'")] == [
            "expired"]
    await _until(expired, 15, "the heartbeat to expire")
    await asyncio.sleep(1.5)  # both instances have looked at it since
    rows = await _db(pg_url, "SELECT alert_group_id FROM alerts WHERE integration_id = 'hb'")
    assert len(rows) == 1, "the expiry was stored more than once"
    assert a.stop() == 0 and b.stop() == 0


async def test_a_rate_limit_holds_across_the_cluster(spawn, tmp_path, pg_url):
    cfg = cluster_config(tmp_path, pg_url, daemon_extra='rate_limit = "10/1m"')
    a, b = spawn(cfg), spawn(cfg)
    statuses = []
    async with aiohttp.ClientSession() as session:
        for n in range(30):  # 15 through each: each instance alone would let 10 through
            status, _ = await _post(session, (a, b)[n % 2].base, {"alert_uid": f"r{n}", "title": "x",
                                                                   "state": "alerting"})
            statuses.append(status)
    assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
    (count,) = await _db(pg_url, "SELECT count(*) FROM alerts")
    assert count[0] == 10
    assert a.stop() == 0 and b.stop() == 0
