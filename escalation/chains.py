"""Escalation chains: their steps as written in config, and what running them decides.

`plan` is pure: a chain snapshot, where the group is in it, the clock and an alert
counter in; the steps to take now and when to look again out. The store applies it.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, time, timedelta, timezone
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from grouping.durations import parse_duration

MAX_REPEAT = 5  # Grafana OnCall's MAX_TIMES_REPEAT
STEP_KINDS = ("notify", "wait", "repeat", "resolve", "if_time", "if_alerts_in_window")
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Step:
    """One step of a chain; only the fields of its kind are set."""

    kind: str
    notifiers: tuple[str, ...] = ()
    seconds: float = 0.0          # wait
    times: int = 0                # repeat
    window: str = ""              # if_time, "HH:MM-HH:MM"
    tz: str = "UTC"               # if_time
    count: int = 0                # if_alerts_in_window: more than this many alerts…
    minutes: float = 0.0          # …within this many minutes


@dataclass(frozen=True)
class Chain:
    name: str
    steps: tuple[Step, ...]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "steps": [asdict(s) for s in self.steps]}, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "Chain":
        raw = json.loads(text)
        steps = tuple(Step(**{**s, "notifiers": tuple(s.get("notifiers", ()))}) for s in raw["steps"])
        return Chain(raw["name"], steps)


def parse_chain(table, where: str, problems: list[str], notifiers: set[str]) -> Chain | None:
    """One [[escalations]] table; problems get one clear line each."""
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return None
    for key in table:
        if key not in ("name", "steps"):
            problems.append(f"{where}: unknown key '{key}'")
    name = table.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: missing 'name'")
        return None
    where = f"escalation '{name}'"
    raw_steps = table.get("steps", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append(f"{where}: 'steps' must be a non-empty list")
        return None
    steps = []
    for n, raw in enumerate(raw_steps, start=1):
        step = _parse_step(raw, f"{where} step {n}", problems, notifiers)
        if step is not None:
            steps.append(step)
    return Chain(name, tuple(steps))


def _parse_step(raw, where: str, problems: list[str], notifiers: set[str]) -> Step | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an inline table like {{ wait = \"5m\" }}")
        return None
    kinds = [k for k in raw if k in STEP_KINDS]
    if len(kinds) != 1:
        problems.append(f"{where}: needs exactly one of {', '.join(STEP_KINDS)}")
        return None
    kind = kinds[0]
    allowed = {"if_time": {"if_time", "timezone"}, "if_alerts_in_window": {"if_alerts_in_window", "minutes"}}
    for key in raw:
        if key not in allowed.get(kind, {kind}):
            problems.append(f"{where}: unknown key '{key}' for a {kind} step")
    value = raw[kind]
    try:
        if kind == "notify":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
                raise ValueError("notify takes a list of notifier names")
            unknown = [x for x in names if x not in notifiers]
            if unknown:
                raise ValueError(f"unknown notifier(s): {', '.join(unknown)}")
            return Step("notify", notifiers=tuple(names))
        if kind == "wait":
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise ValueError(f"wait: {exc}") from None
            if seconds <= 0:
                raise ValueError("wait must be positive")
            return Step("wait", seconds=seconds)
        if kind == "repeat":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_REPEAT:
                raise ValueError(f"repeat takes a number of times from 1 to {MAX_REPEAT}")
            return Step("repeat", times=value)
        if kind == "resolve":
            if value is not True:
                raise ValueError("write it as { resolve = true }")
            return Step("resolve")
        if kind == "if_time":
            if not isinstance(value, str) or not _WINDOW.match(value):
                raise ValueError("if_time takes \"HH:MM-HH:MM\"")
            tz = raw.get("timezone", "UTC")
            _zone(tz)
            h1, m1, h2, m2 = (int(x) for x in _WINDOW.match(value).groups())
            if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
                raise ValueError(f"'{value}' is not a time window")
            return Step("if_time", window=value.replace(" ", ""), tz=tz)
        if kind == "if_alerts_in_window":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError("if_alerts_in_window takes a number of alerts")
            minutes = raw.get("minutes")
            if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0:
                raise ValueError("if_alerts_in_window needs minutes = <positive number>")
            return Step("if_alerts_in_window", count=value, minutes=float(minutes))
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
    return None


def _zone(name: str):
    try:
        return timezone.utc if name == "UTC" else ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone '{name}'") from None


def next_window_start(step: Step, now: float) -> float | None:
    """None when `now` is inside the step's window, else the epoch time the window opens next."""
    h1, m1, h2, m2 = (int(x) for x in _WINDOW.match(step.window).groups())
    zone = _zone(step.tz)
    local = datetime.fromtimestamp(now, zone)
    start, end = time(h1, m1), (time(h2 % 24, m2) if h2 < 24 else time(23, 59, 59, 999999))
    t = local.time()
    inside = (start <= t < end) if start <= end else (t >= start or t < end)  # overnight windows
    if inside:
        return None
    opening = local.replace(hour=h1, minute=m1, second=0, microsecond=0)
    if opening <= local:
        opening += timedelta(days=1)
    return opening.timestamp()


@dataclass
class Plan:
    """What running the chain from its current position does now."""

    step: int
    repeats: int
    state: str                     # running | paused | finished
    due_at: float | None
    notify: list[tuple[str, int]] = field(default_factory=list)   # (notifier, step index)
    timeline: list[tuple[str, dict]] = field(default_factory=list)
    resolve: bool = False
    ran: list[str] = field(default_factory=list)   # kind of every step looked at, for metrics


MAX_STEPS_AT_ONCE = 100  # a chain of only notify+repeat still ends: repeats are capped too


def plan(chain: Chain, step: int, repeats: int, now: float,
         alerts_in_window: Callable[[float], int]) -> Plan:
    """Run steps from `step` until one waits, pauses or the chain ends."""
    p = Plan(step=step, repeats=repeats, state="running", due_at=None)
    for _ in range(MAX_STEPS_AT_ONCE):
        if p.step >= len(chain.steps):
            p.state, p.due_at = "finished", None
            p.timeline.append(("escalation_finished", {"chain": chain.name}))
            return p
        s = chain.steps[p.step]
        index = p.step
        p.ran.append(s.kind)
        if s.kind == "notify":
            p.notify += [(name, index) for name in s.notifiers]
            p.timeline.append(("escalation_step", {"step": index, "kind": "notify", "notifiers": list(s.notifiers)}))
            p.step += 1
        elif s.kind == "wait":
            p.timeline.append(("escalation_step", {"step": index, "kind": "wait", "seconds": s.seconds}))
            p.step += 1
            p.due_at = now + s.seconds
            return p
        elif s.kind == "repeat":
            if p.repeats < s.times:
                p.repeats += 1
                p.timeline.append(("escalation_step", {"step": index, "kind": "repeat", "time": p.repeats,
                                                       "of": s.times}))
                p.step = 0
            else:
                p.step += 1
        elif s.kind == "resolve":
            p.timeline.append(("escalation_step", {"step": index, "kind": "resolve"}))
            p.resolve = True
            p.state, p.step, p.due_at = "finished", p.step + 1, None
            return p
        elif s.kind == "if_time":
            opens = next_window_start(s, now)
            if opens is not None:
                p.timeline.append(("escalation_step", {"step": index, "kind": "if_time", "window": s.window,
                                                       "timezone": s.tz, "waiting_until": opens}))
                p.due_at = opens  # the step is checked again when the window opens
                return p
            p.step += 1
        elif s.kind == "if_alerts_in_window":
            count = alerts_in_window(s.minutes * 60)
            if count <= s.count:
                p.timeline.append(("escalation_step", {"step": index, "kind": "if_alerts_in_window",
                                                       "alerts": count, "needed_more_than": s.count,
                                                       "paused": True}))
                p.state, p.due_at = "paused", None  # resumed by the group's next alert
                return p
            p.step += 1
    p.due_at = now + 1  # an unusually long run of instant steps: carry on next tick
    return p
