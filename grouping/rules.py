"""The alert-group rules (CONTRACT §7): where an alert goes, what each action does from each
state, and what follows a state change. Pure functions over group values: they return the
changes and events, and every storage engine applies them inside its own transaction.

The store is handed this module (`store.open_store(database, rules=grouping.rules)`) by
whoever opens it (daemon/, the CLI, tests): the store sits below grouping/ and imports
nothing of ours, so the rules come down as a value. Both engines call these same functions.
"""
from __future__ import annotations

from typing import Any, Mapping

from store import InvalidTransition

__all__ = ["ALLOWED_FROM", "EVENT_OF", "NEW", "InvalidTransition", "arrival", "escalation_after", "escalation_start",
           "lifecycle_notifiers",
           "maintenance_startable", "maintenance_stoppable", "new_group", "placement", "silence_ended",
           "transition"]

# What each action may start from (Grafana OnCall's public API texts for the refusals).
ALLOWED_FROM = {
    "acknowledge": ("new", "silenced"),
    "unacknowledge": ("acknowledged",),
    "resolve": ("new", "acknowledged", "silenced"),
    "unresolve": ("resolved",),
    "silence": ("new",),
    "unsilence": ("silenced",),
}
EVENT_OF = {
    "acknowledge": "acknowledged", "unacknowledge": "unacknowledged", "resolve": "resolved",
    "unresolve": "unresolved", "silence": "silenced", "unsilence": "unsilenced",
}
_ARTICLE = {"new": "a new", "acknowledged": "an acknowledged", "resolved": "a resolved", "silenced": "a silenced"}
_STOPS = frozenset({"acknowledged", "resolved", "silenced"})
_RESTARTS = frozenset({"unacknowledged", "unresolved", "unsilenced"})
_UNSILENCED = {"silenced_at": None, "silenced_until": None}

NEW = "new group"  # placement's answer when the alert opens a group of its own


def placement(alert, open_group, latest_resolved):
    """Where an alert goes: the open group of its key; for a resolve signal with none open,
    the latest resolved one; NEW when it opens a group; None when an only_if_open alert
    (a PagerDuty follow-up) finds no open group and is not stored at all."""
    if open_group is not None:
        return open_group
    if alert.only_if_open:
        return None
    if alert.resolve and latest_resolved is not None:
        return latest_resolved
    return NEW


def new_group(alert, maintenance: Mapping[str, Any] | None) -> dict:
    """The fields of a group an alert opens, under the integration's maintenance (or None):
    debug mode forms groups that never escalate; maintenance mode attaches them to the one
    maintenance group too."""
    root = maintenance["group_id"] if maintenance and maintenance["mode"] == "maintenance" else None
    return {"integration_id": alert.integration_id, "grouping_key": alert.grouping_key, "state": "new", "open": 1,
            "route_id": alert.route_id, "title": alert.title, "alerts_count": 0, "created_at": alert.received_at,
            "root_group_id": root, "grouping_id": alert.grouping_id}


def escalation_start(alert, group_state: str, maintenance: Mapping[str, Any] | None) -> str | None:
    """How a new group's escalation starts: "running", "stopped" (the first alert already
    acked or resolved it), or None (no chain, or under maintenance: nothing escalates)."""
    if maintenance is not None or alert.escalation is None:
        return None
    return "running" if group_state == "new" else "stopped"


def arrival(group, alert, alert_id: str, now: float) -> tuple[dict, list[str]]:
    """What an alert does to the group it joins: the field changes, and the lifecycle events
    its acknowledge and resolve conditions set off (made by "source")."""
    changes: dict[str, Any] = {"alerts_count": group.alerts_count + 1, "last_alert_id": alert_id,
                               "last_alert_at": now}
    state, events = group.state, []
    if alert.acknowledge and state in ("new", "silenced"):
        state = "acknowledged"
        changes.update(_UNSILENCED, state=state, acknowledged_at=now, acknowledged_by="source")
        events.append("acknowledged")
    if alert.resolve and state != "resolved":
        changes.update(_UNSILENCED, state="resolved", resolved_at=now, resolved_by="source", open=None)
        events.append("resolved")
    return changes, events


def transition(group, action: str, now: float, *, by: str = "user", delay: int | None = None) -> dict:
    """The field changes `action` makes to `group`, or InvalidTransition with a clear text."""
    if action not in ALLOWED_FROM:
        raise InvalidTransition(f"Unknown action '{action}'")
    if group.state not in ALLOWED_FROM[action]:
        raise InvalidTransition(f"Can't {action} {_ARTICLE.get(group.state, group.state)} alert group")
    if action == "acknowledge":
        return {**_UNSILENCED, "state": "acknowledged", "acknowledged_at": now, "acknowledged_by": by}
    if action == "unacknowledge":
        return {"state": "new", "acknowledged_at": None, "acknowledged_by": None}
    if action == "resolve":
        return {**_UNSILENCED, "state": "resolved", "resolved_at": now, "resolved_by": by, "open": None}
    if action == "unresolve":
        # Back to firing, but never open for grouping again (Grafana OnCall's rule).
        return {"state": "new", "resolved_at": None, "resolved_by": None, "acknowledged_at": None,
                "acknowledged_by": None}
    if action == "silence":
        return {"state": "silenced", "silenced_at": now,
                "silenced_until": None if delay is None or delay <= 0 else now + delay}
    return {**_UNSILENCED, "state": "new"}  # unsilence


def silence_ended(group) -> dict:
    """The changes when a group's silence runs out (event "unsilenced")."""
    return {**_UNSILENCED, "state": "new"}


def escalation_after(event: str, group) -> str | None:
    """What a lifecycle event does to the group's escalation: "stop", "restart" (from the
    first step; never for a group attached to a maintenance group) or None."""
    if event in _STOPS:
        return "stop"
    if event in _RESTARTS and group.state == "new" and group.root_group_id is None:
        return "restart"
    return None


def lifecycle_notifiers(event: str, reached: set[str], wants: Mapping[str, frozenset[str]]) -> list[str]:
    """Which notifiers hear of `event`: those the group's escalation reached that asked for it."""
    return [n for n in sorted(reached) if event in wants.get(n, ())]


def maintenance_startable(current: Mapping[str, Any] | None) -> None:
    """InvalidTransition when the integration is already under maintenance."""
    if current is not None:
        raise InvalidTransition("Already on maintenance")


def maintenance_stoppable(current: Mapping[str, Any] | None) -> None:
    """InvalidTransition when the integration is not under maintenance."""
    if current is None:
        raise InvalidTransition("Integration is not under maintenance")
