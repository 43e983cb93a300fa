"""View models: the shapes of a group, an alert, a decision, an integration and a group's
story, as people and the page scripts see them. One floor below handlers/ and ui/, so
both use the same ones and neither imports the other."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Mapping

from store import Group

from .pipeline import Integration

STATES = ("new", "acknowledged", "resolved", "silenced")
# Past this the offset alone would not fit SQLite's 64-bit integer; nobody pages that far.
MAX_PAGE = 1_000_000

# Public API template names (Grafana OnCall) for the config's template names.
API_TEMPLATE_NAMES = {
    "grouping_id": "grouping_key",
    "resolve_condition": "resolve_signal",
    "acknowledge_condition": "acknowledge_signal",
    "source_link": "source_link",
}


_EARLIEST = datetime(1, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with microseconds, as Grafana OnCall prints them.

    A time beyond what a date can hold prints as the first or last one (a bad row never
    breaks a read); one that is not a number prints as null."""
    if ts is None or ts != ts:
        return None
    try:
        value = datetime.fromtimestamp(ts, timezone.utc)
    except (OverflowError, ValueError, OSError):
        value = _LATEST if ts > 0 else _EARLIEST
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    """An ISO 8601 date and time (UTC when it names no zone) as epoch seconds; ValueError if not one."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def human(seconds: float) -> str:
    """A whole span as "3h", "2d", "90s" (maintenance titles)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def alert_json(alert: dict) -> dict:
    """A stored alert with its payload parsed back (left as text when it is not JSON)."""
    payload = alert["payload"]
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return {"id": alert["id"], "alert_group_id": alert["alert_group_id"],
            "created_at": iso(alert["created_at"]), "payload": payload}


def integration_json(i: Integration, *, public_url: str, email_domain: str | None,
                     maintenance: dict | None) -> dict:
    """An integration in Grafana OnCall's public API shape."""
    link = f"{public_url}/integrations/v1/{i.kind.slug}/{i.token}/"
    o = i.overrides
    default = next((r for r in i.routes if r.is_default), None)
    return {
        "id": i.id,
        "name": i.name,
        "description_short": None,
        "type": i.kind.slug,
        "link": link,
        "inbound_email": f"{i.token}@{email_domain}" if email_domain else None,
        "heartbeat": {"link": f"{link}heartbeat/"},
        "maintenance_mode": maintenance["mode"] if maintenance else None,
        "maintenance_started_at": iso(maintenance["started_at"]) if maintenance else None,
        "maintenance_end_at": iso(maintenance["ends_at"]) if maintenance else None,
        "default_route": {"id": default.id, "escalation_chain_id": default.escalation} if default else None,
        "routes": [
            {"id": r.id, "position": n, "routing_type": "jinja2" if r.condition is not None else "regex",
             "routing_regex": r.source, "escalation_chain_id": r.escalation, "is_the_last_route": r.is_default}
            for n, r in enumerate(i.routes)
        ],
        "templates": {
            **{api: o.get(name) for name, api in API_TEMPLATE_NAMES.items()},
            "web": {"title": o.get("title"), "message": o.get("message"), "image_url": o.get("image_url")},
        },
    }


async def groups_json(store, groups: list[Group], *, public_url: str) -> list[dict]:
    """Groups in Grafana OnCall's public API shape, each with its last alert and its labels."""
    last = await store.alerts_by_id([g.last_alert_id for g in groups if g.last_alert_id])
    labels = await store.labels_of([g.seq for g in groups if g.seq is not None])
    return [
        {
            "id": g.id,
            "integration_id": g.integration_id,
            "team_id": None,
            "route_id": g.route_id,
            "alerts_count": g.alerts_count,
            "state": g.state,
            "title": g.title,
            "created_at": iso(g.created_at),
            "acknowledged_at": iso(g.acknowledged_at),
            "acknowledged_by": g.acknowledged_by,
            "resolved_at": iso(g.resolved_at),
            "resolved_by": g.resolved_by,
            "silenced_at": iso(g.silenced_at),
            "silenced_until": iso(g.silenced_until),
            "grouping_key": g.grouping_key,
            "grouping_id": g.grouping_id,
            # Grafana OnCall's label shape: {key: {id, name}, value: {id, name}}.
            "labels": [{"key": {"id": k, "name": k}, "value": {"id": v, "name": v}} for k, v in labels.get(g.seq, ())],
            "permalinks": {"web": f"{public_url}/ui/groups/{g.id}"},
            "last_alert": alert_json(last[g.last_alert_id]) if g.last_alert_id in last else None,
        }
        for g in groups
    ]


async def group_story(store, g: Group) -> dict:
    """A group's timeline, escalation and notifications, times in epoch seconds: what the
    REST timeline and the UI's group page both show.

    `entries` ([{at, event, detail}], oldest first) starts with the group's creation and
    route, then the store's timeline: escalation steps, each notification attempt, state
    changes and who made them.
    """
    entries = [{"at": g.created_at, "event": "created",
                "detail": {"integration_id": g.integration_id, "route_id": g.route_id}}]
    entries += [{"at": e["at"], "event": e["event"], "detail": e["detail"]} for e in await store.timeline(g.id)]
    return {"entries": entries, "escalation": await store.escalation_of(g.id),
            "notifications": await store.notifications_of(g.id)}


def routes_view(i: Integration, matched: str | None = None) -> list[dict]:
    """The integration's routes in the order they are tried, each with why it matches
    (its Jinja condition or regex, or "everything else" for the default) and its chain."""
    out = []
    for n, r in enumerate(i.routes, start=1):
        if r.condition is not None:
            how, rule = "condition", r.source
        elif r.pattern is not None:
            how, rule = "regex", r.source
        else:
            how, rule = "default", None
        out.append({"position": n, "id": r.id, "how": how, "rule": rule, "escalation": r.escalation,
                    "chain": i.chains.get(r.id), "matched": r.id == matched})
    return out


def timeline_json(g: Group, story: dict) -> dict:
    """A group's story (group_story) as the REST timeline shows it, times in ISO 8601."""
    escalation = story["escalation"]
    if escalation is not None:
        escalation = {**escalation, "due_at": iso(escalation["due_at"])}
    return {
        "alert_group_id": g.id, "state": g.state, "escalation": escalation,
        "notifications": [{**n, "created_at": iso(n["created_at"])} for n in story["notifications"]],
        "results": [{**e, "at": iso(e["at"])} for e in story["entries"]],
    }


def maintenance_of(maintenance: Mapping[str, dict], g: Group) -> dict | None:
    """The maintenance a group belongs to (its collecting group, or attached to it), if still on."""
    for iid, info in maintenance.items():
        if info.get("group_id") and info["group_id"] in (g.id, g.root_group_id):
            return {"integration_id": iid, **info}
    return None
