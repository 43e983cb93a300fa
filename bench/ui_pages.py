"""Web UI benchmark: page render times over a database of 100,000 alert groups.

Fills a temporary database in bulk (sqlite3, one transaction), starts the daemon in
this process, logs in like a browser and prints p50/p99 over N requests for the groups
list (first page, filtered pages, a time range, the deepest page, title searches, label
filters), a group page, the auto-refresh endpoint, the integrations page, an integration's
page, the template editor and its preview. Each group has four labels (alertname 1/500,
instance 1/97, severity 1/3, team 1/7), as group_labels holds them.

    .venv/bin/python bench/ui_pages.py [--groups 100000] [--requests 50] [--proposed-indexes]

--proposed-indexes adds, to the temporary database only, the indexes docs/ui.md proposes
for the slow queries (the schema itself is store/schema.py's business).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.app import Daemon, load_config  # noqa: E402
from grouping import rules  # noqa: E402
from store import SqliteStore  # noqa: E402
from store.db import public_id  # noqa: E402

API_TOKEN = "bench-api-token"
INTEGRATIONS = [("prom", "alertmanager"), ("hooks", "webhook"), ("mail", "inbound_email")]
# Grafana OnCall-like mix: most groups are long resolved.
STATES = [("resolved", 0.70), ("new", 0.15), ("acknowledged", 0.10), ("silenced", 0.05)]
SPAN = 90 * 86400  # groups spread over 90 days
PROPOSED_INDEXES = (
    # Open-group counts per integration (integrations page, /metrics): a covering partial index.
    "CREATE INDEX ix_groups_unresolved ON alert_groups (integration_id, state) WHERE state != 'resolved'",
    # The time-range filter.
    "CREATE INDEX ix_groups_created ON alert_groups (created_at)",
    # State and integration together.
    "CREATE INDEX ix_groups_state_integration ON alert_groups (state, integration_id, seq)",
)


def write_config(folder: Path) -> Path:
    lines = ["[daemon]", f'database = "{folder / "tocsin.db"}"', 'log_level = "WARNING"',
             "[http]", 'listen = "127.0.0.1:0"', "[smtp]", 'listen = "127.0.0.1:0"',
             'domain = "alerts.example.com"', "[api]", f'tokens = ["{API_TOKEN}"]']
    for iid, kind in INTEGRATIONS:
        lines += ["[[integrations]]", f'id = "{iid}"', f'name = "{iid}"', f'kind = "{kind}"',
                  f'token = "bench-{iid}-0123456789"']
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fill(db_path: Path, groups: int, indexes: tuple[str, ...] = ()) -> None:
    """`groups` groups with one alert each, oldest first, written in one transaction."""
    rng = random.Random(6)
    now = time.time()
    start = now - SPAN
    db = sqlite3.connect(db_path)
    group_rows, alert_rows, label_rows = [], [], []
    for n in range(groups):
        iid = INTEGRATIONS[n % len(INTEGRATIONS)][0]
        state = rng.choices([s for s, _ in STATES], [w for _, w in STATES])[0]
        created = start + SPAN * n / groups
        gid, aid = public_id("I"), public_id("A")
        labels = {"alertname": f"Alert{n % 500}", "instance": f"host{n % 97}",
                  "severity": ("critical", "warning", "info")[n % 3], "team": f"team{n % 7}"}
        payload = {"labels": labels, "n": n, "status": "resolved" if state == "resolved" else "firing"}
        label_rows += [(k, v, n + 1) for k, v in labels.items()]
        group_rows.append((
            gid, iid, f"{n:032x}", state, None if state == "resolved" else 1, None, f"Alert{n % 500} on host{n % 97}",
            1, created,
            created + 60 if state == "acknowledged" else None, "user" if state == "acknowledged" else None,
            created + 300 if state == "resolved" else None, "source" if state == "resolved" else None,
            created + 30 if state == "silenced" else None, created + 3600 * 24 * 365 if state == "silenced" else None,
            aid, created, f"Alert{n % 500}-host{n % 97}",
        ))
        alert_rows.append((aid, gid, iid, created, "http", int(state == "resolved"), json.dumps(payload), None))
    with db:
        db.executemany(
            "INSERT INTO alert_groups (id, integration_id, grouping_key, state, open, route_id, title, alerts_count,"
            " created_at, acknowledged_at, acknowledged_by, resolved_at, resolved_by, silenced_at, silenced_until,"
            " last_alert_id, last_alert_at, grouping_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", group_rows)
        db.execute("INSERT INTO group_titles (rowid, title) SELECT seq, title FROM alert_groups")
        db.executemany("INSERT INTO group_labels (key, value, group_seq) VALUES (?, ?, ?)", label_rows)
        db.executemany(
            "INSERT INTO alerts (id, alert_group_id, integration_id, created_at, source, is_resolve_signal, payload, raw)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", alert_rows)
    for statement in indexes:
        db.execute(statement)
    db.execute("ANALYZE")
    db.close()


async def login(session: aiohttp.ClientSession, base: str) -> str:
    page = await (await session.get(f"{base}/ui/login")).text()
    nonce = re.search(r'name="_login" value="([^"]+)"', page).group(1)
    async with session.post(f"{base}/ui/login", data={"_login": nonce, "token": API_TOKEN}) as r:
        page = await r.text()
        assert r.status == 200 and "/ui/login" not in str(r.url), "login failed"
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


async def timed(session, method: str, url: str, n: int, **kw) -> list[float]:
    times = []
    for i in range(n + 3):
        started = time.perf_counter()
        async with session.request(method, url, **kw) as r:
            await r.read()
            assert r.status == 200, (url, r.status)
        if i >= 3:  # the first few warm caches
            times.append((time.perf_counter() - started) * 1000)
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--proposed-indexes", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tocsin-ui-bench-") as tmp:
        folder = Path(tmp)
        config = write_config(folder)
        store = SqliteStore(folder / "tocsin.db", rules=rules)
        await store.open()  # creates the schema
        await store.close()
        started = time.perf_counter()
        fill(folder / "tocsin.db", args.groups, PROPOSED_INDEXES if args.proposed_indexes else ())
        print(f"filled {args.groups} groups (+ one alert each) in {time.perf_counter() - started:.1f} s"
              + (", with the proposed indexes" if args.proposed_indexes else ""))

        daemon = Daemon(load_config(config))
        await daemon.start()
        base = f"http://127.0.0.1:{daemon.http_port}"
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
                csrf = await login(session, base)
                db = sqlite3.connect(folder / "tocsin.db")
                middle = db.execute("SELECT id FROM alert_groups WHERE seq = ?", (args.groups // 2,)).fetchone()[0]
                db.close()
                day = datetime.fromtimestamp(time.time() - SPAN / 2, timezone.utc)
                since = day.strftime("%Y-%m-%dT%H:%M")
                until = datetime.fromtimestamp(day.timestamp() + 86400, timezone.utc).strftime("%Y-%m-%dT%H:%M")
                last_page = -(-args.groups // 50)
                preview = {"templates": {"grouping_id": "{{ payload.alertname }}"},
                           "payload": json.dumps({"alertname": "Alert1", "status": "firing"})}
                cases = [
                    ("groups, first page", "GET", "/ui/groups", {}),
                    ("groups, state=new", "GET", "/ui/groups?state=new", {}),
                    ("groups, state+integration", "GET", "/ui/groups?state=acknowledged&integration=prom", {}),
                    ("groups, one-day range", "GET", f"/ui/groups?since={since}&until={until}", {}),
                    (f"groups, deepest page ({last_page})", "GET", f"/ui/groups?page={last_page}", {}),
                    ("groups, page 1000 of state=resolved", "GET", "/ui/groups?state=resolved&page=1000", {}),
                    ("search, common (1 in 97)", "GET", "/ui/groups?q=host42", {}),
                    ("search, rare (1 in 500)", "GET", "/ui/groups?q=Alert123+", {}),
                    ("search, no match", "GET", "/ui/groups?q=nothing-like-this", {}),
                    ("label, common (severity, 1 in 3)", "GET", "/ui/groups?label=severity%3Dcritical", {}),
                    ("label, rare (alertname, 1 in 500)", "GET", "/ui/groups?label=alertname%3DAlert7", {}),
                    ("two labels + state", "GET",
                     "/ui/groups?label=severity%3Dwarning&label=team%3Dteam3&state=new", {}),
                    ("search + label", "GET", "/ui/groups?q=host42&label=severity%3Dinfo", {}),
                    ("label, deep page (300)", "GET", "/ui/groups?label=severity%3Dcritical&page=300", {}),
                    ("auto-refresh JSON", "GET", "/ui/api/groups", {}),
                    ("auto-refresh JSON, label", "GET", "/ui/api/groups?label=team%3Dteam1", {}),
                    ("group page", "GET", f"/ui/groups/{middle}", {}),
                    ("integrations", "GET", "/ui/integrations", {}),
                    ("one integration", "GET", "/ui/integrations/prom", {}),
                    ("template editor", "GET", "/ui/integrations/prom/templates", {}),
                    ("editor preview (+100-alert grouping)", "POST", "/ui/api/integrations/prom/preview",
                     {"json": preview, "headers": {"X-CSRF-Token": csrf}}),
                ]
                print(f"{'page':44} {'p50 ms':>8} {'p99 ms':>8}   ({args.requests} requests each)")
                for name, method, path, kw in cases:
                    times = await timed(session, method, base + path, args.requests, **kw)
                    print(f"{name:44} {statistics.median(times):8.1f} {pct(times, 0.99):8.1f}")
        finally:
            await daemon.stop()


if __name__ == "__main__":
    asyncio.run(main())
