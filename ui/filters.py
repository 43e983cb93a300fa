"""Jinja filters for the UI's own (trusted, autoescaped) page templates."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit


def _utc(ts: float) -> datetime:
    """A UTC datetime; a time past what a date holds is the first or last one (a bad row never breaks a page)."""
    try:
        return datetime.fromtimestamp(ts, timezone.utc)
    except (OverflowError, ValueError, OSError):
        return datetime.max.replace(tzinfo=timezone.utc) if ts > 0 else datetime.min.replace(tzinfo=timezone.utc)


def when(ts: float | None) -> str:
    """Epoch seconds as a UTC date and time a person reads; "—" for none."""
    if ts is None or ts != ts:
        return "—"
    return _utc(ts).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ts: float | None, now: float | None = None) -> str:
    """"3 min ago", for scanning a list."""
    if ts is None:
        return "never"
    seconds = max(0, int((now if now is not None else time.time()) - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def duration(seconds: float | None) -> str:
    """A span of time as people say it: "90 s", "5 min", "1 h 30 min", "2 d"; "—" for none."""
    if seconds is None:
        return "—"
    left = int(round(seconds))
    if left < 60:
        return f"{seconds:g} s" if seconds < 10 and seconds != left else f"{left} s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def iso_input(ts: float | None) -> str:
    """The value of a datetime-local input (UTC)."""
    return "" if ts is None or ts != ts else _utc(ts).strftime("%Y-%m-%dT%H:%M")


def href(url: Any) -> str | None:
    """`url` when it is safe in an href or src (http or https), else None.

    Autoescaping keeps text inert, but not a javascript: URL in an attribute; links
    built from templates and payloads pass here first.
    """
    if not isinstance(url, str):
        return None
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc else None


def pretty(value: Any) -> str:
    """JSON as people read it (indented, non-ASCII kept)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


def filters() -> dict[str, Callable]:
    return {"when": when, "ago": ago, "duration": duration, "href": href, "pretty": pretty, "iso_input": iso_input}
