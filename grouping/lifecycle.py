"""What a person does to alert groups and integrations: acknowledge, resolve, silence, …
and maintenance. The API, the web UI and the CLI each call these functions, so they
check the same things, say the same refusals and leave the same timeline behind.

The store does the rest inside the action's transaction: the state change, the timeline
entry, the escalation stopped or restarted, and a pending row per lifecycle notification.
Whichever daemon serves the database picks those rows up (its engine looks for due rows
every tick), so an action from the CLI notifies exactly as one from the API does.
"""
from __future__ import annotations

import math
from typing import Any

from store import Group, InvalidTransition, NotFound, StoreUnavailable

from .durations import parse_duration
from .rules import ALLOWED_FROM

__all__ = ["ACTIONS", "ActionError", "UnknownAction", "InvalidTransition", "NotFound", "StoreUnavailable", "act",
           "check_action", "silence_delay",
           "maintenance_duration", "maintenance_start", "maintenance_stop", "human_duration"]

ACTIONS = tuple(ALLOWED_FROM)
PAST = {"acknowledge": "acknowledged", "unacknowledge": "unacknowledged", "resolve": "resolved",
        "unresolve": "unresolved", "silence": "silenced", "unsilence": "unsilenced"}

# Grafana OnCall's public API takes any delay >= -1 (-1 and 0: forever); its UI offers
# 30 min to 7 days. A year bounds it so every stored time stays a date people can read.
SILENCE_MAX = 365 * 86400
# OnCall's UI offers 1 to 24 hours and its API any integer; 30 days keeps a forgotten
# maintenance from hiding an integration for good. 1 s is allowed (tests end one quickly).
MAINTENANCE_MAX = 30 * 86400
MAINTENANCE_MODES = ("debug", "maintenance")


class ActionError(ValueError):
    """A request for an action that cannot be carried out as asked; str() says why."""


class UnknownAction(ActionError):
    """No such action."""


def _whole_seconds(value: Any) -> int | None:
    """An integral number of seconds from JSON, a form field or the CLI; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                value = parse_duration(value)  # "90m", "1h30m", "2.5" (grouping.durations)
            except ValueError:
                return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None  # NaN, infinities, fractions, anything else


def silence_delay(value: Any) -> int:
    """A silence's delay in seconds (-1 or 0: forever), or ActionError with the allowed range."""
    seconds = _whole_seconds(value)
    if seconds is None or not (seconds in (-1, 0) or 1 <= seconds <= SILENCE_MAX):
        raise ActionError(f"silence needs a delay: -1 (forever) or whole seconds from 1 to {SILENCE_MAX}"
                          f" ({SILENCE_MAX // 86400} days)")
    return seconds


def maintenance_duration(value: Any) -> int:
    """A maintenance window's length in seconds, or ActionError with the allowed range."""
    seconds = _whole_seconds(value)
    if seconds is None or not 1 <= seconds <= MAINTENANCE_MAX:
        raise ActionError(f"duration must be whole seconds from 1 to {MAINTENANCE_MAX}"
                          f" ({MAINTENANCE_MAX // 86400} days)")
    return seconds


def check_action(action: str) -> str:
    """`action` when it is one, else UnknownAction."""
    if action not in ALLOWED_FROM:
        raise UnknownAction(f"no such action '{action}' (one of: {', '.join(ACTIONS)})")
    return action


async def act(store, group_id: str, action: str, *, by: str = "user", delay: Any = None) -> Group:
    """Apply `action` to the group durably and return the group as committed.

    Raises UnknownAction, ActionError (a bad delay), NotFound or InvalidTransition (the
    group's state does not allow it), each with a text fit to show as it is.
    """
    check_action(action)
    seconds = silence_delay(delay) if action == "silence" else None
    return await store.act(group_id, action, delay=seconds, by=by)


def human_duration(seconds: float) -> str:
    """1h, 30m, 2d, 45s: how a maintenance group's title names its length."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


async def maintenance_start(store, integration_id: str, name: str, mode: Any, duration: Any) -> dict:
    """Put an integration in debug or maintenance mode for `duration` seconds; the
    maintenance info as stored. Raises ActionError or InvalidTransition (already on)."""
    if mode not in MAINTENANCE_MODES:
        raise ActionError('mode must be "debug" or "maintenance"')
    seconds = maintenance_duration(duration)
    title = f"Maintenance of {name} for {human_duration(seconds)}"
    return await store.maintenance_start(integration_id, mode, float(seconds), title)


async def maintenance_stop(store, integration_id: str) -> int:
    """End an integration's maintenance; how many groups it resolved. InvalidTransition when off."""
    return await store.maintenance_stop(integration_id)
