"""CONTRACT §7 grouping rules and group actions, through HTTP and the API over a real database."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest


def fw(uid: str, state: str = "alerting", **extra) -> dict:
    return {"alert_uid": uid, "title": f"title {uid}", "state": state, **extra}


async def group_of(h, res) -> dict:
    status, body = await h.api("GET", f"alert_groups/{res['alert_group_id']}/")
    assert status == 200, body
    return body


async def test_same_key_joins_open_group_without_state_change(tocsin):
    status, first = await tocsin.post("fw", fw("k1"))
    status, _ = await tocsin.api("POST", f"alert_groups/{first['alert_group_id']}/acknowledge/")
    assert status == 200
    status, second = await tocsin.post("fw", fw("k1"))
    assert second["alert_group_id"] == first["alert_group_id"]
    g = await group_of(tocsin, second)
    assert g["state"] == "acknowledged" and g["alerts_count"] == 2
    assert g["last_alert"]["id"] == second["alert_id"]


async def test_silenced_group_takes_alerts_and_stays_silenced(tocsin):
    _, first = await tocsin.post("fw", fw("s1"))
    status, g = await tocsin.api("POST", f"alert_groups/{first['alert_group_id']}/silence/", {"delay": -1})
    assert status == 200 and g["state"] == "silenced"
    _, second = await tocsin.post("fw", fw("s1"))
    assert second["alert_group_id"] == first["alert_group_id"]
    assert (await group_of(tocsin, second))["state"] == "silenced"


async def test_keys_are_per_integration(tocsin):
    _, a = await tocsin.post("fw", fw("same"))
    _, b = await tocsin.post("zb", fw("same"))
    assert a["grouping_key"] == b["grouping_key"]
    assert a["alert_group_id"] != b["alert_group_id"]


async def test_resolve_with_no_group_creates_resolved_group(tocsin):
    _, res = await tocsin.post("fw", fw("r0", "ok"))
    g = await group_of(tocsin, res)
    assert g["state"] == "resolved" and g["alerts_count"] == 1


async def test_resolve_joins_latest_resolved_group(tocsin):
    _, first = await tocsin.post("fw", fw("r1"))
    _, ok1 = await tocsin.post("fw", fw("r1", "ok"))
    assert ok1["alert_group_id"] == first["alert_group_id"]
    _, ok2 = await tocsin.post("fw", fw("r1", "ok"))  # no open group: joins the latest resolved one
    assert ok2["alert_group_id"] == first["alert_group_id"]
    g = await group_of(tocsin, ok2)
    assert g["state"] == "resolved" and g["alerts_count"] == 3


async def test_resolved_group_never_takes_firing_alerts(tocsin):
    _, first = await tocsin.post("fw", fw("r2"))
    await tocsin.post("fw", fw("r2", "ok"))
    _, again = await tocsin.post("fw", fw("r2"))
    assert again["alert_group_id"] != first["alert_group_id"]
    assert (await group_of(tocsin, again))["state"] == "new"


async def test_unresolve_does_not_reopen_for_grouping(tocsin):
    _, first = await tocsin.post("fw", fw("u1"))
    gid = first["alert_group_id"]
    assert (await tocsin.api("POST", f"alert_groups/{gid}/resolve/"))[0] == 200
    status, g = await tocsin.api("POST", f"alert_groups/{gid}/unresolve/")
    assert status == 200 and g["state"] == "new"
    _, later = await tocsin.post("fw", fw("u1"))
    assert later["alert_group_id"] != gid


async def test_acknowledge_condition(start_tocsin):
    from conftest import integration

    h = await start_tocsin(extra_integrations=integration(
        "ackable", "formatted_webhook", "tok-ackable-0001",
        """[integrations.templates]
acknowledge_condition = '{{ payload.state == "acked" }}'""", name="Ackable"))
    _, first = await h.post("ackable", fw("a1"))
    _, second = await h.post("ackable", fw("a1", "acked"))
    assert second["alert_group_id"] == first["alert_group_id"]
    g = await group_of(h, second)
    assert g["state"] == "acknowledged" and g["acknowledged_by"] == "source"


async def test_failing_grouping_id_stands_alone(tocsin):
    # formatted_webhook groups by alert_uid: a payload without it renders "" -> never grouped.
    _, a = await tocsin.post("fw", {"title": "no uid"})
    _, b = await tocsin.post("fw", {"title": "no uid"})
    assert a["alert_group_id"] != b["alert_group_id"]


async def test_concurrent_alerts_with_one_key_make_one_open_group(tocsin):
    results = await asyncio.gather(*(tocsin.post("fw", fw("race")) for _ in range(60)))
    assert all(status == 200 for status, _ in results)
    assert len({res["alert_group_id"] for _, res in results}) == 1
    with sqlite3.connect(tocsin.daemon.config.daemon.database) as db:
        (open_groups,) = db.execute("SELECT count(*) FROM alert_groups WHERE open = 1").fetchone()
        (alerts_count,) = db.execute("SELECT alerts_count FROM alert_groups").fetchone()
    assert open_groups == 1 and alerts_count == 60


@pytest.mark.parametrize(
    "setup, action, body, expected",
    [
        ([], "acknowledge", None, "acknowledged"),
        (["acknowledge"], "unacknowledge", None, "new"),
        ([], "resolve", None, "resolved"),
        (["acknowledge"], "resolve", None, "resolved"),
        (["resolve"], "unresolve", None, "new"),
        ([], "silence", {"delay": 3600}, "silenced"),
        ([("silence", {"delay": -1})], "unsilence", None, "new"),
        ([("silence", {"delay": -1})], "acknowledge", None, "acknowledged"),
        ([("silence", {"delay": -1})], "resolve", None, "resolved"),
    ],
)
async def test_actions(tocsin, setup, action, body, expected):
    _, res = await tocsin.post("fw", fw("act"))
    gid = res["alert_group_id"]
    for step in setup:
        name, b = step if isinstance(step, tuple) else (step, None)
        assert (await tocsin.api("POST", f"alert_groups/{gid}/{name}/", b))[0] == 200
    status, g = await tocsin.api("POST", f"alert_groups/{gid}/{action}/", body)
    assert status == 200, g
    assert g["state"] == expected


@pytest.mark.parametrize(
    "setup, action, body, text",
    [
        (["resolve"], "acknowledge", None, "Can't acknowledge a resolved alert group"),
        (["acknowledge"], "acknowledge", None, "Can't acknowledge an acknowledged alert group"),
        ([], "unacknowledge", None, "Can't unacknowledge a new alert group"),
        (["resolve"], "resolve", None, "Can't resolve a resolved alert group"),
        ([], "unresolve", None, "Can't unresolve a new alert group"),
        (["acknowledge"], "silence", {"delay": 60}, "Can't silence an acknowledged alert group"),
        (["resolve"], "silence", {"delay": 60}, "Can't silence a resolved alert group"),
        ([], "unsilence", None, "Can't unsilence a new alert group"),
        ([], "silence", {"delay": -5}, "silence needs"),
        ([], "silence", None, "silence needs"),
    ],
)
async def test_refused_actions(tocsin, setup, action, body, text):
    _, res = await tocsin.post("fw", fw("refuse"))
    gid = res["alert_group_id"]
    for name in setup:
        assert (await tocsin.api("POST", f"alert_groups/{gid}/{name}/"))[0] == 200
    before = (await group_of(tocsin, res))["state"]
    status, body = await tocsin.api("POST", f"alert_groups/{gid}/{action}/", body)
    assert status == 400 and text in body["error"]
    assert (await group_of(tocsin, res))["state"] == before


async def test_action_on_unknown_group_404(tocsin):
    status, body = await tocsin.api("POST", "alert_groups/INOSUCHGROUP1/resolve/")
    assert status == 404


async def test_silence_with_delay_ends(tocsin):
    _, res = await tocsin.post("fw", fw("sd"))
    gid = res["alert_group_id"]
    status, g = await tocsin.api("POST", f"alert_groups/{gid}/silence/", {"delay": 1})
    assert g["state"] == "silenced"
    for _ in range(40):
        await asyncio.sleep(0.1)
        if (await group_of(tocsin, res))["state"] == "new":
            break
    assert (await group_of(tocsin, res))["state"] == "new"


async def test_list_filters_and_pagination(tocsin):
    for n in range(5):
        await tocsin.post("fw", fw(f"p{n}"))
    await tocsin.post("zb", fw("z"))
    _, first = await tocsin.post("fw", fw("p-res", "ok"))
    status, page1 = await tocsin.api("GET", "alert_groups/?integration_id=fw&perpage=2")
    assert page1["count"] == 6 and len(page1["results"]) == 2 and page1["previous"] is None
    assert page1["next"] and "page=2" in page1["next"]
    status, page3 = await tocsin.api("GET", "alert_groups/?integration_id=fw&perpage=2&page=3")
    assert len(page3["results"]) == 2 and page3["next"] is None
    resolved = await tocsin.groups(state="resolved")
    assert [g["id"] for g in resolved] == [first["alert_group_id"]]
    status, body = await tocsin.api("GET", "alert_groups/?state=bogus")
    assert status == 400
    status, alerts = await tocsin.api("GET", f"alerts/?alert_group_id={first['alert_group_id']}")
    assert alerts["count"] == 1 and alerts["results"][0]["payload"]["state"] == "ok"


def test_row_ids_sort_like_rows():
    # The unique indexes on ids grow at their end only if ids sort in row order.
    from store.db import row_id

    seqs = [1, 2, 33, 34, 35, 1000, 10**6, 34**4, 10**9, 34**8 - 1]
    ids = [row_id("A", n) for n in seqs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 13 for i in ids)


async def test_migrations_upgrade_an_old_database_in_place(tmp_path):
    """A database made by schema version 1 opens, migrates to the latest, keeps its rows,
    and its open group still takes the next alert."""
    from grouping import rules
    from store import NewAlert, SqliteStore
    from store.schema import MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in filter(str.strip, MIGRATIONS[0].split(";")):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO alert_groups (id, integration_id, grouping_key, state, open, alerts_count, created_at)"
               " VALUES ('IOLD', 'fw', 'k', 'new', 1, 1, 0)")
    db.commit()
    db.close()
    store = SqliteStore(path, rules=rules)
    await store.open()
    try:
        [stored] = await store.add_alerts([NewAlert("fw", "k", "{}")])
        assert stored.alert_group_id == "IOLD" and not stored.group_created
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("SELECT alerts_count FROM alert_groups WHERE id = 'IOLD'").fetchone()[0] == 2
