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

from conftest import API_TOKEN, ROOT, TOKEN, config_text
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
                 "/ui/integrations/xss/templates", "/ui/api/groups"]
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
        notifications = re.search(r'<table class="notifications" id="notifications">(.*?)</table>', page, re.S).group(1)
        assert "ops-hook" in notifications and "nstate-sent" in notifications and "<td>2</td>" in notifications

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
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
        from playwright.async_api import expect as playwright_expect
    except ImportError:
        pytest.skip("the playwright package is missing (pip install playwright)")
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
