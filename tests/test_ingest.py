"""HTTP ingestion through a real socket and a real database: kinds' defaults on the corpus, error codes."""
from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from conftest import API_TOKEN, TOKEN, corpus


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def payload(name: str):
    return json.loads(corpus(f"http/{name}.json"))


async def count_rows(h, table="alerts") -> int:
    with sqlite3.connect(h.daemon.config.daemon.database) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize(
    "iid, firing, resolving, key_text",
    [
        ("am", "alertmanager-firing", "alertmanager-resolved", '{}:{alertname="InstanceDown"}'),
        ("gl", "grafana-legacy-alerting", "grafana-legacy-ok", "High CPU"),
        ("fw", "formatted-webhook-alerting", "formatted-webhook-ok", "a6b1c3e0-2f7d-4b8e-9c11-5d2e8f0a7b13"),
        ("kp", "kapacitor-critical", "kapacitor-ok", "cpu:host=app03"),
    ],
)
async def test_corpus_pairs_group_and_resolve(tocsin, iid, firing, resolving, key_text):
    status, first = await tocsin.post(iid, corpus(f"http/{firing}.json"))
    assert status == 200, first
    assert first["grouping_key"] == md5(key_text)
    [group] = await tocsin.groups(integration_id=iid)
    assert group["state"] == "new" and group["alerts_count"] == 1

    status, second = await tocsin.post(iid, corpus(f"http/{resolving}.json"))
    assert status == 200, second
    assert second["alert_group_id"] == first["alert_group_id"]
    [group] = await tocsin.groups(integration_id=iid)
    assert group["state"] == "resolved" and group["alerts_count"] == 2
    assert group["resolved_by"] == "source"


async def test_zabbix_pair(tocsin):
    problem, ok = payload("zabbix-problem"), payload("zabbix-ok")
    status, first = await tocsin.post("zb", problem)
    assert status == 200
    assert first["grouping_key"] == md5(problem["alert_uid"])
    status, second = await tocsin.post("zb", ok)
    assert second["alert_group_id"] == first["alert_group_id"]
    [group] = await tocsin.groups(integration_id="zb")
    assert group["state"] == "resolved"
    assert group["title"] == problem["title"]


async def test_alertmanager_counts_filled_and_source_link(tocsin):
    body = payload("alertmanager-firing")
    body.pop("numFiring", None)
    body.pop("numResolved", None)
    status, res = await tocsin.post("am", body)
    assert status == 200
    status, alerts = await tocsin.api("GET", f"alerts/?alert_group_id={res['alert_group_id']}")
    stored = alerts["results"][0]["payload"]
    firing = sum(a["status"] == "firing" for a in body["alerts"])
    assert stored["numFiring"] == firing
    assert stored["numResolved"] == len(body["alerts"]) - firing
    status, preview = await tocsin.api("POST", "integrations/am/preview/", {"payload": body})
    assert preview["source_link"] == body["alerts"][0]["generatorURL"]


async def test_grafana_alerting_and_elastalert_keys(tocsin):
    ga = payload("grafana-alerting-firing")
    status, res = await tocsin.post("ga", ga)
    assert status == 200 and res["grouping_key"] == md5(ga["groupKey"])
    [group] = await tocsin.groups(integration_id="ga")
    assert group["state"] == "new"
    ea = payload("elastalert")
    status, res = await tocsin.post("ea", ea)
    assert status == 200 and res["grouping_key"] == md5(ea["alert_uid"])


async def test_webhook_groups_identical_payloads_only(tocsin):
    body = payload("webhook-generic")
    status, first = await tocsin.post("wh", body)
    assert first["grouping_key"] == md5(repr(body) + "\n")
    status, again = await tocsin.post("wh", body)
    assert again["alert_group_id"] == first["alert_group_id"]
    status, other = await tocsin.post("wh", {**body, "extra": 1})
    assert other["alert_group_id"] != first["alert_group_id"]


async def test_payload_stored_as_received(tocsin):
    raw = b'{"b": 1,   "a": [1, 2],\n "z": "\\u00e9"}'
    status, res = await tocsin.post("wh", raw)
    assert status == 200
    with sqlite3.connect(tocsin.daemon.config.daemon.database) as db:
        (stored,) = db.execute("SELECT payload FROM alerts WHERE id = ?", (res["alert_id"],)).fetchone()
    assert stored == raw.decode()


async def test_json_array_form_and_multipart(tocsin):
    status, res = await tocsin.post("wh", [1, 2, 3])
    assert status == 200
    status, res = await tocsin.post(
        "fw", data="alert_uid=x1&state=alerting&state=ok&title=T",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200 and res["grouping_key"] == md5("x1")
    [group] = await tocsin.groups(integration_id="fw")
    assert group["state"] == "resolved"  # last value per key: state=ok
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("alert_uid", "m1")
    form.add_field("title", "from multipart")
    status, res = await tocsin.post("zb", data=form)
    assert status == 200 and res["grouping_key"] == md5("m1")


async def test_empty_body_is_an_empty_payload(tocsin):
    status, res = await tocsin.post("wh", b"", headers={"Content-Type": "text/plain"})
    assert status == 200
    assert res["grouping_key"] == md5("{}\n")


async def test_trailing_slash_optional(tocsin):
    status, res = await tocsin.post("fw", {"alert_uid": "s"}, slash=False)
    assert status == 200


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"token": "no-such-token-xyz"}, 403, "Permission denied"),
        ({"kind": "webhook"}, 400, "Key is for alertmanager"),
        ({"body": b'{"a": 1,'}, 400, "JSON parse error"),
        ({"body": b'"just a string"'}, 400, "object or an array"),
        ({"body": b'{"a": "\xff\xfe"}'}, 400, "UTF-8"),
        ({"body": b"[" * 5000 + b"]" * 5000}, 400, "nested"),
        ({"body": b"[" * 200 + b"]" * 200}, 400, "nested"),
        ({"body": b"a=1", "headers": {"Content-Type": "text/plain"}}, 415, "Unsupported media type"),
    ],
)
async def test_errors_store_nothing(tocsin, kwargs, status, fragment):
    body = kwargs.pop("body", {"status": "firing", "groupKey": "x"})
    got, res = await tocsin.post("am", body, **kwargs)
    assert got == status, res
    assert fragment in res["error"]
    assert await count_rows(tocsin) == 0


async def test_file_upload_refused(tocsin):
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("file", b"data", filename="x.bin", content_type="application/octet-stream")
    status, res = await tocsin.post("wh", data=form)
    assert status == 400 and res["error"] == "File uploads are not allowed"
    assert await count_rows(tocsin) == 0


async def test_body_over_limit_413(start_tocsin, tmp_path):
    h = await start_tocsin(http_extra="max_body_bytes = 2000")
    status, res = await h.post("wh", {"x": "y" * 3000})
    assert status == 413 and "limit" in res["error"]

    async def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(10):
            yield b" " * 500

    async with h.session.post(f"{h.base}/integrations/v1/webhook/{TOKEN['wh']}/", data=chunks(),
                              headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    status, res = await h.post("wh", {"x": "y" * 100})
    assert status == 200
    assert await count_rows(h) == 1


async def test_storage_unavailable_503(tocsin):
    await tocsin.daemon.store.close()  # the writer is gone: nothing can be committed
    status, res = await tocsin.post("fw", {"alert_uid": "u"})
    assert status == 503 and "storage" in res["error"]


async def test_heartbeat(tocsin):
    async with tocsin.session.get(f"{tocsin.base}/integrations/v1/webhook/{TOKEN['wh']}/heartbeat/") as r:
        assert r.status == 200
    beats = await tocsin.daemon.store.heartbeats()
    assert "wh" in beats
    async with tocsin.session.get(f"{tocsin.base}/integrations/v1/webhook/bad-token-123/heartbeat/") as r:
        assert r.status == 403


async def test_grafana_legacy_split(tocsin):
    body = {"alerts": [
        {"status": "firing", "labels": {"alertname": "A1"}, "generatorURL": "http://g/1"},
        {"status": "firing", "labels": {"alertname": "A2"}, "generatorURL": "http://g/2"},
    ]}
    status, res = await tocsin.post("gl", body)
    assert status == 200 and len(res["alerts"]) == 2
    assert {a["grouping_key"] for a in res["alerts"]} == {md5("A1"), md5("A2")}


async def test_unknown_path_and_api_auth(tocsin):
    status, res = await tocsin.api("GET", "alert_groups/", token=None)
    assert status == 401
    status, res = await tocsin.api("GET", "alert_groups/", token="wrong")
    assert status == 401
    status, res = await tocsin.api("GET", "alert_groups/", token=f"Bearer {API_TOKEN}")
    assert status == 200


async def test_hostile_templates_keep_the_alert_and_the_service(start_tocsin):
    """A runaway grouping template costs its own alert a template error (it stands alone),
    a sandbox escape in the title shows as a Template Error, and meanwhile other
    integrations are served at once."""
    import asyncio
    import time

    from conftest import integration

    templates = r"""[integrations.templates]
grouping_id = "{% for a in payload.x %}{% for b in payload.x %}{% for c in payload.x %}{{ a }}{% endfor %}{% endfor %}{% endfor %}"
title = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
resolve_condition = '{{ payload.s | regex_search("(a|aa)+$") }}'"""
    h = await start_tocsin(extra_integrations=integration("slow", "webhook", "tok-slow-0000001", templates))
    hostile = {"x": list(range(400)), "s": "a" * 40 + "!"}
    slow = asyncio.create_task(h.post("slow", hostile))
    await asyncio.sleep(0.1)
    waits = []
    for n in range(10):  # served while the hostile render runs in a worker thread
        t0 = time.monotonic()
        assert (await h.post("fw", {"alert_uid": f"meanwhile-{n}"}))[0] == 200
        waits.append(time.monotonic() - t0)
    status, res = await slow
    assert status == 200
    # Issue 10's bound: no template delays another integration's 200 by more than 1 s (each
    # request, not the ten together: those add up on a loaded machine).
    assert max(waits) < 1.0, f"other traffic waited {max(waits):.2f} s behind a hostile template"
    g = (await h.api("GET", f"alert_groups/{res['alert_group_id']}/"))[1]
    assert g["title"].startswith("Template Error") and g["state"] == "new"
    status, res2 = await h.post("slow", hostile)
    assert res2["alert_group_id"] != res["alert_group_id"]  # the failed grouping id stands alone
