"""Per-integration rate limits: at most N alerts in any period-long window.

A sliding log, not a token bucket: a bucket refilling at N/period lets nearly 2N
through in one period after a quiet spell, and the promise here is "at most N".
"""
from __future__ import annotations

import math
import re
import time
from collections import deque
from dataclasses import dataclass

from .durations import UNITS, parse_duration

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*$")
MAX_LIMIT = 1_000_000


@dataclass(frozen=True)
class RateSpec:
    """`N/period` as written in config."""

    count: int
    seconds: float
    text: str


def parse_rate(text: str) -> RateSpec:
    """'300/5m' -> RateSpec(300, 300.0), '10/s' -> one second, '1000/1h30m'; ValueError otherwise.

    The period is any duration (grouping.durations); a bare unit means one of it.
    """
    m = _SPEC.match(text or "")
    if not m:
        raise ValueError(f"rate limit '{text}' is not N/period (e.g. '300/5m', '10/s')")
    count, period = int(m.group(1)), m.group(2)
    try:
        seconds = parse_duration("1" + period if period in UNITS else period)
    except ValueError:
        raise ValueError(f"rate limit '{text}': the period '{period}' is not a duration"
                         " (e.g. '300/5m', '10/s', '1000/1h30m')") from None
    if not 1 <= count <= MAX_LIMIT or seconds <= 0:
        raise ValueError(f"rate limit '{text}': N must be 1..{MAX_LIMIT} and the period positive")
    return RateSpec(count, seconds, text.strip())


class SlidingLimit:
    """The times of alerts let through in the last period, for one integration."""

    def __init__(self, spec: RateSpec):
        self.spec = spec
        self._times: deque[float] = deque()

    def try_acquire(self, now: float | None = None) -> float:
        """0 when the alert may pass (and is counted); else seconds until it could."""
        now = time.monotonic() if now is None else now
        horizon = now - self.spec.seconds
        times = self._times
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) < self.spec.count:
            times.append(now)
            return 0.0
        return times[0] - horizon

    def refund(self) -> None:
        """Forget the latest acquisition (the alert was not stored after all)."""
        if self._times:
            self._times.pop()


class Limiter:
    """Limits by integration id; state survives config reloads while the spec is unchanged."""

    def __init__(self) -> None:
        self._limits: dict[str, SlidingLimit] = {}

    def configure(self, specs: dict[str, RateSpec | None]) -> None:
        kept = {}
        for iid, spec in specs.items():
            if spec is None:
                continue
            current = self._limits.get(iid)
            kept[iid] = current if current is not None and current.spec == spec else SlidingLimit(spec)
        self._limits = kept

    def get(self, integration_id: str) -> SlidingLimit | None:
        return self._limits.get(integration_id)

    @staticmethod
    def retry_after(seconds: float) -> int:
        return max(1, math.ceil(seconds))
