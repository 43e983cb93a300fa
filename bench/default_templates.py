"""Micro-benchmark: decide() per alert with the kinds' default templates, sandboxed vs native.

For each kind, its example payload (split or counted as ingestion does) goes through
grouping.pipeline.decide twice: with the integration as built (native defaults, the
sandbox for what they decline) and with the natives taken away (every template in the
sandbox, as before). Prints µs per alert for ingestion (behaviour templates and the
title) and for the full render (adds source link, message and image, as the UI shows).

    .venv/bin/python bench/default_templates.py [--seconds 0.4]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grouping.kinds import KINDS  # noqa: E402
from grouping.pipeline import Integration, build_integration, decide, payloads_of  # noqa: E402
from grouping.templates import Budget, NativeTemplate  # noqa: E402


def sandbox_only(i: Integration) -> Integration:
    """The same integration with every native taken away."""
    templates = {n: t.sandboxed if isinstance(t, NativeTemplate) else t for n, t in i.templates.items()}
    return dataclasses.replace(i, templates=templates)


def per_alert_us(integration: Integration, payload, full: bool, seconds: float) -> float:
    """Best of five runs of `seconds` each, in µs per decide() call (budget made per call, as live)."""
    best = float("inf")
    for _ in range(5):
        n, started = 0, time.perf_counter()
        while True:
            for _ in range(50):
                now = time.monotonic()
                decide(integration, payload, Budget(now + 1.0, False, 1.0), full=full, alert_group_id="G1")
            n += 50
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = min(best, elapsed / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.4, help="length of each of the five runs per figure")
    args = ap.parse_args()
    print(f"decide() per alert on each kind's example payload, µs (best of 5 x {args.seconds}s)")
    print(f"{'kind':<18}{'ingest sandbox':>15}{'native':>8}{'x':>6}{'full sandbox':>14}{'native':>8}{'x':>6}")
    totals = [0.0, 0.0, 0.0, 0.0]
    for slug, kind in KINDS.items():
        native = build_integration(f"b-{slug}", slug, slug, f"t-{slug}", {})
        sandboxed = sandbox_only(native)
        payload = payloads_of(kind, kind.example_payload_copy())[0]
        figures = [per_alert_us(i, payload, full, args.seconds)
                   for full in (False, True) for i in (sandboxed, native)]
        totals = [a + b for a, b in zip(totals, figures)]
        s_in, n_in, s_full, n_full = figures
        print(f"{slug:<18}{s_in:>15.1f}{n_in:>8.1f}{s_in / n_in:>6.1f}{s_full:>14.1f}{n_full:>8.1f}{s_full / n_full:>6.1f}")
    k = len(KINDS)
    s_in, n_in, s_full, n_full = (t / k for t in totals)
    print(f"{'mean':<18}{s_in:>15.1f}{n_in:>8.1f}{s_in / n_in:>6.1f}{s_full:>14.1f}{n_full:>8.1f}{s_full / n_full:>6.1f}")


if __name__ == "__main__":
    main()
