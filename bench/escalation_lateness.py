"""Escalation scheduling accuracy: 10,000 open groups, each waiting, while alerts keep arriving.

    .venv/bin/python bench/escalation_lateness.py [--groups 10000] [--wait 5]

Each group's chain is `wait N s, then resolve`; the lateness of a step is when the engine
ran it minus when it was due (group created + wait). Prints p50/p99/max lateness.
"""
from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

from escalation.chains import Chain, Step
from escalation.engine import Engine
from grouping import rules
from grouping.runtime import Settings
from store import NewAlert, SqliteStore


class _NoPipeline:
    settings = Settings()  # no notifiers, no heartbeats

    def by_id(self, _):
        return None


async def run(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "lateness.db", rules=rules)
        await store.open()
        engine = Engine(store, _NoPipeline)
        await engine.start()
        chain = Chain("bench", (Step("wait", seconds=args.wait), Step("resolve"))).to_json()
        started = time.time()
        # Groups arrive over about two seconds, in commits of 200, like a burst of new incidents.
        for n in range(0, args.groups, 200):
            await store.add_alerts([NewAlert("bench", f"g{n + i}", "{}", escalation=chain)
                                    for i in range(min(200, args.groups - n))])
            await asyncio.sleep(2.0 * 200 / args.groups)
        created = time.time() - started

        async def background_alerts():  # firing alerts keep coming to the same groups meanwhile
            i = 0
            while True:
                await store.add_alerts([NewAlert("bench", f"g{(i + k) % args.groups}", "{}") for k in range(50)])
                i += 50
                await asyncio.sleep(0.01)

        noise = asyncio.create_task(background_alerts())
        deadline = time.time() + args.wait + 30
        while time.time() < deadline:
            await asyncio.sleep(0.5)
            (left,) = await store._fetch("SELECT count(*) FROM escalations WHERE state = 'running'")
            if left[0] == 0:
                break
        noise.cancel()
        await engine.stop()
        await store.close()
        db = sqlite3.connect(Path(tmp) / "lateness.db")
        rows = db.execute(
            "SELECT t.at - (g.created_at + ?) FROM timeline t JOIN alert_groups g ON g.id = t.group_id"
            " WHERE t.event = 'escalation_step' AND t.detail LIKE '%resolve%'", (args.wait,)).fetchall()
        (alerts,) = db.execute("SELECT count(*) FROM alerts").fetchone()
        db.close()
    late = sorted(r[0] for r in rows)
    if not late:
        print("no step ran")
        return
    pick = lambda q: late[min(len(late) - 1, int(len(late) * q))]  # noqa: E731
    print(f"{args.groups} groups created in {created:.1f} s, each waiting {args.wait:g} s, "
          f"{alerts} alerts stored meanwhile")
    print(f"steps run: {len(late)}  lateness p50 {pick(0.5) * 1000:.0f} ms  p99 {pick(0.99) * 1000:.0f} ms  "
          f"max {late[-1] * 1000:.0f} ms  (target: within 1 s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=10000)
    ap.add_argument("--wait", type=float, default=5.0)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
