"""PagerDuty Events API v2: both URLs, PagerDuty's answers, grouping by dedup_key, follow-ups
that only join an open group, rate limits, and 202 meaning "on disk"."""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from conftest import API_TOKEN, integration

DATA = Path(__file__).parent / "data" / "pagerduty"
PD_TOKEN = "R0UTINGKEY0000000000000000000001"
OTHER_TOKEN = "R0UTINGKEY0000000000000000000002"
TIMEOUT = aiohttp.ClientTimeout(total=20)
ACCEPTED = {"status": "success", "message": "Event processed"}


def event(name: str, **changes) -> dict:
    """One of PagerDuty's documented example events, with our routing key and the changes given."""
    body = json.loads((DATA / f"{name}.json").read_text())
    body["routing_key"] = PD_TOKEN
    return event_changed(body, changes)


def trigger(dedup_key: str | None, summary: str = "Example alert on host1.example.com", **changes) -> dict:
    body = event("trigger", dedup_key=dedup_key)
    body["payload"]["summary"] = summary
    return event_changed(body, changes)


def event_changed(body: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def pd_integrations(rest: str = "") -> str:
    return (integration("pd", "pagerduty", PD_TOKEN, rest, name="PagerDuty events")
            + integration("pd2", "pagerduty", OTHER_TOKEN))


class Client:
    """Posts events to /v2/enqueue or to the integration URL of a daemon."""

    def __init__(self, base: str, session: aiohttp.ClientSession):
        self.base, self.session = base, session

    async def send(self, body, *, url: str = "/v2/enqueue", headers: dict | None = None):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with self.session.post(self.base + url, data=data, timeout=TIMEOUT,
                                     headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, await r.json(), r.headers

    async def enqueue(self, body, **kw):
        status, answer, _ = await self.send(body, **kw)
        return status, answer

    async def at_integration(self, body, token: str = PD_TOKEN, slash: bool = True):
        status, answer, _ = await self.send(body, url=f"/integrations/v1/pagerduty/{token}" + ("/" if slash else ""))
        return status, answer


@pytest.fixture
async def pd(start_tocsin):
    h = await start_tocsin(extra_integrations=pd_integrations())
    return h, Client(h.base, h.session)


def stored(h) -> tuple[list[tuple], list[tuple]]:
    """(groups, alerts) of the pagerduty integrations, read from the database file."""
    with sqlite3.connect(h.daemon.config.daemon.database) as db:
        groups = db.execute("SELECT id, integration_id, state, alerts_count, title FROM alert_groups"
                            " WHERE integration_id LIKE 'pd%' ORDER BY seq").fetchall()
        alerts = db.execute("SELECT alert_group_id, payload FROM alerts WHERE integration_id LIKE 'pd%'"
                            " ORDER BY seq").fetchall()
    return groups, alerts


# --- grouping by dedup_key ------------------------------------------------------------------------

async def test_trigger_joins_by_dedup_key_then_acknowledge_and_resolve_at_both_urls(pd):
    h, client = pd
    status, answer = await client.enqueue(trigger("srv01/mysql"))
    assert (status, answer) == (202, {**ACCEPTED, "dedup_key": "srv01/mysql"})
    status, answer = await client.at_integration(trigger("srv01/mysql", "again"))
    assert (status, answer) == (202, {**ACCEPTED, "dedup_key": "srv01/mysql"})
    (group,) = await h.groups(integration_id="pd")
    assert (group["state"], group["alerts_count"]) == ("new", 2)
    assert group["title"] == "Example alert on host1.example.com"  # the first trigger's summary

    status, answer = await client.enqueue(event("acknowledge", dedup_key="srv01/mysql"))
    assert (status, answer) == (202, {**ACCEPTED, "dedup_key": "srv01/mysql"})
    (group,) = await h.groups(integration_id="pd")
    assert (group["state"], group["alerts_count"]) == ("acknowledged", 3)

    status, answer = await client.at_integration(event("resolve", dedup_key="srv01/mysql"), slash=False)
    assert (status, answer) == (202, {**ACCEPTED, "dedup_key": "srv01/mysql"})
    (group,) = await h.groups(integration_id="pd")
    assert (group["state"], group["alerts_count"]) == ("resolved", 4)

    # The whole event is the payload, without the routing key (a secret notifiers would pass on).
    status, alerts = await h.api("GET", f"alerts/?alert_group_id={group['id']}")
    first = alerts["results"][0]["payload"]
    sent = trigger("srv01/mysql")
    del sent["routing_key"]
    assert first == sent
    assert [a["payload"]["event_action"] for a in alerts["results"]] == ["trigger", "trigger", "acknowledge",
                                                                          "resolve"]

    # A resolved alert takes no more triggers: the next one opens a new group.
    assert (await client.enqueue(trigger("srv01/mysql")))[0] == 202
    groups = await h.groups(integration_id="pd")
    assert [(g["state"], g["alerts_count"]) for g in groups] == [("new", 1), ("resolved", 4)]


async def test_dedup_keys_are_per_integration(pd):
    h, client = pd
    assert (await client.enqueue(trigger("shared-key")))[0] == 202
    assert (await client.at_integration(trigger("shared-key", routing_key=OTHER_TOKEN), token=OTHER_TOKEN))[0] == 202
    # A follow-up through the other routing key touches only that integration's alert.
    assert (await client.enqueue(event("resolve", dedup_key="shared-key", routing_key=OTHER_TOKEN)))[0] == 202
    assert [g["state"] for g in await h.groups(integration_id="pd")] == ["new"]
    assert [g["state"] for g in await h.groups(integration_id="pd2")] == ["resolved"]


async def test_trigger_without_dedup_key_gets_one_and_a_second_trigger_with_it_joins(pd):
    h, client = pd
    status, answer = await client.enqueue(trigger(None))
    assert status == 202 and answer["status"] == "success"
    key = answer["dedup_key"]
    assert len(key) == 32 and int(key, 16) >= 0
    status, again = await client.at_integration(trigger(key, "same problem"))
    assert (status, again["dedup_key"]) == (202, key)
    status, blank = await client.enqueue(trigger(""))  # blank counts as none
    assert status == 202 and blank["dedup_key"] not in ("", key)

    groups = await h.groups(integration_id="pd")
    assert sorted(g["alerts_count"] for g in groups) == [1, 2]
    _, alerts = stored(h)
    assert [json.loads(p)["dedup_key"] for _, p in alerts] == [key, key, blank["dedup_key"]]


async def test_acknowledge_and_resolve_without_an_open_alert_store_nothing(pd):
    h, client = pd
    for name in ("acknowledge", "resolve"):
        status, answer = await client.enqueue(event(name, dedup_key="never-triggered"))
        assert (status, answer) == (202, {**ACCEPTED, "dedup_key": "never-triggered"})
        status, answer = await client.at_integration(event(name, dedup_key="never-triggered"))
        assert status == 202
    assert stored(h) == ([], [])
    assert await h.groups(integration_id="pd") == []

    # Once resolved, the alert is closed: further follow-ups are dropped, not added to it.
    await client.enqueue(trigger("k1"))
    await client.enqueue(event("resolve", dedup_key="k1"))
    for name in ("acknowledge", "resolve"):
        assert (await client.enqueue(event(name, dedup_key="k1")))[0] == 202
    groups, alerts = stored(h)
    assert [(g[2], g[3]) for g in groups] == [("resolved", 2)] and len(alerts) == 2


# --- invalid events -------------------------------------------------------------------------------

def _without_payload_field(field: str) -> dict:
    body = trigger("k")
    del body["payload"][field]
    return body


def _with_payload_field(field: str, value) -> dict:
    body = trigger("k")
    body["payload"][field] = value
    return body


INVALID = [
    ("no event_action", event("resolve", dedup_key="k", event_action=None), "'event_action' is missing"),
    ("unknown event_action", event("resolve", dedup_key="k", event_action="close"), "'event_action' is invalid"),
    ("trigger without payload", trigger("k", payload=None), "'payload' is missing"),
    ("payload not an object", trigger("k", payload="down"), "'payload' is invalid"),
    ("no summary", _without_payload_field("summary"), "'payload.summary' is missing"),
    ("blank summary", _with_payload_field("summary", "  "), "'payload.summary' is missing"),
    ("summary too long", _with_payload_field("summary", "x" * 1025), "'payload.summary' is too long"),
    ("no source", _without_payload_field("source"), "'payload.source' is missing"),
    ("no severity", _without_payload_field("severity"), "'payload.severity' is missing"),
    ("unknown severity", _with_payload_field("severity", "fatal"), "'payload.severity' is invalid"),
    ("bad timestamp", _with_payload_field("timestamp", "yesterday"), "'payload.timestamp' is invalid"),
    ("timestamp not text", _with_payload_field("timestamp", 1437122578), "'payload.timestamp' is invalid"),
    ("dedup_key too long", trigger("k" * 256), "'dedup_key' is too long"),
    ("dedup_key not text", trigger(17), "'dedup_key' is invalid"),
    ("acknowledge without dedup_key", event("acknowledge", dedup_key=None), "'dedup_key' is missing"),
    ("resolve without dedup_key", event("resolve", dedup_key=None), "'dedup_key' is missing"),
    ("links not a list", trigger("k", links={"href": "https://x"}), "'links' is invalid"),
    ("link without href", trigger("k", links=[{"text": "no target"}]), "'links[0].href' is missing"),
    ("link not an object", trigger("k", links=["https://x"]), "'links[0]' is invalid"),
    ("images not a list", trigger("k", images="https://x/i.png"), "'images' is invalid"),
    ("image without src", trigger("k", images=[{"src": "https://x/a.png"}, {"alt": "none"}]),
     "'images[1].src' is missing"),
    ("no routing_key", event("resolve", dedup_key="k", routing_key=None), "'routing_key' is missing"),
    ("unknown routing_key", trigger("k", routing_key="nobody-has-this-key"), "'routing_key' is invalid"),
    ("a webhook integration's key", trigger("k", routing_key="tok-webhook-0001"), "'routing_key' is invalid"),
    ("not JSON", b"routing_key=x&event_action=trigger", "JSON parse error"),
    ("empty body", b"", "JSON parse error"),
    ("JSON array", json.dumps([trigger("k")]).encode(), "must be a JSON object"),
]


@pytest.mark.parametrize("body, expected", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
async def test_each_invalid_field_is_named_in_a_400(pd, body, expected):
    h, client = pd
    status, answer = await client.enqueue(body)
    assert status == 400
    assert (answer["status"], answer["message"]) == ("invalid event", "Event object is invalid")
    assert any(expected in e for e in answer["errors"]), answer["errors"]
    if not isinstance(body, bytes) and "routing_key" in body and body["routing_key"] == PD_TOKEN:
        # the same answer at the integration URL
        status, again = await client.at_integration(body)
        assert status == 400 and any(expected in e for e in again["errors"]), again
    assert stored(h) == ([], [])


async def test_every_problem_is_listed_at_once(pd):
    h, client = pd
    body = {"routing_key": "unknown", "event_action": "trigger", "dedup_key": "d" * 300,
            "payload": {"summary": "", "severity": "bad", "timestamp": "soon"}, "links": [{}]}
    status, answer = await client.enqueue(body)
    assert status == 400
    named = [e.split("'")[1] for e in answer["errors"]]
    assert named == ["routing_key", "dedup_key", "payload.summary", "payload.source", "payload.severity",
                     "payload.timestamp", "links[0].href"]
    assert answer["error"] == "; ".join(answer["errors"])


async def test_integration_url_checks_the_routing_key_and_the_kind(pd):
    h, client = pd
    status, answer = await client.at_integration(trigger("k", routing_key=OTHER_TOKEN))
    assert status == 400 and answer["errors"] == ["'routing_key' is invalid (it differs from the key in the URL)"]
    # without a routing_key the URL names the integration
    status, answer = await client.at_integration(trigger("k", routing_key=None))
    assert (status, answer) == (202, {**ACCEPTED, "dedup_key": "k"})
    status, answer = await client.at_integration(trigger("k"), token="no-such-token")
    assert status == 403 and answer["status"] == "invalid event" and "not found" in answer["error"]
    status, answer = await client.at_integration(trigger("k"), token="tok-webhook-0001")
    assert status == 400 and "Key is for webhook" in answer["error"]
    # and a PagerDuty key at another kind's URL is refused by the generic handler
    status, answer = await h.post("pd", trigger("k"), kind="webhook")
    assert status == 400 and "Key is for pagerduty" in answer["error"]
    groups, alerts = stored(h)
    assert len(groups) == 1 and len(alerts) == 1


async def test_heartbeat_url_and_preview_still_work_for_the_kind(pd):
    h, client = pd
    async with h.session.get(f"{h.base}/integrations/v1/pagerduty/{PD_TOKEN}/heartbeat/", timeout=TIMEOUT) as r:
        assert r.status == 200
    status, preview = await h.api("POST", "integrations/pd/preview/", {"payload": trigger("srv01/mysql")})
    assert status == 200, preview
    assert preview["title"] == "Example alert on host1.example.com"
    assert preview["source_link"] == "https://example.com/"
    assert preview["image_url"] == "https://www.pagerduty.com/wp-content/uploads/2016/05/pagerduty-logo-green.png"
    assert preview["message"].startswith("**Severity**: info :information_source:\n**Source**: monitoringtool:")
    assert "*ping time*: 1500ms\n" in preview["message"] and "[Link text](https://example.com/)" in preview["message"]
    assert (preview["resolve"], preview["acknowledge"]) == (False, False)
    status, preview = await h.api("POST", "integrations/pd/preview/",
                                  {"payload": {"event_action": "acknowledge", "dedup_key": "srv01/mysql",
                                               "client_url": "https://mon"}})
    assert (preview["acknowledge"], preview["resolve"], preview["source_link"]) == (True, False, "https://mon")


# --- rate limit -----------------------------------------------------------------------------------

async def test_rate_limited_triggers_get_429_while_follow_ups_pass(start_tocsin):
    h = await start_tocsin(extra_integrations=pd_integrations('rate_limit = "2/1m"'))
    client = Client(h.base, h.session)
    assert (await client.enqueue(trigger("a")))[0] == 202
    assert (await client.at_integration(trigger("b")))[0] == 202
    for url in ("/v2/enqueue", f"/integrations/v1/pagerduty/{PD_TOKEN}/"):
        status, answer, headers = await client.send(trigger("c"), url=url)
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
        assert answer["status"] == "throttle event" and "2/1m" in answer["errors"][0]
    # acknowledge and resolve are never refused, and still take effect
    assert (await client.enqueue(event("acknowledge", dedup_key="a")))[0] == 202
    assert (await client.enqueue(event("resolve", dedup_key="a")))[0] == 202
    assert (await client.at_integration(event("resolve", dedup_key="b")))[0] == 202
    assert (await client.enqueue(event("resolve", dedup_key="never")))[0] == 202
    groups, alerts = stored(h)
    assert sorted((g[3], g[2]) for g in groups) == [(2, "resolved"), (3, "resolved")]
    assert len(alerts) == 5


# --- 202 means on disk ----------------------------------------------------------------------------

async def _load(base: str, accepted: list[str], stop: asyncio.Event, worker: int) -> None:
    n = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set():
            n += 1
            url = "/v2/enqueue" if n % 2 else f"/integrations/v1/pagerduty/{PD_TOKEN}/"
            body = trigger(f"w{worker}-{n}")
            try:
                async with session.post(base + url, json=body) as r:
                    if r.status == 202:
                        accepted.append((await r.json())["dedup_key"])
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
                await asyncio.sleep(0.01)  # the daemon is gone; keep trying until told to stop


async def test_sigkill_right_after_202_loses_no_event(spawn, tmp_path):
    proc = spawn(extra_integrations=pd_integrations())
    accepted: list[str] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_load(proc.base, accepted, stop, w)) for w in range(8)]
    for _ in range(200):  # until some events are in, bounded in time
        await asyncio.sleep(0.05)
        if len(accepted) >= 40:
            break
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=10)
    stop.set()
    await asyncio.gather(*workers)
    assert len(accepted) >= 10, "the load never got going"

    again = spawn(proc.config_path)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{again.base}/api/v1/alerts/?perpage=1",
                                   headers={"Authorization": API_TOKEN}) as r:
                count = (await r.json())["count"]
    finally:
        assert again.stop() == 0
    with sqlite3.connect(tmp_path / "tocsin.db") as db:
        keys = {json.loads(p)["dedup_key"] for (p,) in db.execute("SELECT payload FROM alerts")}
    missing = set(accepted) - keys
    assert not missing, f"{len(missing)} of {len(accepted)} accepted events lost"
    assert count == len(keys) >= len(accepted)
