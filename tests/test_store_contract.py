"""One contract for storage, run against both engines: a real SQLite file and a real PostgreSQL
database (a throwaway one per test; see conftest.pg_url). Whatever the engine, alerts group
the same way, actions do the same, maintenance, heartbeats, escalation claims, notification
leases, receipts, pruning and a write that cannot be stored behave the same.

Run the PostgreSQL half against another server with TOCSIN_PG_URL=postgresql://user@host:port/db.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from escalation.engine import planner
from grouping import rules
from store import InvalidTransition, InvalidWrite, NewAlert, NotFound, OverLimit, StoredAlert, open_store

CHAIN = json.dumps({"name": "c", "steps": [{"kind": "notify", "notifiers": ["hook"]},
                                                         {"kind": "wait", "seconds": 60},
                                                         {"kind": "notify", "notifiers": ["hook"]}]})


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Where a store lives: an SQLite file path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / "tocsin.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def opened(database):
    """Open stores on `database` (several, to act as several instances); all closed at the end."""
    stores = []

    async def open_(**options):
        store = open_store(database, rules=rules, **options)
        await store.open()
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


def alert(key: str = "k", iid: str = "wh", **fields) -> NewAlert:
    return NewAlert(iid, key, json.dumps({"key": key}), **{"title": f"title {key}", **fields})


async def test_alerts_group_by_key_and_a_resolve_closes_the_group(opened):
    store = await opened()
    first = (await store.add_alerts([alert("a"), alert("a"), alert("b")]))
    assert first[0].group_created and not first[1].group_created and first[2].group_created
    assert first[0].alert_group_id == first[1].alert_group_id != first[2].alert_group_id
    resolved = (await store.add_alerts([alert("a", resolve=True)]))[0]
    assert resolved.alert_group_id == first[0].alert_group_id and resolved.group_state == "resolved"
    # A resolve signal with no open group joins the latest resolved one; a firing alert opens a new one.
    again = (await store.add_alerts([alert("a", resolve=True)]))[0]
    assert again.alert_group_id == first[0].alert_group_id and not again.group_created
    fresh = (await store.add_alerts([alert("a")]))[0]
    assert fresh.group_created and fresh.alert_group_id != first[0].alert_group_id
    g = await store.get_group(first[0].alert_group_id)
    assert (g.state, g.alerts_count, g.resolved_by, g.open) == ("resolved", 4, "source", None)
    count, groups = await store.list_groups(integration_id="wh")
    assert count == 3 and groups[0].id == fresh.alert_group_id  # newest first
    total, alerts = await store.list_alerts(alert_group_id=g.id)
    assert total == 4 and [a["is_resolve_signal"] for a in alerts] == [False, False, True, True]
    assert (await store.alerts_by_id([g.last_alert_id]))[g.last_alert_id]["alert_group_id"] == g.id
    assert sorted(await store.count_open_groups()) == [("wh", "new", 2)]


async def test_only_if_open_follow_ups_and_receipts(opened):
    store = await opened()
    assert await store.add_alerts([alert("pd", only_if_open=True)]) == [None]
    opened_group = (await store.add_alerts([alert("pd", receipt="imap:1")]))[0]
    joined = (await store.add_alerts([alert("pd", only_if_open=True, acknowledge=True)]))[0]
    assert joined.alert_group_id == opened_group.alert_group_id and joined.group_state == "acknowledged"
    assert await store.receipts_seen(["imap:1", "imap:2"]) == {"imap:1"}


async def test_actions_follow_the_rules_and_say_why_not(opened):
    store = await opened()
    gid = (await store.add_alerts([alert()]))[0].alert_group_id
    g = await store.act(gid, "acknowledge", by="ann")
    assert (g.state, g.acknowledged_by) == ("acknowledged", "ann")
    with pytest.raises(InvalidTransition, match="Can't acknowledge an acknowledged alert group"):
        await store.act(gid, "acknowledge")
    with pytest.raises(NotFound):
        await store.act("INOPE", "resolve")
    assert (await store.act(gid, "resolve")).state == "resolved"
    assert (await store.act(gid, "unresolve")).state == "new"
    # Unresolved groups never take alerts again.
    assert (await store.add_alerts([alert()]))[0].alert_group_id != gid
    silenced = await store.act(gid, "silence", delay=1)
    assert silenced.silenced_until == pytest.approx(silenced.silenced_at + 1)
    assert await store.expire_silences(time.time() + 2) == [gid]
    events = [e["event"] for e in await store.timeline(gid)]
    assert events == ["acknowledged", "resolved", "unresolved", "silenced", "unsilenced"]


async def test_maintenance_is_in_the_database_for_every_store(opened):
    one, two = await opened(), await opened()
    info = await one.maintenance_start("wh", "maintenance", 60, "Maintenance of wh for 1m")
    with pytest.raises(InvalidTransition, match="Already on maintenance"):
        await two.maintenance_start("wh", "debug", 60, "again")
    await asyncio.sleep(0.6)  # past the other store's cached read
    assert (await two.maintenance())["wh"]["group_id"] == info["group_id"]
    attached = (await two.add_alerts([alert("m")]))[0]
    assert (await two.get_group(attached.alert_group_id)).root_group_id == info["group_id"]
    assert await two.maintenance_stop("wh") == 2  # the maintenance group and the attached one
    assert (await two.get_group(attached.alert_group_id)).state == "resolved"
    with pytest.raises(InvalidTransition, match="not under maintenance"):
        await one.maintenance_stop("wh")
    assert await one.maintenance() == {}


async def test_heartbeats_expire_once(opened):
    one, two = await opened(), await opened()
    assert await one.heartbeat("wh") is None
    seen, state = (await two.heartbeats())["wh"]
    assert state == "alive"
    marked = await asyncio.gather(one.heartbeat_expired("wh", seen), two.heartbeat_expired("wh", seen))
    assert sorted(marked) == [False, True]
    assert await one.heartbeat("wh") == "expired"


async def test_an_escalation_step_and_its_notification_run_once(opened):
    one, two = await opened(), await opened()
    gid = (await one.add_alerts([alert(escalation=CHAIN)]))[0].alert_group_id
    looked = await asyncio.gather(one.escalate(planner), two.escalate(planner))
    assert sorted(looked) == [0, 1]
    notes = await one.notifications_of(gid)
    assert [(n["notifier"], n["event"], n["step"]) for n in notes] == [("hook", "triggered", 0)]
    due = await two.due_notifications(time.time() + 1)
    assert [n["id"] for n in due] == [notes[0]["id"]]
    claims = await asyncio.gather(one.attempt_start(notes[0]["id"], lease=0.5),
                                  two.attempt_start(notes[0]["id"], lease=0.5))
    assert sorted(claims, key=lambda c: c or 0) == [None, 1]
    # The claimer "dies": once its lease ends the other takes the attempt over, same notification id.
    await asyncio.sleep(0.7)
    assert await two.attempt_start(notes[0]["id"]) == 2
    assert await one.attempt_result(notes[0]["id"], 1, True, "late", None) == "superseded"
    assert await two.attempt_result(notes[0]["id"], 2, True, "200", None) == "sent"
    outcomes = [e["detail"]["outcome"] for e in await one.timeline(gid) if e["event"] == "notification"]
    assert outcomes == ["interrupted", "sent"]
    escalation = await one.escalation_of(gid)
    assert (escalation["state"], escalation["step"]) == ("running", 2)  # waiting 60 s before the next notify


async def test_concurrent_alerts_for_one_key_from_two_stores_join_one_group(opened):
    one, two = await opened(), await opened()
    keys = [f"k{i % 4}" for i in range(80)]
    results = await asyncio.gather(*(
        (one if i % 2 else two).add_alerts([alert(k)]) for i, k in enumerate(keys)))
    groups = {r[0].grouping_key: set() for r in results}
    for r in results:
        groups[r[0].grouping_key].add(r[0].alert_group_id)
    assert all(len(ids) == 1 for ids in groups.values()), groups
    count, listed = await one.list_groups()
    assert count == 4 and sum(g.alerts_count for g in listed) == 80


async def test_a_write_the_database_cannot_store_fails_alone(opened):
    store = await opened()
    poisoned = alert("p", title="bad \ud800")  # a lone surrogate: no UTF-8 for it
    results = await asyncio.gather(store.add_alerts([alert("x")]), store.add_alerts([poisoned]),
                                   store.add_alerts([alert("y")]), return_exceptions=True)
    assert isinstance(results[1], InvalidWrite), results
    assert all(isinstance(r, list) and isinstance(r[0], StoredAlert) for r in (results[0], results[2]))
    assert (await store.list_groups())[0] == 2
    assert await store.readiness() is None


async def test_prune_removes_old_resolved_groups_only(opened):
    store = await opened()
    old = (await store.add_alerts([alert("old")]))[0].alert_group_id
    await store.act(old, "resolve")
    kept = (await store.add_alerts([alert("kept")]))[0].alert_group_id
    assert await store.prune(time.time() + 1) == 1
    assert await store.get_group(old) is None and await store.get_group(kept) is not None
    assert await store.list_alerts(alert_group_id=old) == (0, [])


async def test_a_rate_limit_counts_every_store(opened):
    one, two = await opened(), await opened()
    limited = [alert(f"r{i}", rate_limit=(3, 60.0)) for i in range(5)]
    assert len(await one.add_alerts(limited[:2])) == 2
    with pytest.raises(OverLimit) as refused:  # all or nothing: two do not fit in the one left
        await two.add_alerts(limited[2:4])
    assert 0 < refused.value.retry_after <= 60
    assert len(await two.add_alerts(limited[4:])) == 1
    with pytest.raises(OverLimit):
        await one.add_alerts([alert("r9", rate_limit=(3, 60.0))])
    assert len(await one.add_alerts([alert("free")])) == 1  # not limited: never counted
    assert (await one.list_alerts())[0] == 4
