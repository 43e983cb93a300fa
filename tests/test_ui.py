"""The web UI under /ui/: login and sessions, CSRF, escaping, group actions, the template
editor (preview, TOML, writing config.toml), and browser tests in headless Chromium."""
from __future__ import annotations

import asyncio
import html
import json
import re
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import API_TOKEN, ROOT, TOKEN, config_text, require
from ui.auth import Sessions
from ui.editor import EditError, rewrite, toml_block, toml_string, write_templates

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = '<script>alert("x")</script>'

# An integration whose name and templates put payload text into every page.
XSS_INTEGRATION = f"""
[[integrations]]
id = "xss"
name = '{XSS}'
kind = "webhook"
token = "tok-xss-0000001"
[integrations.templates]
grouping_id = "{{{{ payload.title }}}}"
title = "{{{{ payload.title }}}}"
message = "{{{{ payload.body }}}}"
source_link = "{{{{ payload.url }}}}"
image_url = "{{{{ payload.image }}}}"
"""


class Browser:
    """An aiohttp client with a cookie jar that keeps 127.0.0.1's cookies, logged in or not."""

    def __init__(self, harness):
        self.h = harness
        self.base = harness.base
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def close(self):
        await self.session.close()

    async def get(self, path: str, **kw):
        async with self.session.get(self.base + path, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r.headers

    async def post(self, path: str, **kw):
        async with self.session.post(self.base + path, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r.headers

    async def login(self, token: str = API_TOKEN, next_: str = "/ui/groups"):
        status, page, _ = await self.get("/ui/login")
        assert status == 200
        nonce = re.search(r'name="_login" value="([^"]+)"', page).group(1)
        result = await self.post("/ui/login", data={"_login": nonce, "token": token, "next": next_})
        if result[0] == 303:
            await self.refresh_csrf()
        return result

    async def refresh_csrf(self):
        status, page, _ = await self.get("/ui/groups")
        assert status == 200, page
        self.csrf = re.search(r'name="csrf-token" content="([^"]*)"', page).group(1)


@pytest.fixture
async def client(tocsin):
    b = Browser(tocsin)
    yield b
    await b.close()


async def new_group(h, iid="wh", **payload) -> str:
    extra = {"kind": "webhook", "token": "tok-xss-0000001"} if iid == "xss" else {}
    status, body = await h.post(iid, payload or {"n": time.time_ns()}, **extra)
    assert status == 200, body
    return body["alert_group_id"]


# -- login and sessions -------------------------------------------------------------


async def test_pages_need_a_session(tocsin, client):
    gid = await new_group(tocsin)
    for path in ("/ui/groups", "/ui/integrations", f"/ui/groups/{gid}", "/ui/integrations/wh/templates",
                 "/ui/groups?state=new&page=2"):
        status, _, headers = await client.get(path)
        assert status == 303, path
        assert headers["Location"].startswith("/ui/login?next=%2Fui%2F"), headers["Location"]
    for path in ("/ui/api/groups", "/ui/api/integrations/wh/payload"):
        status, body, _ = await client.get(path)
        assert status == 401 and json.loads(body)["error"]
    status, _, headers = await client.post(f"/ui/groups/{gid}/acknowledge", data={"_csrf": "x"})
    assert status == 303 and headers["Location"].startswith("/ui/login")
    assert (await tocsin.groups())[0]["state"] == "new"
    status, _, headers = await client.get("/ui")
    assert status == 303 and headers["Location"] == "/ui/login?next=%2Fui%2Fgroups"
    status, css, _ = await client.get("/ui/static/ui.css")
    assert status == 200 and "--accent" in css  # the login page needs its stylesheet


async def test_wrong_token_is_refused(client):
    status, page, headers = await client.login("not-the-token")
    assert status == 401 and "Wrong token." in page
    assert "tocsin_session" not in headers.get("Set-Cookie", "")
    assert (await client.get("/ui/groups"))[0] == 303
    # The login form carries its own double-submit value: a post from elsewhere is refused.
    status, _, _ = await client.post("/ui/login", data={"token": API_TOKEN})
    assert status == 403
    assert (await client.get("/ui/groups"))[0] == 303


async def test_login_sets_a_strict_http_only_cookie_and_goes_back(client):
    status, _, headers = await client.login(next_="/ui/integrations")
    assert status == 303 and headers["Location"] == "/ui/integrations"
    cookie = next(c for c in headers.getall("Set-Cookie") if c.startswith("tocsin_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # public_url is http: the cookie must work on http://127.0.0.1
    assert (await client.get("/ui"))[2]["Location"] == "/ui/groups"
    status, page, headers = await client.get("/ui/integrations")
    assert status == 200 and "Test webhook" in page
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    for evil in ("//evil.example/ui/", "https://evil.example/", "/\\evil.example"):
        client.session.cookie_jar.clear()
        status, _, headers = await client.login(next_=evil)
        assert status == 303 and headers["Location"] == "/ui/groups", evil


async def test_secure_cookie_when_public_url_is_https(start_tocsin, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path).replace('"http://127.0.0.1:8080"', '"https://oncall.example.com"'))
    h = await start_tocsin(path)
    b = Browser(h)
    try:
        status, page, headers = await b.get("/ui/login")
        assert "Secure" in headers["Set-Cookie"]
        nonce = re.search(r'name="_login" value="([^"]+)"', page).group(1)
        # The client speaks http, so it would not send a Secure cookie back: hand it over.
        status, _, headers = await b.post("/ui/login", data={"_login": nonce, "token": API_TOKEN},
                                          headers={"Cookie": f"tocsin_login={nonce}"})
        assert status == 303
        cookie = next(c for c in headers.getall("Set-Cookie") if c.startswith("tocsin_session="))
        assert "Secure" in cookie and "HttpOnly" in cookie
    finally:
        await b.close()


async def test_logout_ends_the_session(client):
    await client.login()
    kept = {c.key: c.value for c in client.session.cookie_jar}
    status, _, headers = await client.post("/ui/logout", data={"_csrf": client.csrf})
    assert status == 303 and headers["Location"] == "/ui/login"
    assert (await client.get("/ui/groups"))[0] == 303
    # A copy of the old cookie no longer works either.
    client.session.cookie_jar.update_cookies(kept)
    assert (await client.get("/ui/groups"))[0] == 303


def test_session_values_are_signed_expire_and_follow_the_token():
    s = Sessions(lifetime=60)
    value = s.issue("tok", now=1000)
    assert s.check(value, ["tok"], now=1001) is not None
    assert s.check(value, ["tok"], now=1061) is None  # expired
    assert s.check(value, ["other"], now=1001) is None  # its token was removed from the config
    sid, expires, fp, mac = value.split(".")
    assert s.check(f"{sid}.{int(expires) + 9999}.{fp}.{mac}", ["tok"], now=1001) is None  # tampered
    assert Sessions().check(value, ["tok"], now=1001) is None  # another process's key
    assert s.check("garbage", ["tok"]) is None and s.check(None, ["tok"]) is None
    session = s.check(value, ["tok"], now=1001)
    assert s.csrf_ok(session, session.csrf) and not s.csrf_ok(session, "") and not s.csrf_ok(session, "x")


# -- CSRF ---------------------------------------------------------------------------


async def test_every_post_needs_the_csrf_token(tocsin, client):
    gid = await new_group(tocsin)
    await client.login()
    for data in ({}, {"_csrf": "wrong"}, {"_csrf": ""}):
        status, page, _ = await client.post(f"/ui/groups/{gid}/acknowledge", data=data)
        assert status == 403 and "CSRF" in page
    status, _, _ = await client.post(f"/ui/groups/{gid}/acknowledge", json={"_csrf": client.csrf})
    assert status == 403  # the token is read from a form field or the header only
    assert (await tocsin.groups())[0]["state"] == "new"
    status, _, _ = await client.post("/ui/api/integrations/wh/preview", json={"templates": {}, "payload": "{}"})
    assert status == 403
    status, _, _ = await client.post("/ui/integrations/wh/templates", data={"action": "write", "tpl_title": "x"})
    assert status == 403
    assert (await client.post("/ui/logout", data={}))[0] == 403
    status, _, headers = await client.post(f"/ui/groups/{gid}/acknowledge",
                                           data={"_csrf": client.csrf, "next": "/ui/groups"})
    assert status == 303 and headers["Location"] == "/ui/groups"
    assert (await tocsin.groups())[0]["state"] == "acknowledged"


# -- escaping -----------------------------------------------------------------------


async def test_payload_and_names_are_escaped_on_every_page(start_tocsin):
    h = await start_tocsin(extra_integrations=XSS_INTEGRATION)
    gid = await new_group(h, "xss", title=XSS, body=XSS + "<img src=x onerror=alert(1)>",
                          url="javascript:alert(1)", image="javascript:alert(2)", **{"</textarea>": XSS})
    b = Browser(h)
    try:
        await b.login()
        status, _, _ = await b.post(f"/ui/groups/{gid}/silence", data={"_csrf": b.csrf, "delay": "-1"})
        pages = ["/ui/groups", "/ui/groups?integration=xss", f"/ui/groups/{gid}", "/ui/integrations",
                 "/ui/integrations/xss", "/ui/integrations/xss/templates", "/ui/api/groups",
                 "/ui/groups?q=%3Cscript%3Ealert&label=%3Cscript%3E%3D%3Cb%3E"]
        for path in pages:
            status, text, _ = await b.get(path)
            assert status == 200, (path, text[:500])
            if path.startswith("/ui/api/"):
                text = json.loads(text)["html"]
            assert "<script>alert" not in text, path
            assert "<img src=x" not in text and "</textarea><script" not in text, path
            assert 'href="javascript:' not in text and 'src="javascript:' not in text, path
        status, page, _ = await b.get(f"/ui/groups/{gid}")
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page  # shown, as text
        status, page, _ = await b.post("/ui/integrations/xss/templates",
                                       data={"_csrf": b.csrf, "action": "toml", "tpl_title": XSS + "{{ 1 +"})
        assert status == 400 and "<script>alert" not in page
    finally:
        await b.close()


# -- alert groups ---------------------------------------------------------------------


async def test_group_actions_silence_and_refusals(tocsin, client):
    gid = await new_group(tocsin)
    await client.login()
    status, page, _ = await client.get(f"/ui/groups/{gid}")
    assert 'data-action="acknowledge"' in page and 'data-action="silence"' in page
    assert 'value="-1">forever' in page and "created" in page
    status, _, headers = await client.post(f"/ui/groups/{gid}/silence", data={"_csrf": client.csrf, "delay": "3600"})
    assert status == 303 and headers["Location"] == f"/ui/groups/{gid}"
    [g] = await tocsin.groups()
    assert g["state"] == "silenced" and g["silenced_until"] is not None
    await client.post(f"/ui/groups/{gid}/resolve", data={"_csrf": client.csrf})
    status, _, _ = await client.post(f"/ui/groups/{gid}/acknowledge", data={"_csrf": client.csrf})
    status, page, _ = await client.get(f"/ui/groups/{gid}")
    assert "Can&#39;t acknowledge a resolved alert group" in page
    assert 'data-action="unresolve"' in page and "resolved" in page
    status, _, _ = await client.get("/ui/groups/INOSUCHGROUP")
    assert status == 404


async def test_groups_filters_and_pages(tocsin, client):
    ids = [await new_group(tocsin, n=i) for i in range(7)]
    await new_group(tocsin, "fw", alert_uid="x")
    await client.login()
    status, page, _ = await client.get("/ui/groups?integration=wh&perpage=3&page=3")
    assert status == 200 and "7 groups · page 3 of 3" in page
    assert page.count('data-group="') == 1 and ids[0] in page  # oldest last
    assert "integration=wh" in re.search(r'data-refresh="([^"]*)"', page).group(1)
    first = re.search(r'href="([^"]*)" rel="first"', page).group(1)
    assert "perpage=3" in first and "integration=wh" in first
    await client.post(f"/ui/groups/{ids[3]}/acknowledge", data={"_csrf": client.csrf})
    status, page, _ = await client.get("/ui/groups?state=acknowledged")
    assert "1 group · page 1 of 1" in page and ids[3] in page
    status, page, _ = await client.get("/ui/groups?since=2999-01-01T00:00")
    assert "0 groups" in page and "No alert groups match." in page
    status, page, _ = await client.get("/ui/groups?since=2000-01-01T00:00&until=2999-01-01T00:00")
    assert "8 groups" in page
    status, page, _ = await client.get("/ui/groups?since=yesterday&state=bogus")
    assert "is not a date and time" in page and "unknown state" in page
    status, body, _ = await client.get("/ui/api/groups?integration=fw")
    data = json.loads(body)
    assert data["count"] == 1 and data["results"][0]["integration_id"] == "fw" and "data-group=" in data["html"]


async def test_integrations_page(tocsin, client):
    await new_group(tocsin)
    async with tocsin.session.get(f"{tocsin.base}/integrations/v1/alertmanager/{TOKEN['am']}/heartbeat/") as r:
        assert r.status == 200
    await client.login()
    status, page, _ = await client.get("/ui/integrations")
    row = re.search(r'<tr data-integration="wh">(.*?)</tr>', page, re.S).group(1)
    assert f"http://127.0.0.1:8080/integrations/v1/webhook/{TOKEN['wh']}/" in row
    assert ">1</a>" in row and "1 new" in row and "never" in row
    am = re.search(r'<tr data-integration="am">(.*?)</tr>', page, re.S).group(1)
    assert "s ago" in am and "never" not in am


# -- heartbeats and maintenance (issue 5) ------------------------------------------------

HEARTBEATS = """
[[integrations]]
id = "hb"
name = "Pinged"
kind = "webhook"
token = "tok-heartbeat-0001"
heartbeat_timeout = "1h"

[[integrations]]
id = "quiet"
name = "Never pinged"
kind = "webhook"
token = "tok-heartbeat-0002"
heartbeat_timeout = "5m"
"""


def row_of(page: str, iid: str) -> str:
    return re.search(rf'<tr data-integration="{iid}">(.*?)</tr>', page, re.S).group(1)


async def test_integrations_page_heartbeat_states(start_tocsin):
    h = await start_tocsin(extra_integrations=HEARTBEATS)
    async with h.session.get(f"{h.base}/integrations/v1/webhook/tok-heartbeat-0001/heartbeat/") as r:
        assert r.status == 200
    b = Browser(h)
    try:
        await b.login()
        status, page, _ = await b.get("/ui/integrations")
        assert status == 200
        hb = row_of(page, "hb")
        assert 'data-heartbeat="alive"' in hb and "s ago" in hb and "timeout 1 h" in hb and "UTC" in hb
        quiet = row_of(page, "quiet")
        assert 'data-heartbeat="never"' in quiet and "timeout 5 min" in quiet
        wh = row_of(page, "wh")
        assert 'data-heartbeat="off"' in wh and "never pinged" in wh
        store = h.daemon.current().store
        last_seen = (await store.heartbeats())["hb"][0]
        assert await store.heartbeat_expired("hb", last_seen)
        status, page, _ = await b.get("/ui/integrations")
        assert 'data-heartbeat="expired"' in row_of(page, "hb")
    finally:
        await b.close()


async def test_maintenance_start_and_stop_from_the_integrations_page(tocsin, client):
    store = tocsin.daemon.current().store
    await client.login()
    status, page, _ = await client.get("/ui/integrations")
    wh = row_of(page, "wh")
    assert 'data-maintenance=""' in wh and "—" in wh and 'data-maintenance-action="start"' in wh
    for seconds, label in ((3600, "1 hour"), (10800, "3 hours"), (21600, "6 hours"), (43200, "12 hours"),
                           (86400, "24 hours")):
        assert f'<option value="{seconds}">{label}</option>' in wh
    start = "/ui/integrations/wh/maintenance/start"
    # Without (or with a wrong) CSRF token nothing starts or stops.
    for data in ({"mode": "maintenance", "duration": "3600"},
                 {"mode": "maintenance", "duration": "3600", "_csrf": "wrong"}):
        status, page, _ = await client.post(start, data=data)
        assert status == 403 and "CSRF" in page
    assert (await store.maintenance()) == {}
    # Only the offered modes and durations.
    for bad in ({"mode": "party", "duration": "3600"}, {"mode": "debug", "duration": "5"},
                {"mode": "debug", "duration": "soon"}):
        status, _, headers = await client.post(start, data={"_csrf": client.csrf, **bad})
        assert status == 303 and headers["Location"] == "/ui/integrations"
        status, page, _ = await client.get("/ui/integrations")
        assert 'class="flash error"' in page, bad
    assert (await store.maintenance()) == {}

    before = time.time()
    status, _, headers = await client.post(start, data={"_csrf": client.csrf, "mode": "maintenance",
                                                        "duration": "10800"})
    assert status == 303 and headers["Location"] == "/ui/integrations"
    info = (await store.maintenance())["wh"]
    assert info["mode"] == "maintenance" and before + 10800 <= info["ends_at"] <= time.time() + 10800
    status, page, _ = await client.get("/ui/integrations")
    assert "Test webhook: maintenance mode until" in page
    wh = row_of(page, "wh")
    ends = html.escape(datetime.fromtimestamp(info["ends_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    assert 'data-maintenance="maintenance"' in wh and ends in wh and 'data-maintenance-action="stop"' in wh
    assert f'href="/ui/groups/{info["group_id"]}"' in wh
    # The same title as the API gives, and the API sees the same state.
    [g] = await tocsin.groups(integration_id="wh")
    assert g["title"] == "Maintenance of Test webhook for 3h"
    status, body = await tocsin.api("GET", "integrations/wh/")
    assert body["maintenance_mode"] == "maintenance"
    # Starting again is refused, with the store's words.
    status, _, _ = await client.post(start, data={"_csrf": client.csrf, "mode": "debug", "duration": "3600"})
    status, page, _ = await client.get("/ui/integrations")
    assert 'class="flash error"' in page and "Already on maintenance" in page
    assert (await store.maintenance())["wh"]["mode"] == "maintenance"
    # The maintenance group's page says what it is.
    status, page, _ = await client.get(f"/ui/groups/{info['group_id']}")
    assert status == 200 and 'id="group-maintenance"' in page and 'data-event="maintenance_started"' in page

    stop = "/ui/integrations/wh/maintenance/stop"
    status, _, _ = await client.post(stop, data={})
    assert status == 403 and "wh" in (await store.maintenance())
    status, _, headers = await client.post(stop, data={"_csrf": client.csrf})
    assert status == 303 and "wh" not in (await store.maintenance())
    status, page, _ = await client.get("/ui/integrations")
    assert "Test webhook: maintenance stopped. 1 alert group resolved." in page
    assert 'data-maintenance=""' in row_of(page, "wh")
    status, _, _ = await client.post(stop, data={"_csrf": client.csrf})
    status, page, _ = await client.get("/ui/integrations")
    assert 'class="flash error"' in page and "Integration is not under maintenance" in page
    # Debug mode through the header form of the CSRF token too; an unknown integration is a 404.
    status, _, _ = await client.post("/ui/integrations/am/maintenance/start", headers={"X-CSRF-Token": client.csrf},
                                     data={"mode": "debug", "duration": "86400"})
    am = (await store.maintenance())["am"]
    assert status == 303 and am["mode"] == "debug" and am["group_id"] is None
    status, _, _ = await client.post("/ui/integrations/nope/maintenance/stop", data={"_csrf": client.csrf})
    assert status == 404


# -- a group's timeline, escalation and notifications (issue 5) ------------------------

def paged_config(url: str) -> str:
    return f"""
[[integrations]]
id = "pg"
name = "Paged"
kind = "webhook"
token = "tok-paged-ui-0001"
[integrations.templates]
title = "{{{{ payload.title }}}}"
[[integrations.routes]]
id = "critical"
escalation = "page-ops"

[[notifiers]]
name = "ops-hook"
kind = "webhook"
url = "{url}"
timeout = 2
events = ["acknowledged"]

[[escalations]]
name = "page-ops"
steps = [ {{ notify = ["ops-hook"] }}, {{ wait = "1h" }}, {{ notify = ["ops-hook"] }} ]
"""


@pytest.fixture
async def hook():
    """A notifier's receiver whose first answer is a 500 with markup in its body, then 200s."""
    seen = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.json())
        if len(seen) == 1:
            return web.Response(status=500, text=XSS + " <b>boom</b>")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", seen
    await runner.cleanup()


async def wait_for(predicate, seconds: float = 15.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return await predicate()


async def test_group_page_shows_timeline_escalation_and_notifications(start_tocsin, hook):
    url, seen = hook
    h = await start_tocsin(extra_integrations=paged_config(url))
    status, body = await h.post("pg", {"title": "db down " + XSS}, kind="webhook", token="tok-paged-ui-0001")
    assert status == 200, body
    gid = body["alert_group_id"]
    store = h.daemon.current().store

    async def sent():
        return [n["state"] for n in await store.notifications_of(gid)] == ["sent"]

    assert await wait_for(sent), await store.notifications_of(gid)
    b = Browser(h)
    try:
        await b.login()
        status, page, _ = await b.get(f"/ui/groups/{gid}")
        assert status == 200
        # The notifier's answer is shown as text, never as markup.
        assert "<script>alert" not in page and "<b>boom" not in page
        assert "HTTP 500: &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &lt;b&gt;boom&lt;/b&gt;" in page
        timeline = re.search(r'<ol class="timeline" id="timeline">(.*?)</ol>', page, re.S).group(1)
        assert "created</strong> — from Paged, route critical" in timeline
        assert "step 1: notify ops-hook" in timeline and "step 2: wait 1 h" in timeline
        retrying = re.search(r'<li data-event="notification" data-outcome="retrying">(.*?)</li>', timeline, re.S).group(1)
        assert "ops-hook (triggered), attempt 1: failed, will retry" in retrying
        assert re.search(r"next attempt \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", retrying)
        assert 'data-outcome="sent"' in timeline and "attempt 2: sent" in timeline
        escalation = re.search(r'<dl class="escalation" id="escalation" data-state="running">(.*?)</dl>',
                               page, re.S).group(1)
        assert "<strong>page-ops</strong>" in escalation and "3 steps" in escalation and "next: step 3" in escalation
        due = (await store.escalation_of(gid))["due_at"]
        assert datetime.fromtimestamp(due, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") in escalation
        notifications = re.search(r'<table class="notifications cards" id="notifications">(.*?)</table>', page, re.S).group(1)
        assert "ops-hook" in notifications and "nstate-sent" in notifications
        assert '<td data-label="Attempts">2</td>' in notifications

        # Acknowledge here: the change, who made it, the stopped escalation, the "acknowledged" notification.
        status, _, _ = await b.post(f"/ui/groups/{gid}/acknowledge", data={"_csrf": b.csrf})
        assert status == 303

        async def told():
            return [n["state"] for n in await store.notifications_of(gid)] == ["sent", "sent"]

        assert await wait_for(told), await store.notifications_of(gid)
        status, page, _ = await b.get(f"/ui/groups/{gid}")
        assert "acknowledged</strong> — by user" in page and 'data-state="stopped"' in page
        assert "ops-hook (acknowledged), attempt 1: sent" in page
        # The page and the REST timeline tell the same story, in the same order.
        status, api = await h.api("GET", f"alert_groups/{gid}/timeline/")
        assert status == 200
        shown = re.findall(r'<li data-event="([a-z_]+)"', page)
        assert shown == [e["event"] for e in api["results"]]
        assert api["results"][0] == {"at": api["results"][0]["at"], "event": "created",
                                     "detail": {"integration_id": "pg", "route_id": "critical"}}
        assert api["escalation"]["state"] == "stopped" and len(api["notifications"]) == 2
    finally:
        await b.close()


# -- template editor --------------------------------------------------------------------


async def test_preview_counts_groups_and_shows_compile_errors(tocsin, client):
    for n in range(5):
        await new_group(tocsin, service="api" if n < 3 else "db", n=n)
    await client.login()
    async def preview(templates, payload='{"service": "api", "url": "https://x.example/1"}'):
        status, body, _ = await client.post("/ui/api/integrations/wh/preview", headers={"X-CSRF-Token": client.csrf},
                                            json={"templates": templates, "payload": payload})
        assert status == 200, body
        return json.loads(body)
    out = await preview({"grouping_id": "{{ payload.service }}", "title": "{{ payload.service | upper }}"})
    assert out["grouping_id"] == "api" and out["title"] == "API" and out["source_link"] == "https://x.example/1"
    assert out["groups"] == {"alerts": 5, "evaluated": 5, "current": 5, "edited": 2}
    out = await preview({"grouping_id": "{{ payload.service", "title": ""})
    assert "grouping_id" in out["compile_errors"] and out["title"] == "Incident"  # empty: the kind's default
    assert out["groups"]["edited"] == 5  # the running template stands in for one that does not compile
    out = await preview({}, payload="{not json")
    assert out["payload_error"].startswith("the payload is not JSON")
    status, body, _ = await client.get("/ui/api/integrations/wh/payload")
    assert json.loads(body)["payload"]  # the kind's example


async def test_save_shows_toml_and_writes_the_config(tocsin, client):
    path = tocsin.config_path
    path.write_text("# my precious comment\n" + path.read_text().replace(
        'id = "wh"', 'id = "wh" # the webhook one'))
    await client.login()
    status, page, _ = await client.get("/ui/integrations/wh/templates")
    digest = re.search(r'name="config_digest" value="([0-9a-f]+)"', page).group(1)
    assert 'id="write-config"' in page
    grouping = '{{ payload["service"] }}\n{# it\'s """ here #}'
    form = {"_csrf": client.csrf, "config_digest": digest, "tpl_grouping_id": grouping.replace("\n", "\r\n"),
            "tpl_title": "Incident"}  # the default: no override needed
    status, page, _ = await client.post("/ui/integrations/wh/templates", data={**form, "action": "toml"})
    assert status == 200
    block = re.search(r'<pre id="toml-block">(.*?)</pre>', page, re.S).group(1)
    parsed = tomllib.loads(html.unescape(block))
    assert parsed == {"integrations": {"templates": {"grouping_id": grouping}}}
    assert path.read_text().startswith("# my precious comment")  # "show" writes nothing

    status, page, _ = await client.post("/ui/integrations/wh/templates", data={**form, "action": "write"})
    assert status == 200 and "reloaded" in page, page
    text = path.read_text()
    assert "# my precious comment" in text and "# the webhook one" in text
    assert tocsin.daemon.current().by_id("wh").overrides == {"grouping_id": grouping}
    a, b = await new_group(tocsin, service="api", n=1), await new_group(tocsin, service="api", n=2)
    assert a == b  # the new grouping template runs

    # The file changed since the editor opened (that digest is stale now): nothing is written.
    status, page, _ = await client.post("/ui/integrations/wh/templates",
                                        data={**form, "tpl_grouping_id": "{{ 1 }}", "action": "write"})
    assert status == 409 and "changed since" in page and "{{ 1 }}" not in path.read_text()
    # A template that does not compile is shown inline, and nothing is written.
    status, page, _ = await client.post("/ui/integrations/wh/templates",
                                        data={**form, "config_digest": "", "tpl_title": "{% if %}", "action": "write"})
    assert status == 400 and "{% if %}" not in path.read_text()
    assert re.search(r'data-error-for="title">[^<]+<', page)


async def test_without_a_writable_config_the_editor_offers_the_block_only(tocsin, client):
    # (Permissions do not bind root, so the file goes away instead of becoming read-only.)
    tocsin.config_path.rename(tocsin.config_path.with_suffix(".away"))
    await client.login()
    status, page, _ = await client.get("/ui/integrations/wh/templates")
    assert status == 200 and 'id="write-config"' not in page and "is not writable" in page
    status, page, _ = await client.post("/ui/integrations/wh/templates",
                                        data={"_csrf": client.csrf, "tpl_title": "T", "action": "toml"})
    assert status == 200 and "title = &#39;T&#39;" in page


@pytest.mark.parametrize("text", [
    "plain", "it's", 'say "hi"', "back\\slash", "a\nb", "'''x'''\n\"\"\"y\"\"\"", "\nleading newline",
    "tab\tand \x01 control", "trailing quote'", "{{ payload | regex_replace('\\\\d+', '') }}",
])
def test_toml_strings_round_trip(text):
    block = toml_block("wh", {"title": text})
    assert tomllib.loads(block)["integrations"]["templates"]["title"] == text
    assert toml_string(text).value == text


def test_rewrite_keeps_comments_and_removes_emptied_tables(tmp_path):
    original = (ROOT / "config.toml").read_text()
    new = rewrite(original, "legacy-mail", {"title": "{{ payload.subject }}"})
    assert "# Group a problem with its recovery" not in tomllib.loads(new) and "# tocsin example configuration" in new
    entry = next(i for i in tomllib.loads(new)["integrations"] if i["id"] == "legacy-mail")
    assert entry["templates"] == {"title": "{{ payload.subject }}"}
    new = rewrite(original, "scripts", {"message": "m"})
    entry = next(i for i in tomllib.loads(new)["integrations"] if i["id"] == "scripts")
    assert entry["templates"] == {"message": "m"} and tomllib.loads(new)["api"] == {"tokens": ["change-me"]}
    new = rewrite(original, "legacy-mail", {})
    assert "templates" not in next(i for i in tomllib.loads(new)["integrations"] if i["id"] == "legacy-mail")
    with pytest.raises(EditError):
        rewrite(original, "nope", {"title": "x"})
    path = tmp_path / "c.toml"
    path.write_text(original)
    with pytest.raises(EditError, match="changed since"):
        write_templates(path, "scripts", {"title": "x"}, expected="0" * 64)
    with pytest.raises(EditError):
        write_templates(path, "scripts", {"title": "{{ nope"}, expected=None)
    assert path.read_text() == original


# -- in a real browser ------------------------------------------------------------------


@pytest.fixture
async def chromium():
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    try:
        from playwright.async_api import async_playwright
        from playwright.async_api import expect as playwright_expect
    except ImportError:
        require(False, "the playwright package is missing: `make test` installs the test extras")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    playwright_expect.set_options(timeout=10_000)
    async with async_playwright() as p:
        browser = await asyncio.wait_for(
            p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000), 40)
        try:
            yield browser
        finally:
            await browser.close()


def expect(target):
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(target)


async def browser_page(chromium, base: str, *, clipboard: bool = False):
    context = await chromium.new_context(viewport={"width": 1400, "height": 900})
    if clipboard:
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    return page


async def log_in(page, base: str, path: str, shot: str | None = None):
    await page.goto(base + path)
    assert "/ui/login" in page.url
    await page.fill("#token", API_TOKEN)
    if shot:
        await page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    await page.click("button[type=submit].primary")
    await page.wait_for_url(f"**{path}")


async def test_browser_login_copy_an_integration_url_and_maintenance(tocsin, chromium):
    await new_group(tocsin)
    page = await browser_page(chromium, tocsin.base, clipboard=True)
    await page.goto(tocsin.base + "/ui/login")
    await page.fill("#token", "wrong")
    await page.click("button[type=submit].primary")
    await page.wait_for_selector("#login-error")
    await log_in(page, tocsin.base, "/ui/integrations", shot="ui-login.png")
    button = page.locator('tr[data-integration="wh"] button[data-copy]').first
    await button.click()
    await expect(button).to_have_text("Copied")
    copied = await page.evaluate("navigator.clipboard.readText()")
    assert copied == f"http://127.0.0.1:8080/integrations/v1/webhook/{TOKEN['wh']}/"
    await page.screenshot(path=str(ARTIFACTS / "ui-integrations.png"), full_page=True)
    # Start maintenance on the webhook integration, see it, open its group, stop it.
    row = page.locator('tr[data-integration="wh"]')
    await expect(row.locator("td.maintenance")).to_have_attribute("data-maintenance", "")
    await row.locator('select[name="mode"]').select_option("maintenance")
    await row.locator('select[name="duration"]').select_option(label="6 hours")
    await row.locator('button[data-maintenance-action="start"]').click()
    await expect(page.locator("#flash")).to_contain_text("Test webhook: maintenance mode until")
    row = page.locator('tr[data-integration="wh"]')
    await expect(row.locator("td.maintenance")).to_have_attribute("data-maintenance", "maintenance")
    await expect(row.locator("td.maintenance")).to_contain_text("UTC")
    info = (await tocsin.daemon.current().store.maintenance())["wh"]
    assert info["mode"] == "maintenance" and 21590 < info["ends_at"] - time.time() <= 21600
    await page.screenshot(path=str(ARTIFACTS / "ui-integrations-maintenance.png"), full_page=True)
    # Starting it twice (from a stale page in another tab) shows the refusal.
    other = await page.context.new_page()
    await other.goto(tocsin.base + "/ui/integrations")
    await other.locator('tr[data-integration="am"] button[data-maintenance-action="start"]').click()
    await expect(other.locator("#flash")).to_contain_text("Test alertmanager: debug mode until")
    await page.locator('tr[data-integration="am"] button[data-maintenance-action="start"]').click()
    await expect(page.locator("#flash.error")).to_have_text("Test alertmanager: Already on maintenance")
    await other.close()
    await page.locator('tr[data-integration="wh"] td.maintenance a').click()
    await expect(page.locator('#timeline li[data-event="maintenance_started"]')).to_be_visible()
    await page.screenshot(path=str(ARTIFACTS / "ui-group-maintenance.png"), full_page=True)
    await page.go_back()
    await page.locator('tr[data-integration="wh"] button[data-maintenance-action="stop"]').click()
    await expect(page.locator("#flash")).to_have_text(
        "Test webhook: maintenance stopped. 1 alert group resolved.")
    row = page.locator('tr[data-integration="wh"]')
    await expect(row.locator("td.maintenance")).to_have_attribute("data-maintenance", "")
    await expect(row.locator('button[data-maintenance-action="start"]')).to_be_visible()
    assert "wh" not in (await tocsin.daemon.current().store.maintenance())


async def test_browser_editing_the_grouping_template_changes_the_preview(tocsin, chromium):
    for n in range(4):
        await new_group(tocsin, service="api", n=n)
    page = await browser_page(chromium, tocsin.base)
    await log_in(page, tocsin.base, "/ui/integrations/wh/templates")
    await expect(page.locator('[data-out="groups"]')).to_contain_text("form 4")
    before = await page.text_content('[data-out="grouping_id"]')
    assert '"service": "api"' in before or "'service': 'api'" in before
    await page.fill("#tpl-grouping_id", "{{ payload.service }}-{{ payload.n }}")
    await expect(page.locator('[data-out="grouping_id"]')).to_have_text("api-3")
    await page.fill("#tpl-grouping_id", "{{ payload.service }}")
    await expect(page.locator('[data-out="grouping_id"]')).to_have_text("api")
    await expect(page.locator('[data-out="groups"]')).to_contain_text(
        "form 4 groups with the current grouping id, 1 with the edited one")
    await page.fill("#tpl-title", "{% if %}")
    await expect(page.locator('[data-error-for="title"]')).to_contain_text("Does not compile")
    await page.fill("#tpl-title", "{{ payload.service | upper }} down")
    await expect(page.locator('[data-out="title"]')).to_have_text("API down")
    await page.click("button[value=toml]")
    await page.wait_for_selector("#toml-block")
    assert "grouping_id = '{{ payload.service }}'" in await page.text_content("#toml-block")
    await page.screenshot(path=str(ARTIFACTS / "ui-editor.png"), full_page=True)


async def test_browser_acknowledge_a_group(tocsin, chromium):
    gid = await new_group(tocsin, title="disk full")
    page = await browser_page(chromium, tocsin.base)
    await log_in(page, tocsin.base, "/ui/groups")
    row = page.locator(f'tr[data-group="{gid}"]')
    assert (await row.locator("[data-state]").text_content()) == "new"
    await row.locator('button[data-action="acknowledge"]').click()
    await page.wait_for_selector("#flash")
    assert (await page.locator(f'tr[data-group="{gid}"] [data-state]').text_content()) == "acknowledged"
    assert (await tocsin.groups())[0]["state"] == "acknowledged"
    await page.screenshot(path=str(ARTIFACTS / "ui-groups.png"), full_page=True)
    # The list refreshes itself: an action elsewhere (the API) shows up without a reload.
    status, _ = await tocsin.api("POST", f"alert_groups/{gid}/resolve")
    assert status == 200
    await expect(page.locator(f'tr[data-group="{gid}"] [data-state]')).to_have_text("resolved", timeout=15_000)
    await page.click(f'tr[data-group="{gid}"] td.title a')
    await page.wait_for_selector("#group-state")
    assert await page.text_content("#group-state") == "resolved"
    await page.screenshot(path=str(ARTIFACTS / "ui-group.png"), full_page=True)


async def test_browser_group_page_timeline(start_tocsin, chromium, hook):
    url, _ = hook
    h = await start_tocsin(extra_integrations=paged_config(url))
    status, body = await h.post("pg", {"title": "db down"}, kind="webhook", token="tok-paged-ui-0001")
    gid = body["alert_group_id"]
    page = await browser_page(chromium, h.base)
    await log_in(page, h.base, f"/ui/groups/{gid}")
    # The delivery fails once, then is retried: a reload shows both attempts.
    for _ in range(60):
        if await page.locator('#timeline li[data-outcome="sent"]').count():
            break
        await asyncio.sleep(0.25)
        await page.reload()
    await expect(page.locator('#timeline li[data-outcome="retrying"] code.notifier-detail')).to_have_text(
        "HTTP 500: " + XSS + " <b>boom</b>")
    await expect(page.locator("#escalation")).to_have_attribute("data-state", "running")
    await page.screenshot(path=str(ARTIFACTS / "ui-group-escalation.png"), full_page=True)
    await page.click('button[data-action="acknowledge"]')
    await expect(page.locator("#escalation")).to_have_attribute("data-state", "stopped")
    await expect(page.locator('#timeline li[data-event="acknowledged"]')).to_contain_text("by user")


# -- issue 14: labels, search, bulk, explanations, Markdown, demo, path prefix, throttle ----

ONCALL = """
[[integrations]]
id = "ops"
name = "Ops webhook"
kind = "webhook"
token = "tok-ops-ui-00001"
[integrations.templates]
grouping_id = "{{ payload.labels.alertname }}/{{ payload.labels.instance }}"
title = "{{ payload.title }}"
message = "{{ payload.body }}"
[[integrations.routes]]
id = "critical"
condition = "{{ payload.labels.severity == 'critical' }}"
escalation = "page-ops"
[[integrations.routes]]
id = "db"
regex = "postgres"
escalation = "page-ops"

[[notifiers]]
name = "ops-hook"
kind = "webhook"
url = "http://127.0.0.1:9/never"
timeout = 1

[[escalations]]
name = "page-ops"
steps = [ { wait = "1h" }, { notify = ["ops-hook"] }, { resolve = true } ]
"""
MARKDOWN = ("**Disk** is _full_ on `db-1`\n\n- [runbook](https://runbooks.example/disk)\n- [bad](javascript:alert(1))\n\n"
            "![graph](https://pixels.example/track.gif)\n\n<script>window.__xss = 1</script>"
            "<img src=x onerror=\"window.__xss = 2\">")


async def ops_alert(h, title: str, **labels) -> str:
    labels = {"alertname": "DiskFull", "instance": title, "severity": "warning", **labels}
    status, body = await h.post("ops", {"title": title, "body": MARKDOWN, "labels": labels},
                                kind="webhook", token="tok-ops-ui-00001")
    assert status == 200, body
    return body["alert_group_id"]


@pytest.fixture
async def ops(start_tocsin):
    return await start_tocsin(extra_integrations=ONCALL)


@pytest.fixture
async def ops_client(ops):
    b = Browser(ops)
    await b.login()
    yield b
    await b.close()


def ids_on(page: str) -> list[str]:
    return re.findall(r'<tr data-group="([^"]+)"', page)


async def test_search_and_label_filter_are_deep_links(ops, ops_client):
    a = await ops_alert(ops, "disk full on db-1", team="storage")
    b = await ops_alert(ops, "disk full on web-2", team="web")
    c = await ops_alert(ops, "CPU hot on db-1", alertname="CpuHot", team="storage")
    await new_group(ops)  # a webhook without labels
    client = ops_client
    status, page, _ = await client.get("/ui/groups?q=DISK+full")
    assert status == 200 and sorted(ids_on(page)) == sorted([a, b])  # any case, anywhere in the title
    status, page, _ = await client.get("/ui/groups?label=team%3Dstorage")
    assert sorted(ids_on(page)) == sorted([a, c]) and "2 groups" in page
    # Filters combine, and the page's links (chips, pager, refresh) keep every one of them.
    status, page, _ = await client.get("/ui/groups?q=db-1&label=team%3Dstorage&label=alertname%3DCpuHot")
    assert ids_on(page) == [c]
    refresh = html.unescape(re.search(r'data-refresh="([^"]*)"', page).group(1))
    assert "q=db-1" in refresh and "label=team%3Dstorage" in refresh and "label=alertname%3DCpuHot" in refresh
    status, body, _ = await client.get(refresh)
    data = json.loads(body)
    assert [g["id"] for g in data["results"]] == [c]
    assert {"key": {"id": "team", "name": "team"}, "value": {"id": "storage", "name": "storage"}} in data["results"][0]["labels"]
    # A chip removes its own filter only.
    chip = re.search(r'<a class="chip on" href="([^"]*)" title="Remove this filter" data-filter="label">alertname=CpuHot',
                     page).group(1)
    status, page, _ = await client.get(html.unescape(chip))
    assert sorted(ids_on(page)) == sorted([a, c])  # q=db-1 and team=storage are still on
    status, page, _ = await client.get("/ui/groups?label=team%3Dstorage")
    # A group's labels are links that add a filter.
    assert 'data-label="team=storage"' in page and 'data-label="severity=warning"' in page
    # Bad input is named, never a crash; a search too short for the index says so.
    status, page, _ = await client.get("/ui/groups?label=nokey&q=ab")
    assert status == 200 and "is not a label filter" in page and "3 characters or more" in page
    status, page, _ = await client.get('/ui/groups?q=%22%29+OR+1%3D1+--')
    assert status == 200 and "0 groups" in page


async def test_bulk_acknowledge_uses_the_single_action(ops, ops_client):
    ids = [await ops_alert(ops, f"host {n}") for n in range(3)]
    done = ids[2]
    await ops_client.post(f"/ui/groups/{done}/resolve", data={"_csrf": ops_client.csrf})
    status, page, _ = await ops_client.post("/ui/groups/bulk", data={"action": "acknowledge", "group": ids[0]})
    assert status == 403  # CSRF, as every form
    status, _, headers = await ops_client.post("/ui/groups/bulk", data=[
        ("_csrf", ops_client.csrf), ("action", "acknowledge"), ("next", "/ui/groups?label=severity%3Dwarning"),
        *[("group", i) for i in ids]])
    assert status == 303 and headers["Location"] == "/ui/groups?label=severity%3Dwarning"
    status, page, _ = await ops_client.get(headers["Location"])
    assert "2 alert groups acknowledged. 1 refused:" in page and "Can&#39;t acknowledge a resolved alert group" in page
    states = {g["id"]: g["state"] for g in await ops.groups()}
    assert states == {ids[0]: "acknowledged", ids[1]: "acknowledged", done: "resolved"}
    status, api = await ops.api("GET", f"alert_groups/{ids[0]}/timeline/")
    assert any(e["event"] == "acknowledged" and e["detail"] == {"by": "user"} for e in api["results"])
    # Silence needs a delay (lifecycle's words, as the API and CLI say them); nothing selected,
    # or an unknown action, is refused plainly.
    for form, text in (([("action", "silence"), ("group", ids[0])], "silence needs a delay"),
                       ([("action", "acknowledge")], "Select one or more alert groups first."),
                       ([("action", "delete"), ("group", ids[0])], "Choose acknowledge, resolve or silence.")):
        status, _, headers = await ops_client.post("/ui/groups/bulk", data=[("_csrf", ops_client.csrf), *form])
        status, page, _ = await ops_client.get(headers["Location"])
        assert text in page
    status, _, _ = await ops_client.post("/ui/groups/bulk", data=[
        ("_csrf", ops_client.csrf), ("action", "resolve"), *[("group", i) for i in ids[:2]]])
    assert {g["state"] for g in await ops.groups()} == {"resolved"}


async def test_group_page_explains_grouping_route_and_chain(ops, ops_client):
    gid = await ops_alert(ops, "db-1", severity="critical")
    again = await ops_alert(ops, "db-1", severity="critical")
    assert again == gid
    status, page, _ = await ops_client.get(f"/ui/groups/{gid}")
    assert status == 200
    grouping = re.search(r'<dl class="facts" id="grouping">(.*?)</dl>', page, re.S).group(1)
    assert '<pre class="gid-text" id="grouping-id">DiskFull/db-1</pre>' in grouping
    [g] = await ops.groups()
    assert f'<code id="grouping-key">{g["grouping_key"]}</code>' in grouping
    assert "<strong>critical</strong> (route 1 of 3)" in grouping
    assert "matched its condition <code class=\"rule\" id=\"route-rule\">{{ payload.labels.severity == &#39;critical&#39; }}</code>" in grouping
    assert "team" not in grouping and "severity=critical" in grouping
    chain = re.search(r'<ol class="chain" id="chain">(.*?)</ol>', page, re.S).group(1)
    # Where the escalation stands: what ran is done, one step is next (the engine may have run the wait already).
    statuses = ",".join(re.findall(r'data-step-status="([a-z ]+)"', chain))
    assert statuses in ("next,to come,to come", "done,next,to come"), statuses
    assert "wait 1 h" in chain and "notify ops-hook" in chain and "resolve the group" in chain
    # The regex route, and the default route, say so too.
    status, body = await ops.post("ops", {"title": "pg", "body": "", "labels": {"alertname": "x", "instance": "postgres-1"}},
                                  kind="webhook", token="tok-ops-ui-00001")
    status, page, _ = await ops_client.get(f"/ui/groups/{body['alert_group_id']}")
    assert "<strong>db</strong> (route 2 of 3)" in page and "matched its regex" in page and "after the 1 route above did not" in page
    gid = await ops_alert(ops, "web-1")
    status, page, _ = await ops_client.get(f"/ui/groups/{gid}")
    assert "<strong>ops-default</strong> (route 3 of 3)" in page and "the default route: no route above it matched" in page
    # The config changed since (the route is gone): the page says so instead of failing.
    critical = await ops_alert(ops, "db-9", severity="critical")
    ops.config_path.write_text(ops.config_path.read_text().replace('id = "critical"', 'id = "urgent"'))
    assert ops.daemon.reload(ops.config_path)
    status, page, _ = await ops_client.get(f"/ui/groups/{critical}")
    assert status == 200 and "<code>critical</code> <span class=\"muted\">(no longer in the config)</span>" in page
    assert "The newest alert would take route <code>urgent</code>" in page


async def test_messages_are_markdown_sanitized_and_images_wait_for_a_click(ops, ops_client):
    gid = await ops_alert(ops, "db-1")
    status, page, _ = await ops_client.get(f"/ui/groups/{gid}")
    message = re.search(r'<div class="message md">(.*?)</div>', page, re.S).group(1)
    assert "<strong>Disk</strong> is <em>full</em> on <code>db-1</code>" in message
    assert '<a href="https://runbooks.example/disk" rel="noopener noreferrer nofollow">runbook</a>' in message
    assert 'href="javascript:' not in message and "<script" not in message and "__xss" not in message
    assert "[bad](javascript:alert(1))" in message  # an unsafe link stays text
    assert "<img" not in message and "onerror" not in message
    # The image is a link that shows it on a click; nothing loads it by itself.
    assert 'class="md-image" data-image="https://pixels.example/track.gif"' in message
    assert 'src="https://pixels.example' not in page


async def test_integration_page_lists_routes_and_sends_a_demo_alert(ops, ops_client):
    status, page, _ = await ops_client.get("/ui/integrations/ops")
    assert status == 200
    routes = re.search(r'<ol class="routes" id="routes">(.*?)</ol>', page, re.S).group(1)
    assert re.findall(r'data-route="([^"]+)"', routes) == ["critical", "db", "ops-default"]
    assert "regex <code class=\"rule\">postgres</code>" in routes and "default: everything" in routes
    assert 'data-chain="page-ops"' in page and "notify ops-hook" in page
    assert "http://127.0.0.1:8080/integrations/v1/webhook/tok-ops-ui-00001/" in page
    status, _, _ = await ops_client.post("/ui/integrations/ops/demo", data={})
    assert status == 403 and await ops.groups() == []
    status, _, headers = await ops_client.post("/ui/integrations/wh/demo", data={"_csrf": ops_client.csrf})
    assert status == 303 and headers["Location"].startswith("/ui/groups/I")
    [g] = await ops.groups()
    assert headers["Location"] == f"/ui/groups/{g['id']}"
    status, page, _ = await ops_client.get(headers["Location"])
    assert "Demo alert sent to Test webhook" in page
    status, alerts = await ops.api("GET", f"alerts/?alert_group_id={g['id']}")
    assert alerts["results"][0]["payload"] == tocsin_example("wh", ops)
    # Demo alerts never group, as `tocsin demo`'s: a second one makes a second group.
    await ops_client.post("/ui/integrations/wh/demo", data={"_csrf": ops_client.csrf})
    assert len(await ops.groups()) == 2
    assert (await ops_client.post("/ui/integrations/nope/demo", data={"_csrf": ops_client.csrf}))[0] == 404


def tocsin_example(iid: str, h) -> dict:
    return h.daemon.current().by_id(iid).kind.example_payload_copy()


async def test_labels_and_titles_of_existing_groups_are_indexed_by_the_migration(tmp_path):
    import sqlite3

    from store.schema import MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:3]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 3")
    body = {"commonLabels": {"alertname": "Down", "job": "api"}, "labels": {"n": 1, "ok": True, "nested": {}}}
    rows = [("I1", "old alert about postgres", json.dumps(body)), ("I2", None, "not json {")]
    for n, (gid, title, payload) in enumerate(rows, start=1):
        db.execute("INSERT INTO alert_groups (seq, id, integration_id, grouping_key, state, title, alerts_count,"
                   " created_at, last_alert_id) VALUES (?, ?, 'wh', ?, 'new', ?, 1, 0, ?)", (n, gid, f"k{n}", title, f"A{n}"))
        db.execute("INSERT INTO alerts (id, alert_group_id, integration_id, created_at, source, payload)"
                   " VALUES (?, ?, 'wh', 0, 'http', ?)", (f"A{n}", gid, payload))
    db.commit()
    db.close()
    from grouping import rules
    from store import SqliteStore

    store = SqliteStore(path, rules=rules)
    await store.open()
    try:
        count, groups = await store.list_groups(text="POSTGRES")
        assert [g.id for g in groups] == ["I1"] and groups[0].grouping_id is None
        count, groups = await store.list_groups(labels=(("job", "api"), ("n", "1")))
        assert count == 1 and groups[0].id == "I1"
        assert await store.labels_of([1, 2]) == {1: [("alertname", "Down"), ("job", "api"), ("n", "1")]}
    finally:
        await store.close()


async def test_pruned_groups_leave_no_labels_or_titles(ops):
    gid = await ops_alert(ops, "gone soon", team="tmp")
    store = ops.daemon.current().store
    await store.act(gid, "resolve")
    assert await store.prune(time.time() + 1) == 1
    assert (await store.list_groups(labels=(("team", "tmp"),)))[0] == 0
    assert (await store._fetch("SELECT count(*) FROM group_labels"))[0][0] == 0
    assert (await store.list_groups(text="gone soon"))[0] == 0


class PrefixProxy:
    """A reverse proxy on 127.0.0.1 that serves tocsin under /tocsin (stripping it), like nginx's
    `location /tocsin/ { proxy_pass http://tocsin/; }`."""

    def __init__(self, upstream: str, prefix: str = "/tocsin"):
        self.upstream, self.prefix = upstream, prefix
        self.runner = None
        self.base = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith(self.prefix + "/"):
            return web.Response(status=404, text="outside the prefix")
        url = self.upstream + request.raw_path[len(self.prefix):]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as s:
            async with s.request(request.method, url, headers=headers, data=await request.read(),
                                 allow_redirects=False) as r:
                out = web.Response(status=r.status, body=await r.read())
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "date", "server"):
                        out.headers.add(k, v)
                return out

    async def start(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self):
        await self.runner.cleanup()


async def test_the_ui_works_under_a_path_prefix(start_tocsin, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, extra_integrations=ONCALL).replace(
        '"http://127.0.0.1:8080"', '"http://127.0.0.1:8080/tocsin/"'))
    h = await start_tocsin(path)
    gid = await ops_alert(h, "db-1")
    proxy = PrefixProxy(h.base)
    await proxy.start()
    b = Browser(h)
    b.base = proxy.base
    try:
        status, _, headers = await b.get("/tocsin/ui/groups?q=db-1")
        assert status == 303 and headers["Location"] == "/tocsin/ui/login?next=%2Fui%2Fgroups%3Fq%3Ddb-1"
        status, page, headers = await b.get("/tocsin/ui/login")
        assert "Path=/tocsin/ui" in headers["Set-Cookie"]
        nonce = re.search(r'name="_login" value="([^"]+)"', page).group(1)
        status, _, headers = await b.post("/tocsin/ui/login", data={"_login": nonce, "token": API_TOKEN,
                                                                    "next": "/ui/groups?q=db-1"})
        assert status == 303 and headers["Location"] == "/tocsin/ui/groups?q=db-1"
        cookie = next(c for c in headers.getall("Set-Cookie") if c.startswith("tocsin_session="))
        assert "Path=/tocsin/ui" in cookie
        pages = ["/tocsin/ui/groups?q=db-1&label=severity%3Dwarning", f"/tocsin/ui/groups/{gid}", "/tocsin/ui/integrations",
                 "/tocsin/ui/integrations/ops", "/tocsin/ui/integrations/ops/templates"]
        for p in pages:
            status, page, _ = await b.get(p)
            assert status == 200, (p, page[:300])
            # Every link, form action, script, stylesheet and refresh URL of ours carries the prefix.
            urls = re.findall(r'(?:href|src|action|data-refresh|data-preview-url|data-payload-url)="(/[^"]*)"', page)
            assert urls and all(u.startswith("/tocsin/ui/") for u in urls), (p, [u for u in urls if not u.startswith("/tocsin/")])
            for u in {html.unescape(u) for u in urls if "/static/" in u or "/api/groups" in u or "/payload" in u}:
                assert (await b.get(u))[0] == 200, u
        b.csrf = re.search(r'name="csrf-token" content="([^"]*)"', page).group(1)
        status, _, headers = await b.post(f"/tocsin/ui/groups/{gid}/acknowledge",
                                          data={"_csrf": b.csrf, "next": "/ui/groups?q=db-1"})
        assert status == 303 and headers["Location"] == "/tocsin/ui/groups?q=db-1"
        status, _, headers = await b.post("/tocsin/ui/integrations/ops/demo", data={"_csrf": b.csrf})
        assert status == 303 and headers["Location"].startswith("/tocsin/ui/groups/I")
        assert {g["state"] for g in await h.groups()} == {"acknowledged", "new"}
        status, _, headers = await b.post("/tocsin/ui/logout", data={"_csrf": b.csrf})
        assert status == 303 and headers["Location"] == "/tocsin/ui/login"
    finally:
        await b.close()
        await proxy.stop()


def test_login_throttle_is_per_source_and_bounded():
    from ui.auth import LoginThrottle, source_address

    t = LoginThrottle(step=0.25, max_wait=1.0, max_sources=3)
    assert t.failed("a", now=100) == 0.25
    assert t.failed("a", now=100) == 0.5  # the same address queues behind itself…
    assert t.failed("b", now=100) == 0.25  # …another does not
    assert t.failed("a", now=100) == 0.75 and t.failed("a", now=100) == 1.0
    assert t.failed("a", now=100) is None  # past max_wait: refused at once, not queued
    assert t.failed("a", now=102) == 0.25  # once the queue has drained
    for n in range(10):
        t.failed(f"x{n}", now=103)
    assert len(t) == 3  # bounded: the quietest addresses are forgotten first
    assert source_address("203.0.113.5", "198.51.100.1") == "203.0.113.5"  # a remote peer cannot pick its name
    assert source_address("127.0.0.1", "198.51.100.1, 192.0.2.7") == "192.0.2.7"  # a local proxy's last hop
    assert source_address("127.0.0.1", None) == "127.0.0.1"
    assert source_address("2001:db8:1:2:aaaa::1", None) == source_address("2001:db8:1:2:bbbb::9", None) == "2001:db8:1:2::/64"
    assert source_address("::ffff:192.0.2.7", None) == "192.0.2.7"


async def test_one_address_guessing_does_not_slow_another(tocsin):
    guesser, user = Browser(tocsin), Browser(tocsin)
    try:
        async def attempt(b: Browser, token: str, source: str):
            status, page, _ = await b.get("/ui/login")
            nonce = re.search(r'name="_login" value="([^"]+)"', page).group(1)
            return (await b.post("/ui/login", data={"_login": nonce, "token": token},
                                 headers={"X-Forwarded-For": source}))[0]

        # Eight wrong guesses from one address queue behind each other (0.25 s more each, 2 s in all)…
        guesses = [asyncio.create_task(attempt(guesser, f"guess-{n}", "203.0.113.9")) for n in range(8)]
        await asyncio.sleep(0.05)
        # …while a typo and then the right token from another address wait one step, or none:
        # behind a global throttle they would come after every guess.
        assert await asyncio.wait_for(attempt(user, "typo", "198.51.100.7"), 10) == 401
        assert sum(not g.done() for g in guesses) >= 4
        assert await asyncio.wait_for(attempt(user, API_TOKEN, "198.51.100.7"), 10) == 303
        assert sum(not g.done() for g in guesses) >= 3
        results = await asyncio.wait_for(asyncio.gather(*guesses), 20)
        assert results == [401] * 8
    finally:
        await guesser.close()
        await user.close()


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


async def fits(page, name: str) -> None:
    """No sideways scrolling: the document is no wider than the viewport as set (a mobile
    browser widens its layout viewport to the content, so innerWidth alone would not tell)."""
    width = page.viewport_size["width"]
    scroll, inner, wide = await page.evaluate("""(width) => [document.documentElement.scrollWidth, window.innerWidth,
        [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > width + 1)
          .slice(-4).map(e => e.tagName + '.' + e.className)]""", width)
    assert scroll <= width and inner <= width, (name, scroll, inner, wide)


async def every_page(page, base: str, size: str, gid: str) -> None:
    """Each page at this size: fits the viewport, and a screenshot under tests/artifacts/."""
    for name, path in (("groups", "/ui/groups"), ("group", f"/ui/groups/{gid}"), ("integrations", "/ui/integrations"),
                       ("integration", "/ui/integrations/ops"), ("editor", "/ui/integrations/ops/templates")):
        await page.goto(base + path)
        await fits(page, f"{size} {name}")
        await page.screenshot(path=str(ARTIFACTS / f"ui-{size}-{name}.png"), full_page=True)


async def test_browser_phone_and_desktop(ops, chromium):
    h = ops
    web2 = await ops_alert(h, "disk full on web-2", team="web")
    db3 = await ops_alert(h, "disk full on db-3", team="storage")
    db1 = await ops_alert(h, "disk full on db-1", team="storage", severity="critical")
    hook_group = await new_group(h, title="plain webhook")

    context = await chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    pixels = []

    async def pixel(route):
        pixels.append(route.request.url)
        await route.fulfill(status=200, content_type="image/gif",
                            body=bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000"
                                               "010001000002024401003b"))
    await page.route("https://pixels.example/**", pixel)
    await page.goto(h.base + "/ui/login")
    await fits(page, "phone login")
    await page.screenshot(path=str(ARTIFACTS / "ui-phone-login.png"), full_page=True)
    await log_in(page, h.base, "/ui/groups")

    # Acknowledge from the phone layout: the card's own button.
    card = page.locator(f'tr[data-group="{hook_group}"]')
    assert (await card.bounding_box())["width"] <= PHONE["width"]
    await card.locator('button[data-action="acknowledge"]').click()
    await expect(page.locator("#flash")).to_contain_text(f"Alert group {hook_group} acknowledged.")
    await expect(page.locator(f'tr[data-group="{hook_group}"] [data-state]')).to_have_text("acknowledged")

    # Search titles.
    await page.fill("#search", "WEB-2")
    await page.press("#search", "Enter")
    await page.wait_for_url("**q=WEB-2**")
    await expect(page.locator("tr[data-group]")).to_have_count(1)
    await expect(page.locator(f'tr[data-group="{web2}"]')).to_be_visible()
    await fits(page, "phone search")
    await page.screenshot(path=str(ARTIFACTS / "ui-phone-search.png"), full_page=True)

    # Filter by a label: a chip on a card is a link to the filtered view.
    await page.goto(h.base + "/ui/groups")
    await page.locator(f'tr[data-group="{db3}"] a.chip[data-label="team=storage"]').click()
    await page.wait_for_url("**label=team%3Dstorage**")
    await expect(page.locator("tr[data-group]")).to_have_count(2)
    await expect(page.locator("#active-filters")).to_contain_text("team=storage")

    # Bulk acknowledge what the filter shows; the filter stays.
    for gid in (db1, db3):
        await page.locator(f'tr[data-group="{gid}"] input[name="group"]').check()
    await expect(page.locator("#picked-count")).to_have_text("2")
    await fits(page, "phone label filter")
    await page.screenshot(path=str(ARTIFACTS / "ui-phone-label-filter.png"), full_page=True)
    await page.locator('button[data-bulk="acknowledge"]').click()
    await expect(page.locator("#flash")).to_have_text("2 alert groups acknowledged.")
    assert "label=team%3Dstorage" in page.url
    states = {g["id"]: g["state"] for g in await h.groups()}
    assert states[db1] == states[db3] == "acknowledged" and states[web2] == "new"

    # Auto-refresh survives an answer it cannot read, says it is stale, and recovers.
    await page.route("**/ui/api/groups**", lambda route: route.fulfill(status=200, body="<html>proxy error"))
    await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await expect(page.locator("#refresh-status")).to_have_attribute("data-stale", "true")
    await expect(page.locator("#refresh-status")).to_contain_text("unreadable answer")
    await page.unroute("**/ui/api/groups**")
    status, _ = await h.api("POST", f"alert_groups/{db3}/resolve")
    assert status == 200
    await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await expect(page.locator("#refresh-status")).to_have_attribute("data-stale", "false")
    await expect(page.locator(f'tr[data-group="{db3}"] [data-state]')).to_have_text("resolved")

    # The group page: Markdown rendered, its script inert, the image only on a click, the route explained.
    await page.goto(f"{h.base}/ui/groups/{db1}")
    message = page.locator("article.alert .md").first
    await expect(message.locator("strong")).to_have_text("Disk")
    await expect(message.locator('a[href="https://runbooks.example/disk"]')).to_have_text("runbook")
    assert await message.locator("script, img").count() == 0
    assert await page.evaluate("window.__xss === undefined")
    assert pixels == []
    await message.locator("a.md-image").click()
    await expect(message.locator("img.shown-image")).to_be_visible()
    assert pixels == ["https://pixels.example/track.gif"]
    await expect(page.locator("#route")).to_contain_text("critical")
    await expect(page.locator("#route-rule")).to_have_text("{{ payload.labels.severity == 'critical' }}")
    await expect(page.locator("#grouping-id")).to_have_text("DiskFull/disk full on db-1")
    # Acknowledged: the escalation stopped, nothing is next and the last step never comes.
    await expect(page.locator("#chain li")).to_have_count(3)
    assert await page.locator('#chain li[data-step-status="next"]').count() == 0
    await expect(page.locator("#chain li").nth(2)).to_have_attribute("data-step-status", "to come")
    await fits(page, "phone group")

    # A demo alert from the integration page.
    await page.goto(h.base + "/ui/integrations/ops")
    await page.click("#send-demo")
    await expect(page.locator("#flash")).to_contain_text("Demo alert sent to Ops webhook")
    await page.wait_for_selector("#group-state")
    demo = page.url.rsplit("/", 1)[1]
    status, alerts = await h.api("GET", f"alerts/?alert_group_id={demo}")
    assert status == 200 and alerts["count"] == 1

    await every_page(page, h.base, "phone", db1)
    await context.close()

    context = await chromium.new_context(viewport=DESKTOP)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    await page.goto(h.base + "/ui/login")
    await page.screenshot(path=str(ARTIFACTS / "ui-desktop-login.png"), full_page=True)
    await log_in(page, h.base, "/ui/groups?label=severity%3Dwarning")
    await expect(page.locator("tr[data-group]")).to_have_count(2)  # web-2, db-3 (the demo has no labels)
    # Dense on a desktop: a table row per group, not a card.
    assert await page.locator("table.groups thead").is_visible()
    await every_page(page, h.base, "desktop", db1)
    await context.close()
