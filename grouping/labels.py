"""A group's labels: the `key=value` pairs its alerts carry, for the UI's label filter.

Alertmanager and Grafana put them under `labels`, `groupLabels` and `commonLabels`,
and under `labels` of each entry of `alerts`; other payloads may have a `labels` object.
Only text and numbers count; keys and values are cut, and a payload gives at most
MAX_LABELS pairs, so one odd alert cannot fill the table.
"""
from __future__ import annotations

from typing import Any

MAX_LABELS = 64
MAX_KEY = 100
MAX_VALUE = 200
_SOURCES = ("labels", "groupLabels", "commonLabels")


def _pairs(obj: Any):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and key and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                yield key[:MAX_KEY], str(value)[:MAX_VALUE]


def labels_of(payload: Any) -> tuple[tuple[str, str], ...]:
    """The (key, value) pairs of one payload, sorted, at most MAX_LABELS."""
    if not isinstance(payload, dict):
        return ()
    found: set[tuple[str, str]] = set()
    for name in _SOURCES:
        found.update(_pairs(payload.get(name)))
    alerts = payload.get("alerts")
    if isinstance(alerts, list):
        for alert in alerts[:MAX_LABELS]:
            if isinstance(alert, dict):
                found.update(_pairs(alert.get("labels")))
    return tuple(sorted(found)[:MAX_LABELS])


def parse_label(text: str) -> tuple[str, str] | None:
    """`key=value` (spaces around either side ignored, quotes around the value dropped) or None."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if not sep or not key:
        return None
    return key[:MAX_KEY], value[:MAX_VALUE]
