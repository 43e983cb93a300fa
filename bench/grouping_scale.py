"""Does grouping stay flat as the database grows? Commit time of the same work on an
empty database and on one holding a million alerts.

    .venv/bin/python bench/grouping_scale.py [--alerts 1000000]

Each measured commit is 64 alerts: half join open groups, a quarter open new groups,
a quarter resolve (some with no open group, which looks up the latest resolved one).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from grouping import rules
from store import NewAlert, SqliteStore
from store.db import row_id


def fill(path: Path, alerts: int) -> None:
    """Bulk rows straight into the schema: 5 alerts per group, 90% of groups resolved."""
    db = sqlite3.connect(path)
    groups = alerts // 5
    now = time.time() - 86400
    batch_g, batch_a = [], []
    seq = 0
    for g in range(groups):
        gid = row_id("I", g + 1)
        resolved = g % 10 != 0
        batch_g.append((gid, "scale", f"key-{g}", "resolved" if resolved else "new", None if resolved else 1,
                        "t", 5, now, now if resolved else None, gid))
        for _ in range(5):
            seq += 1
            batch_a.append((row_id("A", seq), gid, "scale", now, "http", 0, '{"x": 1}'))
        if len(batch_a) >= 50000:
            _flush(db, batch_g, batch_a)
    _flush(db, batch_g, batch_a)
    db.close()


def _flush(db, groups, alerts) -> None:
    db.executemany("INSERT INTO alert_groups (id, integration_id, grouping_key, state, open, title, alerts_count,"
                   " created_at, resolved_at, last_alert_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", groups)
    db.executemany("INSERT INTO alerts (id, alert_group_id, integration_id, created_at, source,"
                   " is_resolve_signal, payload) VALUES (?, ?, ?, ?, ?, ?, ?)", alerts)
    db.commit()
    groups.clear()
    alerts.clear()


async def measure(path: Path, existing_groups: int, rounds: int = 200) -> list[float]:
    store = SqliteStore(path, rules=rules)
    await store.open()
    rng = random.Random(7)
    times = []
    fresh = 0
    for _ in range(rounds):
        batch = []
        for i in range(64):
            r = i % 4
            if r < 2 and existing_groups:
                key = f"key-{rng.randrange(0, existing_groups, 10)}"       # an open group
                batch.append(NewAlert("scale", key, '{"x": 2}'))
            elif r == 2:
                fresh += 1
                batch.append(NewAlert("scale", f"new-{fresh}", '{"x": 3}'))   # a new group
            else:
                key = f"key-{rng.randrange(existing_groups)}" if existing_groups else f"gone-{fresh}"
                batch.append(NewAlert("scale", key, '{"x": 4}', resolve=True))  # resolve signal
        t0 = time.perf_counter()
        await store.add_alerts(batch)
        times.append(time.perf_counter() - t0)
    await store.close()
    return sorted(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty, full = Path(tmp) / "empty.db", Path(tmp) / "full.db"
        for p in (empty, full):
            asyncio.run(_create(p))
        t0 = time.perf_counter()
        fill(full, args.alerts)
        print(f"filled {args.alerts} alerts / {args.alerts // 5} groups in {time.perf_counter() - t0:.0f} s, "
              f"{full.stat().st_size / 2**20:.0f} MiB")
        for name, path, groups in (("empty database", empty, 0), (f"{args.alerts} alerts", full, args.alerts // 5)):
            t = asyncio.run(measure(path, groups))
            print(f"{name:<18} commit of 64 alerts: p50 {t[len(t) // 2] * 1000:.2f} ms  "
                  f"p99 {t[int(len(t) * 0.99)] * 1000:.2f} ms")


async def _create(path: Path) -> None:
    store = SqliteStore(path, rules=rules)
    await store.open()
    await store.close()


if __name__ == "__main__":
    main()
