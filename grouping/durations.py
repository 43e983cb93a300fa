"""Durations as people write them in config and on the command line: `90`, `45s`, `90m`, `1h30m`, `2d`.

The one parser for every duration tocsin reads (timeouts, retention, heartbeats, escalation
waits, rate-limit periods, maintenance, `silence --for`). It lives in grouping/ because
escalation/ already builds on grouping/ (templates), and daemon/ and handlers/ sit above both.
"""
from __future__ import annotations

import math
import re

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|[smhdw])\s*")
_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")
EXAMPLES = "90, 45s, 90m, 1h30m, 2d"


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`: a number of seconds, or number+unit parts (ms, s, m, h, d, w) like '1h30m'.

    Raises ValueError with a text that quotes the value; whether zero is allowed is the caller's call.
    """
    if isinstance(value, bool):
        raise ValueError(f"duration {value!r} is not like {EXAMPLES}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"duration {value!r} must be a finite number of seconds, not negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"duration must be a number of seconds or a text like {EXAMPLES}")
    if _NUMBER.fullmatch(value):
        return float(value)
    text = value.strip()
    seconds, pos, seen = 0.0, 0, set()
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m or m.group(2) in seen:
            raise ValueError(f"duration '{value}' is not like {EXAMPLES}")
        seen.add(m.group(2))
        seconds += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError(f"duration '{value}' is empty (write it like {EXAMPLES})")
    return seconds
