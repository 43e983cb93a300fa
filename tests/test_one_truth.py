"""One function per decision, whoever asks: `tocsin render`, the preview API and the UI
editor's preview give the same answer; `tocsin ack|resolve|…`, the API and the UI act
through the same lifecycle function (same checks, timeline and notifications); numbers
out of range are refused alike; a UI action's `next` never breaks its redirect."""
from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import sys
import time

import aiohttp
import pytest

from conftest import API_TOKEN, ROOT, integration, write_config, webhook_receiver
from grouping.kinds import KINDS
from grouping.lifecycle import MAINTENANCE_MAX, SILENCE_MAX
from grouping import rules
from store import NewAlert, SqliteStore

KIND_SLUGS = sorted(KINDS)
assert KIND_SLUGS, "no kinds to compare"
LIFECYCLE = ["acknowledged", "unacknowledged", "resolved", "unresolved", "silenced"]
WAIT = 15.0  # seconds any one wait in these tests may take at most


# -- helpers ---------------------------------------------------------------------------


async def cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`python -m daemon …` as a child process, without blocking the daemon's loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
    return proc.returncode, out.decode(), err.decode()


class UI:
    """A logged-in browser session on the UI (token login, then the CSRF token of a page)."""

    def __init__(self, base: str):
        self.base = base
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                             timeout=aiohttp.ClientTimeout(total=WAIT))
        self.csrf = ""

    async def login(self) -> None:
        async with self.session.get(f"{self.base}/ui/login") as r:
            nonce = re.search(r'name="_login" value="([^"]+)"', await r.text()).group(1)
        async with self.session.post(f"{self.base}/ui/login", allow_redirects=False,
                                     data={"_login": nonce, "token": API_TOKEN, "next": "/ui/groups"}) as r:
            assert r.status == 303, await r.text()
        async with self.session.get(f"{self.base}/ui/groups") as r:
            self.csrf = re.search(r'name="csrf-token" content="([^"]*)"', await r.text()).group(1)

    async def act(self, gid: str, action: str, **form) -> tuple[int, str]:
        data = {"_csrf": self.csrf, **form}
        async with self.session.post(f"{self.base}/ui/groups/{gid}/{action}", data=data, allow_redirects=False) as r:
            await r.read()
            return r.status, r.headers.get("Location", "")

    async def preview(self, iid: str, payload, templates: dict | None = None) -> dict:
        async with self.session.post(f"{self.base}/ui/api/integrations/{iid}/preview",
                                     json={"payload": json.dumps(payload), "templates": templates or {}},
                                     headers={"X-CSRF-Token": self.csrf}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def status_of(self, path: str) -> int:
        async with self.session.get(self.base + path, allow_redirects=False) as r:
            await r.read()
            return r.status

    async def close(self) -> None:
        await self.session.close()


async def until(predicate, seconds: float = WAIT) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(await predicate())


def one_per_kind() -> str:
    """An integration of every kind, each with a route that never matches and a named
    default route (a preview that loses the routes names another one)."""
    return "".join(
        integration(f"k-{slug}", slug, f"tok-one-truth-{slug}", name=f"One {slug}", rest=f"""
[[integrations.routes]]
id = "never-{slug}"
condition = '{{{{ false }}}}'
[[integrations.routes]]
id = "catchall-{slug}"
""")
        for slug in KIND_SLUGS)


def example(slug: str):
    """The kind's example payload; for a counting kind without numFiring, so the count is ours to add."""
    payload = KINDS[slug].example_payload_copy()
    if KINDS[slug].counts_alerts:
        payload.pop("numFiring", None)
        payload.pop("numResolved", None)
    return payload


# -- one preview ------------------------------------------------------------------------


@pytest.mark.parametrize("slug", KIND_SLUGS)
async def test_render_preview_api_and_editor_agree(start_tocsin, tmp_path, slug):
    h = await start_tocsin(extra_integrations=one_per_kind())
    iid, payload = f"k-{slug}", example(slug)
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    code, out, err = await cli("render", "-c", str(h.config_path), "--integration", iid, str(tmp_path / "payload.json"))
    assert code == 0, err
    rendered = json.loads(out)
    status, api = await h.api("POST", f"integrations/{iid}/preview/", {"payload": payload})
    assert status == 200, api
    ui = UI(h.base)
    try:
        await ui.login()
        editor = await ui.preview(iid, payload)
        edit = {"title": "Edited {{ integration_name }}"}
        status, api_edited = await h.api("POST", f"integrations/{iid}/preview/", {"payload": payload, "templates": edit})
        assert status == 200, api_edited
        editor_edited = await ui.preview(iid, payload, edit)
    finally:
        await ui.close()

    answers = [rendered, api, editor["rendered"], api_edited, editor_edited["rendered"]]
    for answer in answers:
        for r in answer if isinstance(answer, list) else [answer]:
            if not r["grouping_id"]:
                # No grouping id: the alert stands alone under a fresh random key, as in live traffic.
                assert re.fullmatch(r"[0-9a-f]{32}", r["grouping_key"])
                r["grouping_key"] = "fresh"
    assert rendered == api == editor["rendered"]
    assert api_edited == editor_edited["rendered"]
    results = rendered if isinstance(rendered, list) else [rendered]
    expected = KINDS[slug].splits_alerts and len(payload["alerts"]) or 1
    assert len(results) == expected
    for r in results:
        assert r["route"] == f"catchall-{slug}"  # the integration's own default route
    for r in (api_edited if isinstance(api_edited, list) else [api_edited]):
        assert r["title"] == f"Edited One {slug}" and r["route"] == f"catchall-{slug}"
    if KINDS[slug].counts_alerts:
        firing = sum(a.get("status") == "firing" for a in payload["alerts"])
        assert f"Firing alerts – {firing}" in results[0]["message"]  # numFiring was filled in, for all three


# -- one lifecycle path -----------------------------------------------------------------


@pytest.fixture
async def receiver():
    async with webhook_receiver() as rec:
        yield rec


def paged(url: str) -> str:
    """An integration whose alerts page a webhook notifier once, which also hears every lifecycle event."""
    return integration("pg", "webhook", "tok-paged-one-truth", name="Paged", rest="""
[[integrations.routes]]
id = "all"
escalation = "page"
""") + f"""
[[notifiers]]
name = "hook"
kind = "webhook"
url = "{url}"
timeout = 2
events = {json.dumps(LIFECYCLE)}

[[escalations]]
name = "page"
steps = [ {{ notify = ["hook"] }}, {{ wait = "1h" }} ]
"""


async def paged_group(post, receiver, n: int) -> str:
    status, body = await post("pg", {"n": n, "title": f"disk {n}"})
    assert status == 200, body
    gid = body["alert_group_id"]
    deadline = time.monotonic() + WAIT
    while receiver.events(gid) != ["triggered"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert receiver.events(gid) == ["triggered"]
    return gid


async def test_cli_resolve_notifies_through_the_running_daemon(spawn, tmp_path, receiver):
    config = write_config(tmp_path, extra_integrations=paged(receiver.url))
    daemon = spawn(config)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        async def post(iid, body):
            async with s.post(f"{daemon.base}/integrations/v1/webhook/tok-paged-one-truth/", json=body) as r:
                return r.status, await r.json()

        gid = await paged_group(post, receiver, 1)
        code, out, err = await cli("resolve", gid, "-c", str(config))
        assert code == 0, err
        assert out.strip() == f"{gid}: resolved"
        deadline = time.monotonic() + WAIT
        while receiver.events(gid) != ["triggered", "resolved"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert receiver.events(gid) == ["triggered", "resolved"]
        resolved = [b for b in receiver.bodies if b["event"] == "resolved"][0]
        assert resolved["alert_group"]["state"] == "resolved"
        # And the daemon's API tells the same story the CLI wrote.
        async with s.get(f"{daemon.base}/api/v1/alert_groups/{gid}/timeline/", headers={"Authorization": API_TOKEN}) as r:
            story = await r.json()
        assert [e["event"] for e in story["results"] if e["event"] == "resolved"] == ["resolved"]


def _normal(entry: dict) -> tuple:
    """A timeline entry without what differs by nature (times, notification ids)."""
    detail = {k: v for k, v in entry["detail"].items() if k not in ("id", "next_attempt_at")}
    return entry["event"], json.dumps(detail, sort_keys=True)


async def test_cli_api_and_ui_leave_the_same_timeline(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=paged(receiver.url))
    config = str(h.config_path)
    ui = UI(h.base)
    await ui.login()

    async def by_cli(gid, action, delay=None):
        args = [{"acknowledge": "ack", "unacknowledge": "unack"}.get(action, action), gid, "-c", config]
        code, _, err = await cli(*args, *(["--for", f"{delay}s"] if delay else []))
        assert code == 0, err

    async def by_api(gid, action, delay=None):
        status, body = await h.api("POST", f"alert_groups/{gid}/{action}/", {"delay": delay} if delay else None)
        assert status == 200, body

    async def by_ui(gid, action, delay=None):
        status, location = await ui.act(gid, action, **({"delay": str(delay)} if delay else {}),
                                        next=f"/ui/groups/{gid}")
        assert status == 303 and location == f"/ui/groups/{gid}"

    async def timeline(gid):
        status, body = await h.api("GET", f"alert_groups/{gid}/timeline/")
        assert status == 200
        return body["results"]

    steps = [("acknowledge", None), ("unacknowledge", None), ("resolve", None), ("unresolve", None),
             ("silence", 3600), ("unsilence", None)]
    stories = []
    try:
        for n, how in enumerate((by_cli, by_api, by_ui)):
            gid = await paged_group(h.post, receiver, n)
            for action, delay in steps:
                before = len(await timeline(gid))
                await how(gid, action, delay)

                async def settled():
                    entries = await timeline(gid)
                    status, g = await h.api("GET", f"alert_groups/{gid}/")
                    _, story = await h.api("GET", f"alert_groups/{gid}/timeline/")
                    pending = [x for x in story["notifications"] if x["state"] == "pending"]
                    escalation = story["escalation"]
                    return (len(entries) > before and not pending
                            and (escalation is None or escalation["state"] != "running"
                                 or escalation["step"] > 0))

                assert await until(settled)
            # The restarted escalation pages once more after unack, unresolve and unsilence.
            assert await until(lambda: _count(receiver.events(gid), "triggered", 4))
            assert await until(lambda: _all_sent(h, gid))
            stories.append((gid, await timeline(gid), receiver.events(gid)))
    finally:
        await ui.close()

    (g1, t1, e1), (g2, t2, e2), (g3, t3, e3) = stories
    states = {*LIFECYCLE, "unsilenced"}
    lifecycle = [[_normal(e) for e in t if e["event"] in states] for t in (t1, t2, t3)]
    assert lifecycle[0] == lifecycle[1] == lifecycle[2]
    assert [e for e, _ in lifecycle[0]] == ["acknowledged", "unacknowledged", "resolved", "unresolved",
                                            "silenced", "unsilenced"]
    assert sorted(map(_normal, t1)) == sorted(map(_normal, t2)) == sorted(map(_normal, t3))
    assert sorted(e1) == sorted(e2) == sorted(e3)
    assert sorted(set(e1)) == sorted({"triggered", *LIFECYCLE})


async def _count(events: list[str], event: str, n: int) -> bool:
    return events.count(event) == n


async def _all_sent(h, gid: str) -> bool:
    _, story = await h.api("GET", f"alert_groups/{gid}/timeline/")
    return all(n["state"] == "sent" for n in story["notifications"])


# -- bounded numbers --------------------------------------------------------------------


async def test_out_of_range_numbers_are_refused_alike(tocsin, tmp_path):
    status, body = await tocsin.post("wh", {"n": 1})
    gid = body["alert_group_id"]
    ui = UI(tocsin.base)
    await ui.login()
    try:
        for delay in (1e20, SILENCE_MAX + 1, -2, 1.5, "soon", None, True):
            status, body = await tocsin.api("POST", f"alert_groups/{gid}/silence/", {"delay": delay})
            assert status == 400 and f"1 to {SILENCE_MAX}" in body["error"], (delay, body)
        # NaN and infinity as Python's json (and many clients) write them.
        for raw in ('{"delay": NaN}', '{"delay": Infinity}', '{"delay": 1e400}'):
            async with tocsin.session.post(f"{tocsin.base}/api/v1/alert_groups/{gid}/silence/", data=raw,
                                           headers={"Authorization": API_TOKEN,
                                                    "Content-Type": "application/json"}) as r:
                assert r.status == 400, (raw, await r.text())
        status, location = await ui.act(gid, "silence", delay="100000000000000000000", next="/ui/groups")
        assert status == 303 and location == "/ui/groups"
        code, _, err = await cli("silence", gid, "--for", "400d", "-c", str(tocsin.config_path))
        assert code == 1 and f"1 to {SILENCE_MAX}" in err
        status, g = await tocsin.api("GET", f"alert_groups/{gid}/")
        assert g["state"] == "new" and g["silenced_at"] is None  # none of them was committed

        # The state rules refuse in the same words, whoever asks.
        status, body = await tocsin.api("POST", f"alert_groups/{gid}/unsilence/")
        code, _, err = await cli("unsilence", gid, "-c", str(tocsin.config_path))
        assert status == 400 and code == 1
        assert body["error"] == "Can't unsilence a new alert group" and err.strip() == f"tocsin: {body['error']}"
        status, body = await tocsin.api("POST", "alert_groups/INOSUCHGROUP1/resolve/")
        code, _, err = await cli("resolve", "INOSUCHGROUP1", "-c", str(tocsin.config_path))
        assert status == 404 and code == 1 and err.strip() == f"tocsin: {body['error']}"

        for duration in (1e300, MAINTENANCE_MAX + 1, 0, -5, 2.5, "3600", None):
            status, body = await tocsin.api("POST", "integrations/wh/maintenance_start/",
                                            {"mode": "debug", "duration": duration})
            if duration == "3600":  # a numeric string is the number it spells, as a form sends it
                assert status == 200, body
                assert (await tocsin.api("POST", "integrations/wh/maintenance_stop/"))[0] == 200
                continue
            assert status == 400 and f"1 to {MAINTENANCE_MAX}" in body["error"], (duration, body)
        async with tocsin.session.post(f"{tocsin.base}/api/v1/integrations/wh/maintenance_start/",
                                       data='{"mode": "debug", "duration": NaN}',
                                       headers={"Authorization": API_TOKEN,
                                                "Content-Type": "application/json"}) as r:
            assert r.status == 400

        for query in ("page=100000000000000000000", "page=0", "page=-1", "perpage=0", "perpage=201", "page=x"):
            for path in ("alert_groups/", "integrations/", "alerts/"):
                status, body = await tocsin.api("GET", f"{path}?{query}")
                assert status == 400 and "from 1 to" in body["error"], (path, query, body)

        # The UI's pages show the problem instead of failing.
        for path in ("/ui/groups?page=100000000000000000000", f"/ui/groups/{gid}?page=100000000000000000000",
                     "/ui/api/groups?page=100000000000000000000"):
            assert await ui.status_of(path) == 200, path

        # Everything still reads.
        for path in ("alert_groups/", "integrations/", f"alert_groups/{gid}/"):
            assert (await tocsin.api("GET", path))[0] == 200
        for path in ("/ui/groups", "/ui/integrations", f"/ui/groups/{gid}"):
            assert await ui.status_of(path) == 200
    finally:
        await ui.close()


async def test_times_stored_past_any_date_still_read(start_tocsin, tmp_path):
    """Rows written before the bounds (or by hand) never break a list or a page."""
    config = write_config(tmp_path)
    store = SqliteStore(tmp_path / "tocsin.db", rules=rules)  # the schema and a group, as the daemon makes them
    await store.open()
    [stored] = await store.add_alerts([NewAlert(integration_id="wh", grouping_key="k", payload_json="{}")])
    await store.close()
    gid = stored.alert_group_id
    db = sqlite3.connect(tmp_path / "tocsin.db")
    with db:
        db.execute("UPDATE alert_groups SET state = 'silenced', silenced_at = 1e300, silenced_until = 1e300"
                   " WHERE id = ?", (gid,))
        db.execute("INSERT INTO maintenance (integration_id, mode, started_at, ends_at, group_id)"
                   " VALUES ('wh', 'debug', ?, 1e300, NULL)", (time.time(),))
    db.close()
    h = await start_tocsin(config)
    ui = UI(h.base)
    await ui.login()
    try:
        status, groups = await h.api("GET", "alert_groups/")
        assert status == 200 and groups["results"][0]["silenced_until"].startswith("9999-12-31")
        status, integrations = await h.api("GET", "integrations/")
        wh = next(i for i in integrations["results"] if i["id"] == "wh")
        assert status == 200 and wh["maintenance_end_at"].startswith("9999-12-31")
        for path in ("/ui/groups", "/ui/integrations", f"/ui/groups/{gid}"):
            assert await ui.status_of(path) == 200, path
        assert (await h.api("POST", "integrations/wh/maintenance_stop/"))[0] == 200
    finally:
        await ui.close()


# -- a UI action's next -----------------------------------------------------------------


async def test_ui_action_next_is_a_safe_local_path(tocsin):
    ui = UI(tocsin.base)
    await ui.login()
    try:
        for n, bad in enumerate(("/ui/groups\r\nSet-Cookie: x=1", "/ui/groups\nX: y", "//evil.example/ui/",
                                 "https://evil.example/ui/", "/ui/\\evil", "javascript:alert(1)", "/ui/a b")):
            status, body = await tocsin.post("wh", {"n": n})
            gid = body["alert_group_id"]
            status, location = await ui.act(gid, "resolve", next=bad)
            assert status == 303 and location == f"/ui/groups/{gid}", (bad, location)
            status, g = await tocsin.api("GET", f"alert_groups/{gid}/")
            assert g["state"] == "resolved"
        status, location = await ui.act(gid, "unresolve", next="/ui/groups?state=new&page=2")
        assert status == 303 and location == "/ui/groups?state=new&page=2"
    finally:
        await ui.close()
