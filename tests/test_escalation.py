"""Routing, escalation chains, notifications, heartbeats and maintenance, with a real
HTTP receiver on loopback and a real daemon over a real database."""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import TOKEN, integration, write_config, webhook_receiver
from escalation.chains import Chain, Step, next_window_start, plan


@pytest.fixture
async def receiver():
    async with webhook_receiver() as rec:
        yield rec


def chain_config(url: str, *, steps: str, timeout: str = "", events: str = '["acknowledged", "resolved"]') -> str:
    return integration("pg", "alertmanager", "tok-paged-000001", name="Paged", rest=timeout) + f"""
[[integrations.routes]]
id = "critical"
condition = '{{{{ payload.commonLabels.severity == "critical" }}}}'
escalation = "page-ops"
[[integrations.routes]]
id = "db"
regex = '"team": "dba"'
escalation = "dba"
[[integrations.routes]]
id = "rest"

[[notifiers]]
name = "ops-hook"
kind = "webhook"
url = "{url}"
timeout = 2
events = {events}

[[escalations]]
name = "page-ops"
steps = {steps}

[[escalations]]
name = "dba"
steps = [ {{ notify = ["ops-hook"] }} ]
"""


def am(key: str, severity: str = "critical", status: str = "firing", **labels) -> dict:
    return {"status": status, "groupKey": key, "commonLabels": {"severity": severity, **labels},
            "groupLabels": {"alertname": key}, "alerts": [{"status": status, "labels": {"alertname": key}}]}


async def until(predicate, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_critical_routes_to_page_ops_and_ack_stops_the_wait(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(
        receiver.url, steps='[ { notify = ["ops-hook"] }, { wait = "2s" }, { notify = ["ops-hook"] } ]'))
    _, res = await h.post("pg", am("disk"))
    gid = res["alert_group_id"]
    assert (await h.api("GET", f"alert_groups/{gid}/"))[1]["route_id"] == "critical"
    assert await until(lambda: receiver.events(gid) == ["triggered"])
    first = receiver.requests[0]
    assert first["body"]["step"] == 0 and first["body"]["alert_group"]["title"].startswith("disk")
    assert first["headers"]["Idempotency-Key"] == first["body"]["notification_id"]
    # Acknowledge before the wait ends: the second notify never happens; the hook hears "acknowledged".
    assert (await h.api("POST", f"alert_groups/{gid}/acknowledge/"))[0] == 200
    assert await until(lambda: receiver.events(gid) == ["triggered", "acknowledged"])
    await asyncio.sleep(2.5)
    assert receiver.events(gid) == ["triggered", "acknowledged"]
    status, tl = await h.api("GET", f"alert_groups/{gid}/timeline/")
    assert status == 200
    events = [e["event"] for e in tl["results"]]
    assert events[0] == "created" and "escalation_step" in events and "acknowledged" in events
    outcomes = [e["detail"]["outcome"] for e in tl["results"] if e["event"] == "notification"]
    assert outcomes == ["sent", "sent"]
    assert tl["escalation"]["state"] == "stopped"


async def test_routes_regex_and_default(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(receiver.url, steps='[ { notify = ["ops-hook"] } ]'))
    _, db = await h.post("pg", am("slow-queries", severity="warning", team="dba"))
    _, other = await h.post("pg", am("noise", severity="info"))
    assert (await h.api("GET", f"alert_groups/{db['alert_group_id']}/"))[1]["route_id"] == "db"
    assert (await h.api("GET", f"alert_groups/{other['alert_group_id']}/"))[1]["route_id"] == "rest"
    assert await until(lambda: receiver.events(db["alert_group_id"]) == ["triggered"])
    await asyncio.sleep(0.5)
    assert receiver.events(other["alert_group_id"]) == []  # the default route has no escalation
    status, preview = await h.api("POST", "integrations/pg/preview/", {"payload": am("x")})
    assert preview["route"] == "critical"


async def test_receiver_failing_twice_gets_it_on_the_third_try(start_tocsin, receiver):
    receiver.fail_first = 2
    h = await start_tocsin(extra_integrations=chain_config(receiver.url, steps='[ { notify = ["ops-hook"] } ]'))
    _, res = await h.post("pg", am("flaky"))
    gid = res["alert_group_id"]
    assert await until(lambda: receiver.events(gid) == ["triggered"], seconds=15)
    assert receiver.seen == 3
    assert receiver.requests[0]["headers"]["X-Tocsin-Attempt"] == "3"
    _, tl = await h.api("GET", f"alert_groups/{gid}/timeline/")
    attempts = [(e["detail"]["attempt"], e["detail"]["outcome"]) for e in tl["results"] if e["event"] == "notification"]
    assert attempts == [(1, "retrying"), (2, "retrying"), (3, "sent")]


async def test_restart_during_a_wait_delivers_the_next_step_once(spawn, tmp_path, receiver):
    cfg = write_config(tmp_path, extra_integrations=chain_config(
        receiver.url, steps='[ { notify = ["ops-hook"] }, { wait = "2s" }, { notify = ["ops-hook"] } ]'))
    proc = spawn(cfg)
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proc.base}/integrations/v1/alertmanager/{TOKEN['pg']}/", json=am("restart")) as r:
            gid = (await r.json())["alert_group_id"]
    assert await until(lambda: receiver.events(gid) == ["triggered"])
    assert proc.stop() == 0
    await asyncio.sleep(2.5)  # the wait ends while the process is down
    assert receiver.events(gid) == ["triggered"]
    again = spawn(cfg)
    assert await until(lambda: receiver.events(gid) == ["triggered", "triggered"])
    await asyncio.sleep(1.0)
    assert receiver.events(gid) == ["triggered", "triggered"]  # once, not twice
    assert [r["body"]["step"] for r in receiver.requests] == [0, 2]
    assert again.stop() == 0


async def test_interrupted_attempt_is_recorded_and_retried(tmp_path):
    """An attempt that began before a crash shows as interrupted and is retried under the same key."""
    from grouping import rules
    from store import NewAlert, SqliteStore

    store = SqliteStore(tmp_path / "x.db", rules=rules)
    await store.open()
    chain = Chain("c", (Step("notify", notifiers=("n",)),)).to_json()
    [stored] = await store.add_alerts([NewAlert("i", "k", "{}", escalation=chain)])
    from escalation.engine import planner

    assert await store.escalate(planner) == 1
    [due] = await store.due_notifications(time.time() + 1)
    assert await store.attempt_start(due["id"]) == 1
    await store.close()  # "crash": the attempt has no outcome

    store = SqliteStore(tmp_path / "x.db", rules=rules)
    await store.open()
    assert await store.recover_notifications() == ["n"]
    [due_again] = await store.due_notifications(time.time() + 1)
    assert due_again["id"] == due["id"] and due_again["attempts"] == 1
    assert await store.attempt_start(due["id"]) == 2
    tl = await store.timeline(stored.alert_group_id)
    assert [e["detail"]["outcome"] for e in tl if e["event"] == "notification"] == ["interrupted"]
    await store.close()


async def test_resolve_notifies_and_unresolve_restarts(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(receiver.url, steps='[ { notify = ["ops-hook"] } ]'))
    _, res = await h.post("pg", am("cycle"))
    gid = res["alert_group_id"]
    assert await until(lambda: receiver.events(gid) == ["triggered"])
    await h.post("pg", am("cycle", status="resolved"))  # resolved by the source
    assert await until(lambda: receiver.events(gid) == ["triggered", "resolved"])
    assert (await h.api("POST", f"alert_groups/{gid}/unresolve/"))[0] == 200
    assert await until(lambda: receiver.events(gid) == ["triggered", "resolved", "triggered"])


async def test_silence_stops_and_its_end_restarts(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(
        receiver.url, steps='[ { wait = "1s" }, { notify = ["ops-hook"] } ]'))
    _, res = await h.post("pg", am("quiet"))
    gid = res["alert_group_id"]
    assert (await h.api("POST", f"alert_groups/{gid}/silence/", {"delay": 2}))[0] == 200
    await asyncio.sleep(1.5)
    assert receiver.events(gid) == []
    assert await until(lambda: receiver.events(gid) == ["triggered"], seconds=6)


async def test_escalation_resolve_step_and_repeat(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(
        receiver.url, steps='[ { notify = ["ops-hook"] }, { repeat = 2 }, { resolve = true } ]'))
    _, res = await h.post("pg", am("loop"))
    gid = res["alert_group_id"]
    assert await until(lambda: (receiver.events(gid).count("triggered") == 3
                                and "resolved" in receiver.events(gid)))
    g = (await h.api("GET", f"alert_groups/{gid}/"))[1]
    assert g["state"] == "resolved" and g["resolved_by"] == "escalation"


async def test_alerts_in_window_pauses_until_the_next_alert(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(
        receiver.url, steps='[ { if_alerts_in_window = 1, minutes = 5 }, { notify = ["ops-hook"] } ]'))
    _, res = await h.post("pg", am("storm"))
    gid = res["alert_group_id"]
    await asyncio.sleep(0.8)
    assert receiver.events(gid) == []  # one alert is not "more than 1"
    await h.post("pg", am("storm"))
    assert await until(lambda: receiver.events(gid) == ["triggered"])


async def test_heartbeat_expiry_and_restore(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(
        receiver.url, steps='[ { notify = ["ops-hook"] } ]', timeout='heartbeat_timeout = "1s"'))
    hb = f"{h.base}/integrations/v1/alertmanager/{TOKEN['pg']}/heartbeat/"
    await asyncio.sleep(1.5)
    assert await h.groups(integration_id="pg") == []  # not armed before the first ping
    async with h.session.get(hb) as r:
        assert r.status == 200
    assert await until(lambda: False, seconds=0) is False
    groups = []

    async def expired():
        groups[:] = await h.groups(integration_id="pg")
        return len(groups) == 1

    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not await expired():
        await asyncio.sleep(0.1)
    assert len(groups) == 1 and groups[0]["state"] == "new"
    assert "OnCallHeartBeatMissing" in groups[0]["title"]
    async with h.session.post(hb) as r:
        assert r.status == 200
    [g] = await h.groups(integration_id="pg")
    assert g["state"] == "resolved" and g["alerts_count"] == 2


async def test_maintenance_modes(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=chain_config(receiver.url, steps='[ { notify = ["ops-hook"] } ]'))
    # debug: groups form, nothing escalates
    status, body = await h.api("POST", "integrations/pg/maintenance_start/", {"mode": "debug", "duration": 3600})
    assert status == 200 and body["maintenance_mode"] == "debug"
    status, body = await h.api("POST", "integrations/pg/maintenance_start/", {"mode": "debug", "duration": 60})
    assert status == 400 and body["error"] == "Already on maintenance"
    _, dbg = await h.post("pg", am("in-debug"))
    await asyncio.sleep(0.8)
    assert receiver.events(dbg["alert_group_id"]) == []
    assert (await h.api("POST", "integrations/pg/maintenance_stop/"))[0] == 200
    # maintenance: new groups attach to one maintenance group, resolved when it ends
    status, body = await h.api("POST", "integrations/pg/maintenance_start/", {"mode": "maintenance", "duration": 2})
    assert status == 200
    _, m1 = await h.post("pg", am("m1"))
    _, m2 = await h.post("pg", am("m2"))
    assert m1["alert_group_id"] != m2["alert_group_id"]
    titles = [g["title"] for g in await h.groups(integration_id="pg")]
    assert any(t.startswith("Maintenance of Paged for 2s") for t in titles)
    await asyncio.sleep(0.5)
    assert receiver.events() == []
    assert await until(lambda: False, seconds=0) is False
    deadline = time.monotonic() + 6
    states = {}
    while time.monotonic() < deadline:
        states = {g["id"]: g for g in await h.groups(integration_id="pg")}
        if states[m1["alert_group_id"]]["state"] == "resolved":
            break
        await asyncio.sleep(0.1)
    assert states[m1["alert_group_id"]]["state"] == "resolved"
    assert states[m2["alert_group_id"]]["resolved_by"] == "stop maintenance"
    assert states[dbg["alert_group_id"]]["state"] == "new"  # made in debug mode: not attached
    status, body = await h.api("POST", "integrations/pg/maintenance_stop/")
    assert status == 400


def test_plan_is_pure_and_bounded():
    chain = Chain("c", (Step("notify", notifiers=("a",)), Step("wait", seconds=60), Step("notify", notifiers=("b",)),
                        Step("repeat", times=2)))
    p = plan(chain, 0, 0, 1000.0, lambda s: 0)
    assert p.notify == [("a", 0)] and p.step == 2 and p.due_at == 1060.0 and p.state == "running"
    p = plan(chain, 2, 0, 1060.0, lambda s: 0)
    assert p.notify == [("b", 2), ("a", 0)] and p.repeats == 1 and p.due_at == 1120.0
    p = plan(chain, 2, 2, 2000.0, lambda s: 0)
    assert p.notify == [("b", 2)] and p.state == "finished"
    only_notify = Chain("n", (Step("notify", notifiers=("a",)), Step("repeat", times=5)))
    p = plan(only_notify, 0, 0, 0.0, lambda s: 0)
    assert len(p.notify) == 6 and p.state == "finished"


def test_if_time_window():
    step = Step("if_time", window="09:00-18:00", tz="UTC")
    day = 1767225600.0  # 2026-01-01T00:00:00Z
    assert next_window_start(step, day + 10 * 3600) is None
    assert next_window_start(step, day + 20 * 3600) == day + 86400 + 9 * 3600
    assert next_window_start(step, day + 3600) == day + 9 * 3600
    night = Step("if_time", window="22:00-06:00", tz="UTC")
    assert next_window_start(night, day + 23 * 3600) is None
    assert next_window_start(night, day + 12 * 3600) == day + 22 * 3600


def test_config_errors_for_routes_and_chains(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    extra = """
[[integrations]]
id = "bad"
kind = "webhook"
token = "tok-bad-0000001"
[[integrations.routes]]
escalation = "nope"
[[integrations.routes]]
regex = "(unclosed"

[[notifiers]]
name = "n1"
kind = "webhook"

[[escalations]]
name = "x"
steps = [ { notify = ["ghost"] }, { repeat = 9 }, { wait = "soon" }, { if_time = "25:00-26:00" } ]
"""
    cfg = write_config(tmp_path, extra_integrations=extra)
    r = subprocess.run([sys.executable, "-m", "daemon", "check", "-c", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    for fragment in ("unknown escalation 'nope'", "invalid regex", "must come last", "unknown notifier(s): ghost",
                     "repeat takes", "duration 'soon'", "not a time window", "[[notifiers]] #1"):
        assert fragment in r.stderr, (fragment, r.stderr)
