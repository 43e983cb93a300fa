"""The alert-group rules as pure functions (grouping.rules): placement, transitions from
every state, arrivals, and what follows a lifecycle event. Every storage engine calls these."""
from __future__ import annotations

import dataclasses

import pytest

from grouping import rules
from store import Group, InvalidTransition, NewAlert

STATES = ("new", "acknowledged", "resolved", "silenced")


def group(state: str = "new", **fields) -> Group:
    base = dict(seq=1, id="I1", integration_id="wh", grouping_key="k", state=state,
                open=None if state == "resolved" else 1, route_id=None, title="t", alerts_count=1, created_at=100.0)
    return Group(**{**base, **fields})


def alert(**fields) -> NewAlert:
    return NewAlert(integration_id="wh", grouping_key="k", payload_json="{}", received_at=200.0, **fields)


def test_placement_prefers_the_open_group_then_a_resolved_one_for_a_resolve_signal():
    open_, resolved = group(), group("resolved", id="I0")
    assert rules.placement(alert(), open_, resolved) is open_
    assert rules.placement(alert(), None, resolved) is rules.NEW
    assert rules.placement(alert(resolve=True), None, resolved) is resolved
    assert rules.placement(alert(resolve=True), None, None) is rules.NEW
    # A PagerDuty follow-up joins an open group or is not stored at all.
    assert rules.placement(alert(only_if_open=True), None, resolved) is None
    assert rules.placement(alert(only_if_open=True, resolve=True), open_, None) is open_


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("action", sorted(rules.ALLOWED_FROM))
def test_every_action_from_every_state(action, state):
    g = group(state, silenced_at=50.0 if state == "silenced" else None)
    if state not in rules.ALLOWED_FROM[action]:
        with pytest.raises(InvalidTransition, match=f"Can't {action} "):
            rules.transition(g, action, 300.0, by="ann")
        return
    changes = rules.transition(g, action, 300.0, by="ann", delay=60)
    after = dataclasses.replace(g, **changes)
    expected = {"acknowledge": "acknowledged", "unacknowledge": "new", "resolve": "resolved",
                "unresolve": "new", "silence": "silenced", "unsilence": "new"}[action]
    assert after.state == expected
    if action == "resolve":
        assert after.open is None and after.resolved_by == "ann" and after.silenced_at is None
    if action == "unresolve":
        assert after.open is None  # never open for grouping again
    if action == "silence":
        assert after.silenced_until == 360.0
    assert g.state == state  # the group itself is left as it was: the engine applies the changes


def test_silence_forever_and_unknown_action():
    assert rules.transition(group(), "silence", 10.0, delay=-1)["silenced_until"] is None
    with pytest.raises(InvalidTransition, match="Unknown action 'explode'"):
        rules.transition(group(), "explode", 10.0)


def test_arrival_counts_and_applies_the_conditions_in_order():
    changes, events = rules.arrival(group("silenced", silenced_at=5.0), alert(acknowledge=True, resolve=True), "A9", 7.0)
    assert changes["alerts_count"] == 2 and changes["last_alert_id"] == "A9" and changes["last_alert_at"] == 7.0
    assert events == ["acknowledged", "resolved"]
    assert changes["state"] == "resolved" and changes["open"] is None and changes["silenced_at"] is None
    assert rules.arrival(group("resolved"), alert(resolve=True), "A1", 1.0)[1] == []
    assert rules.arrival(group("acknowledged"), alert(acknowledge=True), "A1", 1.0)[1] == []


def test_new_group_under_maintenance_and_its_escalation():
    a = alert(escalation='{"steps": []}')
    assert rules.new_group(a, None)["root_group_id"] is None
    assert rules.new_group(a, {"mode": "maintenance", "group_id": "IM"})["root_group_id"] == "IM"
    assert rules.new_group(a, {"mode": "debug", "group_id": None})["root_group_id"] is None
    assert rules.escalation_start(a, "new", None) == "running"
    assert rules.escalation_start(a, "resolved", None) == "stopped"
    assert rules.escalation_start(a, "new", {"mode": "debug", "group_id": None}) is None
    assert rules.escalation_start(alert(), "new", None) is None


def test_what_follows_a_lifecycle_event():
    assert rules.escalation_after("acknowledged", group("acknowledged")) == "stop"
    assert rules.escalation_after("unresolved", group()) == "restart"
    assert rules.escalation_after("unsilenced", group(root_group_id="IM")) is None
    assert rules.lifecycle_notifiers("resolved", {"b", "a", "c"},
                                     {"a": frozenset({"resolved"}), "c": frozenset({"acknowledged"})}) == ["a"]
    with pytest.raises(InvalidTransition, match="Already on maintenance"):
        rules.maintenance_startable({"mode": "debug"})
    with pytest.raises(InvalidTransition, match="not under maintenance"):
        rules.maintenance_stoppable(None)
