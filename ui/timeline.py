"""A group's story (grouping.views.group_story) as the group page shows it: one line per
timeline entry, written for people. Everything here is plain text; the page template
escapes it like any other value."""
from __future__ import annotations

import json
from typing import Any

from .filters import duration, when

STATE_EVENTS = {"acknowledged", "unacknowledged", "resolved", "unresolved", "silenced", "unsilenced"}
OUTCOMES = {"sent": "sent", "retrying": "failed, will retry", "failed": "failed for good",
            "interrupted": "interrupted"}


def _step(n: Any) -> str:
    """Steps are counted from 1 on the page (the API counts from 0)."""
    return f"step {n + 1}" if isinstance(n, int) else "step"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def describe(entry: dict, names: dict[str, str] | None = None) -> dict:
    """{at, event, label, text, detail, next_at} for one entry: `label` says what happened,
    `text` the particulars, `detail` a notifier's own words (shown apart), `next_at` when
    a failed notification is tried again."""
    event, d = entry.get("event", ""), entry.get("detail")
    d = d if isinstance(d, dict) else {}
    out = {"at": entry.get("at"), "event": event, "label": event.replace("_", " "), "text": "",
           "detail": None, "next_at": None, "outcome": None}
    if event == "created":
        iid = d.get("integration_id")
        route = d.get("route_id")
        out["text"] = (f"from {(names or {}).get(iid, iid)}"
                       + (f", route {route}" if route else ", no route"))
    elif event in STATE_EVENTS:
        out["text"] = f"by {d['by']}" if d.get("by") else ""
    elif event == "escalation_step":
        kind = d.get("kind")
        step = _step(d.get("step"))
        if kind == "notify":
            out["text"] = f"{step}: notify {', '.join(map(str, d.get('notifiers') or [])) or 'nobody'}"
        elif kind == "wait":
            out["text"] = f"{step}: wait {duration(d.get('seconds'))}"
        elif kind == "repeat":
            out["text"] = f"{step}: repeat from the start ({d.get('time')} of {d.get('of')})"
        elif kind == "resolve":
            out["text"] = f"{step}: resolve the group"
        elif kind == "if_time":
            out["text"] = (f"{step}: outside {d.get('window')} ({d.get('timezone')}),"
                           f" waiting until {when(d.get('waiting_until'))}")
        elif kind == "if_alerts_in_window":
            alerts = d.get("alerts")
            out["text"] = (f"{step}: {alerts} alert{'' if alerts == 1 else 's'} in the window, needs more than"
                           f" {d.get('needed_more_than')}: paused until the next alert")
        else:
            out["text"] = f"{step}: {kind}"
    elif event == "escalation_finished":
        out["text"] = f"chain {d.get('chain')}" if d.get("chain") else ""
    elif event == "notification":
        outcome = d.get("outcome")
        out["label"] = "notification"
        out["outcome"] = outcome if outcome in OUTCOMES else None
        out["text"] = (f"{d.get('notifier')} ({d.get('event')}), attempt {d.get('attempt')}:"
                       f" {OUTCOMES.get(outcome, outcome)}")
        out["detail"] = _text(d["detail"]) if d.get("detail") else None
        out["next_at"] = d.get("next_attempt_at")
    elif event == "maintenance_started":
        iid = d.get("integration")
        out["text"] = f"collects the alert groups of {(names or {}).get(iid, iid)} until maintenance ends"
    elif d:
        out["text"] = ", ".join(f"{k}: {_text(v)}" for k, v in d.items())
    return out


def escalation_view(escalation: dict | None) -> dict | None:
    """The escalation row as the page shows it: chain name, state, position, next due time."""
    if escalation is None:
        return None
    chain = escalation.get("chain")
    chain = chain if isinstance(chain, dict) else {}
    steps = chain.get("steps") if isinstance(chain.get("steps"), list) else []
    return {"name": chain.get("name") or "?", "state": escalation.get("state"), "steps": len(steps),
            "step": escalation.get("step"), "repeats": escalation.get("repeats") or 0,
            "due_at": escalation.get("due_at")}
