"""Routes: which escalation chain a new alert group starts (Grafana OnCall's rules).

Checked in order, first match wins, the default route (no condition) last. A condition
is a Jinja template under the truthiness rule; a regex is searched over
`json.dumps(payload)` (ASCII-escaped, as OnCall does). Errors never match.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import regex

from .templates import Budget, compile_template, is_truthy, render

MAX_TERM_LENGTH = 1024  # OnCall's FILTERING_TERM_MAX_LENGTH
REGEX_TIMEOUT = 0.5


@dataclass(frozen=True)
class Route:
    """One compiled route; `escalation` is a chain name or None (no escalation)."""

    id: str
    escalation: str | None
    condition: Any = None      # compiled template
    pattern: Any = None        # compiled regex
    source: str | None = None  # the condition or regex as written

    @property
    def is_default(self) -> bool:
        return self.condition is None and self.pattern is None

    def matches(self, payload: Any, budget: Budget) -> bool:
        if self.condition is not None:
            return is_truthy(render(self.condition, {"payload": payload}, budget))
        if self.pattern is not None:
            try:
                text = json.dumps(payload)
            except (TypeError, ValueError, RecursionError):
                return False
            try:
                return self.pattern.search(text, timeout=REGEX_TIMEOUT) is not None
            except TimeoutError:
                return False
        return True


def compile_route(id: str, *, condition: str | None, regex_text: str | None, escalation: str | None) -> Route:
    """Raise ValueError with a clear text when the condition or regex cannot be used."""
    if condition is not None and regex_text is not None:
        raise ValueError("give 'condition' or 'regex', not both")
    for term in (condition, regex_text):
        if term is not None and len(term) > MAX_TERM_LENGTH:
            raise ValueError(f"routing term longer than {MAX_TERM_LENGTH} characters")
    if condition is not None:
        return Route(id, escalation, condition=compile_template(condition), source=condition)
    if regex_text is not None:
        try:
            pattern = regex.compile(regex_text)
        except regex.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return Route(id, escalation, pattern=pattern, source=regex_text)
    return Route(id, escalation)


def choose(routes: tuple[Route, ...], payload: Any, budget: Budget) -> Route | None:
    """The first matching route, non-default routes before the default one."""
    for route in routes:
        if not route.is_default and route.matches(payload, budget):
            return route
    return next((r for r in routes if r.is_default), None)
