"""What both storage engines share: the one writer with its group commit, writes as functions
it runs inside its transaction, what those functions do to groups (deciding nothing: the
grouping rules handed to the store decide), and the reads.

The SQL here is the common subset of SQLite and PostgreSQL with `?` placeholders; each
engine's transaction (a `Tx`) runs it in its own dialect.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .values import (GROUP_COLUMNS, GROUP_INSERT, GROUP_SELECT, GROUP_UPDATE, Group, InvalidTransition, NewAlert,
                     NotFound, OverLimit, StoredAlert, StoreUnavailable, group_of, public_id, row_id)

log = logging.getLogger("tocsin.store")

BATCH_MAX = 256  # bounds how long one batch's writes hold the event loop
PARAMS_MAX = 400
# Group commit: before each commit the writer lets the loop turn a few times (reading and
# parsing requests that have arrived) and waits for announced writes, at most 2 ms.
# Measured with 64 clients on SQLite: batches of ~30 instead of ~13, and ~30% more alerts/s.
_GATHER_TURNS = 3
_GATHER_SECONDS = 0.002
# How long a maintenance read is reused: another process (`tocsin maintenance`, another
# instance) is seen within this; this process's own changes at once.
MAINTENANCE_FRESH = 0.5
# A notification attempt is claimed for this long past its notifier's timeout: an instance
# that dies while sending leaves it to another one once the lease ends (same Idempotency-Key).
LEASE_MARGIN = 5.0
_MAINTENANCE_FIELDS = ("mode", "started_at", "ends_at", "group_id")
_RATE = "\0rate"  # the lock name of an integration's rate-limit counter, beside its grouping keys
_NOTIFICATION_COLUMNS = "id, group_id, notifier, event, step, created_at, state, due_at"


class Tx(Protocol):
    """One engine's open transaction, as the shared write functions use it."""

    skip_locked: str  # appended to a SELECT that claims rows: " FOR UPDATE SKIP LOCKED" where it means something
    for_update: str   # appended to a SELECT of rows the batch will change: " FOR UPDATE" where it means something

    def indexed_by(self, index: str) -> str: """An index hint in this dialect ("" where there is none)."""
    async def fetch(self, sql: str, params=()) -> list[tuple]: """Rows of a query."""
    async def execute(self, sql: str, params=()) -> int: """Run a statement; the rows it changed."""
    async def executemany(self, sql: str, rows: list[tuple]) -> None: """Run a statement per row."""
    async def next_seq(self, table: str) -> int: """A fresh row number for alert_groups or alerts."""
    async def lock_keys(self, keys: list[tuple[str, str]]) -> None:
        """Hold (integration, grouping key) pairs until commit: one writer per key at a time."""


@dataclass
class Job:
    """One write: a function the writer runs inside the batch's transaction (None: stop).
    `keys`, `resolve_keys` and `ids` name the groups it will look at, so the writer reads
    every group of a batch in a few indexed queries before running the functions."""

    fn: Callable[["Batch"], Any] | None
    future: asyncio.Future
    keys: tuple[tuple[str, str], ...] = ()          # (integration, grouping key)
    resolve_keys: tuple[tuple[str, str], ...] = ()
    ids: tuple[str, ...] = ()
    locks: tuple[tuple[str, str], ...] = ()  # more pairs to lock with the keys (rate-limit counters)


class Batch:
    """One transaction: the groups it touches, with the rows it will write."""

    def __init__(self, tx: Tx, now: float) -> None:
        self.tx = tx
        self.now = now
        self.by_id: dict[str, Group] = {}
        self.open: dict[tuple[str, str], Group] = {}
        self.resolved: dict[tuple[str, str], Group] = {}
        self.new_groups: list[Group] = []
        self.new_ids: set[str] = set()
        self.changed: dict[str, Group] = {}
        self.alert_rows: list[tuple] = []
        self.heartbeats: dict[str, float] = {}
        self.escalations: list[tuple] = []    # new escalation rows
        self.statements: list[tuple[str, tuple]] = []  # run in order after the inserts
        self.timeline: list[tuple] = []
        self.notifications: list[tuple] = []
        self.resume: set[str] = set()         # groups whose paused escalation a new alert resumes
        self.after: list[Callable[[], Any]] = []  # awaited last, after every row of the batch is written
        self.maintenance_seen: dict[str, dict | None] = {}
        self.labels: set[tuple[str, str, int]] = set()  # (key, value, group seq) for group_labels

    def remember(self, g: Group) -> Group:
        known = self.by_id.get(g.id)
        if known is not None:
            return known
        self.by_id[g.id] = g
        if g.open == 1:
            self.open[(g.integration_id, g.grouping_key)] = g
        return g

    def touch(self, g: Group) -> None:
        if g.id not in self.new_ids:
            self.changed[g.id] = g

    def change(self, g: Group, changes: dict) -> None:
        """Apply the rules' field changes to `g`, keeping the open/resolved maps right."""
        for name, value in changes.items():
            setattr(g, name, value)
        if g.open is None:
            self.open.pop((g.integration_id, g.grouping_key), None)
            if g.state == "resolved":
                self.resolved[(g.integration_id, g.grouping_key)] = g
        self.touch(g)

    async def new_group(self, **fields) -> Group:
        """A group created in this batch, with its row number and id."""
        seq = await self.tx.next_seq("alert_groups")
        g = Group(seq=seq, id=row_id("I", seq), **fields)
        self.new_groups.append(g)
        self.new_ids.add(g.id)
        self.by_id[g.id] = g
        return g

    async def new_alert_id(self) -> tuple[int, str]:
        seq = await self.tx.next_seq("alerts")
        return seq, row_id("A", seq)

    async def maintenance(self, integration_id: str) -> dict | None:
        """The integration's maintenance as this transaction sees it (read once per batch)."""
        if integration_id not in self.maintenance_seen:
            rows = await self.tx.fetch("SELECT mode, started_at, ends_at, group_id FROM maintenance"
                                       " WHERE integration_id = ?", (integration_id,))
            self.maintenance_seen[integration_id] = dict(zip(_MAINTENANCE_FIELDS, rows[0])) if rows else None
        return self.maintenance_seen[integration_id]


class _Expected:
    def __init__(self, store: "Writer"):
        self.store = store

    def __enter__(self):
        self.store._expected += 1
        return self

    def __exit__(self, *exc):
        self.store._expected -= 1
        return False


class _NeedCount(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds


def chunks(items: list, size: int = PARAMS_MAX):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


class Writer:
    """The writes of a store (mixed into each engine). The engine provides `_commit(jobs)`
    (one transaction over the jobs: `prepare` inside it, then COMMIT), `rules`, and the
    queue; everything else is here, the same for both."""

    rules: Any
    # Which interrupted attempts a starting process takes over: all of them where one process
    # serves the database (SQLite, held by the serve lock); where processes share it, those
    # whose lease has ended (the others are still being attempted by a live process).
    recover_all: bool = True
    lifecycle_events: dict[str, frozenset[str]]
    _queue: asyncio.Queue
    _closing: bool
    _task: asyncio.Task | None
    _expected: int
    _stalled_since: float | None
    _maintenance: tuple[float, dict[str, dict]] | None

    async def readiness(self, timeout: float = 5.0) -> str | None:
        """Why an alert could not be committed right now, or None: what /readyz answers. Beyond
        the engine's `problem()`, it commits one real write (the engine's `ping()`)."""
        problem = self.problem()
        if problem is not None:
            return problem
        try:
            await asyncio.wait_for(self.ping(), timeout)
        except StoreUnavailable as exc:
            return str(exc)
        except TimeoutError:
            return f"writer stuck: a write took more than {timeout:.0f}s"
        return None

    def _report(self, problem: str | None) -> None:
        """Log a problem once when it starts, and once when it is over."""
        if problem == self._reported:
            return
        if problem is not None:
            log.error("database unavailable, writes refused", extra={"reason": problem})
        else:
            log.info("database available again")
        self._reported = problem

    def _refuse(self, jobs: list[Job], reason: str) -> None:
        """None of these writes is kept: each caller gets StoreUnavailable (503 / 451)."""
        self._last_error = reason
        self._report(reason)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(StoreUnavailable(reason))

    def _committed(self, jobs: list[Job], results, started: float) -> None:
        """After a durable commit: the database is fine again, and each write gets its answer."""
        self._stalled_since = self._last_error = None
        self._report(None)
        if self.on_commit is not None:
            self.on_commit(len(jobs), time.perf_counter() - started)
        for job, value, error in results:
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)

    async def _commit(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    # -- the queue and group commit ------------------------------------------------------

    def _submit(self, fn: Callable[[Batch], Any], *, keys=(), resolve_keys=(), ids=(), locks=()) -> asyncio.Future:
        """Queue a write: `fn(batch)` (a coroutine function) runs inside the writer's next
        transaction; the future gets its return value once that transaction is committed."""
        if self._closing or self._task is None or self._task.done():
            raise StoreUnavailable("the database is not accepting writes")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Job(fn, future, tuple(keys), tuple(resolve_keys), tuple(ids), tuple(locks)))
        except asyncio.QueueFull:
            raise StoreUnavailable("the write queue is full") from None
        return future

    def expect(self) -> _Expected:
        """Announce a write that is on its way (being rendered): the writer waits a moment for it."""
        return _Expected(self)

    async def _gather(self) -> None:
        """Before a commit, let writes already on their way join it, so one commit covers more.

        A few turns of the loop read and parse requests that have arrived; announced writes
        (see expect) are waited for too, but never longer than _GATHER_SECONDS.
        """
        deadline = time.monotonic() + _GATHER_SECONDS
        turns = 0
        while turns < _GATHER_TURNS or (self._expected > self._queue.qsize() and time.monotonic() < deadline):
            await asyncio.sleep(0)
            turns += 1

    async def _run(self) -> None:
        while True:
            if self._queue.empty():
                self._stalled_since = None  # nothing waits: whatever failed last, nothing is stuck
            jobs = [await self._queue.get()]
            await self._gather()
            while len(jobs) < BATCH_MAX and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            stop = any(j.fn is None for j in jobs)
            work = [j for j in jobs if j.fn is not None]
            if work:
                await self._commit(work)
            for j in jobs:
                if j.fn is None and not j.future.done():
                    j.future.set_result(None)
            if stop:
                # Whatever was queued behind the stop still gets its answer.
                while not self._queue.empty():
                    rest = [self._queue.get_nowait()]
                    await self._commit([j for j in rest if j.fn is not None])
                return

    async def _stop_writer(self) -> None:
        if self._task is not None:
            await self._queue.put(Job(None, asyncio.get_running_loop().create_future()))
            await self._task

    async def prepare(self, batch: Batch, jobs: list[Job]) -> list[tuple[Job, Any, BaseException | None]]:
        """Run the jobs inside the engine's open transaction and write their rows, up to
        (not including) COMMIT. A refused action fails its job alone."""
        await self._load(batch, jobs)
        results: list[tuple[Job, Any, BaseException | None]] = []
        for job in jobs:
            try:
                results.append((job, await job.fn(batch), None))
            except (InvalidTransition, NotFound, OverLimit) as exc:  # raised before the job changed anything
                results.append((job, None, exc))
        await self._write(batch)
        return results

    # -- the public writes -----------------------------------------------------------------

    def add_alerts(self, alerts: list[NewAlert]) -> "asyncio.Future[list[StoredAlert | None]]":
        """Queue alerts to be stored atomically and durably. Await the result: where each
        landed (None: an only_if_open alert that found no open group), once committed.
        Raises StoreUnavailable at once when nothing can be queued."""
        async def write(batch: Batch) -> list[StoredAlert | None]:
            await self._admit(batch, alerts)
            return [await self._place(batch, a) for a in alerts]
        return self._submit(write, keys={(a.integration_id, a.grouping_key) for a in alerts},
                            resolve_keys={(a.integration_id, a.grouping_key) for a in alerts if a.resolve},
                            locks={(a.integration_id, _RATE) for a in alerts if a.rate_limit})

    async def act(self, group_id: str, action: str, *, delay: int | None = None, by: str = "user") -> Group:
        """Apply a group action (acknowledge, resolve, …) durably."""
        async def write(batch: Batch) -> Group:
            g = batch.by_id.get(group_id)
            if g is None:
                raise NotFound(f"Alert group {group_id} not found")
            await self._act(batch, g, action, batch.now, by=by, delay=delay)
            return Group(**{c: getattr(g, c) for c in GROUP_COLUMNS})
        return await self._submit(write, ids=(group_id,))

    async def heartbeat(self, integration_id: str) -> str | None:
        """Record a heartbeat ping durably; return the state before it (None, alive, expired)."""
        async def write(batch: Batch) -> str | None:
            rows = await batch.tx.fetch("SELECT state FROM heartbeats WHERE integration_id = ?", (integration_id,))
            batch.heartbeats[integration_id] = batch.now
            return rows[0][0] if rows else None  # the state before this ping: "expired" means restored
        return await self._submit(write)

    async def heartbeat_expired(self, integration_id: str, last_seen: float) -> bool:
        """Mark a heartbeat expired, unless a ping came after `last_seen` or another process
        marked it first: True for the one caller that did."""
        async def write(batch: Batch) -> bool:
            return await batch.tx.execute(
                "UPDATE heartbeats SET state = 'expired' WHERE integration_id = ? AND last_seen = ?"
                " AND state = 'alive'", (integration_id, last_seen)) == 1
        return await self._submit(write)

    async def escalate(self, planner, now: float | None = None, limit: int = 1000) -> int:
        """Run the escalation steps due by `now`; return how many escalations were looked at."""
        return await self._submit(lambda batch: self._escalate(batch, now or batch.now, limit, planner))

    async def attempt_start(self, notification_id: str, lease: float = 10.0 + LEASE_MARGIN) -> int | None:
        """Durably claim a due notification and record that an attempt begins (before anything
        is sent): its number, or None when it is not due (sent, or claimed by another process
        whose lease has not ended). The claim lasts `lease` seconds."""
        return await self._submit(lambda batch: self._attempt_start(batch, notification_id, lease))

    async def attempt_result(self, notification_id: str, attempt: int, ok: bool, detail: str,
                             retry_at: float | None) -> str:
        """Record an attempt's outcome (and when to retry); the notification's new state."""
        return await self._submit(
            lambda batch: self._attempt_result(batch, batch.now, notification_id, attempt, ok, detail, retry_at))

    async def recover_notifications(self) -> list[str]:
        """Mark attempts cut off by a stop as interrupted (retried now); the notifier of each."""
        return await self._submit(lambda batch: self._recover_notifications(batch, batch.now))

    async def maintenance_start(self, integration_id: str, mode: str, seconds: float, title: str) -> dict:
        """Start an integration's maintenance (InvalidTransition if it is on); its info as stored."""
        try:
            return await self._submit(
                lambda batch: self._maintenance_start(batch, batch.now, integration_id, mode, seconds, title))
        finally:
            self._maintenance = None

    async def maintenance_stop(self, integration_id: str, by: str = "stop maintenance") -> int:
        """End maintenance; in maintenance mode its group and every attached group are resolved."""
        try:
            return await self._submit(lambda batch: self._maintenance_stop(batch, batch.now, integration_id, by))
        finally:
            self._maintenance = None

    async def prune(self, resolved_before: float, limit: int = 500) -> int:
        """Delete up to `limit` groups resolved before the given time, with their alerts."""
        pruned: list[int] = []

        async def write(batch: Batch) -> None:
            async def last() -> None:  # after the batch's other writes: groups they touch stay
                pruned.append(await self._prune(batch, resolved_before, limit))
            batch.after.append(last)
        await self._submit(write)
        return pruned[-1] if pruned else 0  # the committed run (a retried batch runs it again)

    async def expire_silences(self, now: float | None = None) -> list[str]:
        """Unsilence every group whose silence has ended; return their ids."""
        async def write(batch: Batch) -> list[str]:
            rows = await batch.tx.fetch(f"{GROUP_SELECT} WHERE state = 'silenced' AND silenced_until <= ?"
                                        f"{batch.tx.skip_locked}", (now or batch.now,))
            ended = [g for g in (batch.remember(group_of(r)) for r in rows) if g.state == "silenced"]
            for g in ended:
                batch.change(g, self.rules.silence_ended(g))
                await self._lifecycle(batch, g, "unsilenced", batch.now, "silence ended")
            return [g.id for g in ended]
        return await self._submit(write)

    # -- what the writes do inside the transaction --------------------------------------------

    async def _load(self, batch: Batch, jobs: list[Job]) -> None:
        """Read every group the batch's jobs name, in a few indexed queries. On an engine many
        processes share, the keys are locked first: an alert for a key another process is
        placing waits for that commit and then sees its group."""
        tx = batch.tx
        keys = sorted({k for job in jobs for k in job.keys})
        locks = sorted({k for job in jobs for k in job.locks} | set(keys))
        resolve_keys = sorted({k for job in jobs for k in job.resolve_keys})
        ids = sorted({i for job in jobs for i in job.ids})
        if locks:
            await tx.lock_keys(locks)
        names = sorted({k for _, k in keys})
        for chunk in chunks(names):
            for row in await tx.fetch(f"{GROUP_SELECT} WHERE open = 1 AND grouping_key IN ({marks(len(chunk))})"
                                      f"{tx.for_update}", chunk):
                batch.remember(group_of(row))
        for chunk in chunks(sorted({k for _, k in resolve_keys})):
            rows = await tx.fetch(
                # INDEXED BY on SQLite: without statistics its planner preferred ix_groups_state and
                # scanned every resolved group (40 ms at 200,000 groups instead of 0.3 ms).
                f"{GROUP_SELECT} WHERE seq IN (SELECT max(seq) FROM alert_groups {tx.indexed_by('ix_groups_resolved')}"
                f" WHERE grouping_key IN ({marks(len(chunk))}) AND state = 'resolved'"
                f" GROUP BY grouping_key, integration_id){tx.for_update}", chunk)
            for row in rows:
                g = batch.remember(group_of(row))
                batch.resolved[(g.integration_id, g.grouping_key)] = g
        for chunk in chunks(ids):
            for row in await tx.fetch(f"{GROUP_SELECT} WHERE id IN ({marks(len(chunk))}){tx.for_update}", chunk):
                batch.remember(group_of(row))

    async def _act(self, batch: Batch, g: Group, action: str, now: float, *, by: str,
                   delay: int | None = None) -> None:
        batch.change(g, self.rules.transition(g, action, now, by=by, delay=delay))
        await self._lifecycle(batch, g, self.rules.EVENT_OF[action], now, by)

    async def _lifecycle(self, batch: Batch, g: Group, event: str, now: float, by: str) -> None:
        """What a state change sets off (the rules say which): a timeline entry, the
        escalation stopped or restarted, and the lifecycle notifications."""
        batch.timeline.append((g.id, now, event, json.dumps({"by": by})))
        if g.id in batch.new_ids:
            return  # created in this batch: its escalation row is written in its final state
        effect = self.rules.escalation_after(event, g)
        if effect == "stop":
            batch.statements.append(("UPDATE escalations SET state = 'stopped', due_at = NULL"
                                     " WHERE group_id = ? AND state IN ('running', 'paused')", (g.id,)))
        elif effect == "restart":
            batch.statements.append(("UPDATE escalations SET state = 'running', step = 0, repeats = 0, due_at = ?"
                                     " WHERE group_id = ?", (now, g.id)))
        if self.lifecycle_events:
            reached = {r[0] for r in await batch.tx.fetch(
                "SELECT DISTINCT notifier FROM notifications WHERE group_id = ? AND event = 'triggered'", (g.id,))}
            reached.update(n[2] for n in batch.notifications if n[1] == g.id and n[3] == "triggered")
            for notifier in self.rules.lifecycle_notifiers(event, reached, self.lifecycle_events):
                batch.notifications.append((public_id("N"), g.id, notifier, event, None, now, "pending", now))

    async def _admit(self, batch: Batch, alerts: list[NewAlert]) -> None:
        """Count a request's rate-limited alerts against their integrations' windows (their
        counters are locked for the batch), all or nothing: OverLimit before anything is
        written when one does not fit."""
        wanted: dict[tuple[str, tuple[int, float]], int] = {}
        for a in alerts:
            if a.rate_limit:
                wanted[(a.integration_id, a.rate_limit)] = wanted.get((a.integration_id, a.rate_limit), 0) + 1
        tx, now = batch.tx, batch.now
        for (iid, (limit, seconds)), n in wanted.items():
            await tx.execute("DELETE FROM admissions WHERE integration_id = ? AND at <= ?", (iid, now - seconds))
            (count,) = (await tx.fetch("SELECT count(*) FROM admissions WHERE integration_id = ?", (iid,)))[0]
            if count + n > limit:
                # Room for n once this many of the oldest admissions have aged out of the window.
                rows = await tx.fetch("SELECT at FROM admissions WHERE integration_id = ? ORDER BY at LIMIT 1 OFFSET ?",
                                      (iid, count + n - limit - 1))
                raise OverLimit(max(0.0, (rows[0][0] if rows else now) + seconds - now))
        for (iid, _), n in wanted.items():
            await tx.executemany("INSERT INTO admissions (integration_id, at) VALUES (?, ?)", [(iid, now)] * n)

    async def _place(self, batch: Batch, a: NewAlert) -> StoredAlert | None:
        """Store one alert where the rules put it (CONTRACT §7), with what its conditions set off.
        An only_if_open alert with no open group is not stored (None)."""
        key = (a.integration_id, a.grouping_key)
        g = self.rules.placement(a, batch.open.get(key), batch.resolved.get(key))
        if g is None:
            return None
        now = a.received_at
        created = g is self.rules.NEW
        maintenance = None
        if created:
            maintenance = await batch.maintenance(a.integration_id)
            g = await batch.new_group(**self.rules.new_group(a, maintenance))
            batch.open[key] = g
        elif g.id not in batch.new_ids:
            batch.resume.add(g.id)
        alert_seq, alert_id = await batch.new_alert_id()
        changes, events = self.rules.arrival(g, a, alert_id, now)
        batch.change(g, changes)
        for event in events:
            await self._lifecycle(batch, g, event, now, "source")
        if created:
            start = self.rules.escalation_start(a, g.state, maintenance)
            if start is not None:
                batch.escalations.append((g.id, a.escalation, start, now if start == "running" else None))
        batch.alert_rows.append(
            (alert_seq, alert_id, g.id, a.integration_id, now, a.source, int(a.resolve), a.payload_json, a.raw)
        )
        if a.receipt is not None:
            batch.statements.append(("INSERT INTO receipts (key, alert_id, created_at) VALUES (?, ?, ?)",
                                     (a.receipt, alert_id, now)))
        batch.labels.update((k, v, g.seq) for k, v in a.labels)
        return StoredAlert(alert_id, g.id, a.grouping_key, created, g.state)

    async def _escalate(self, batch: Batch, now: float, limit: int, planner) -> int:
        """Run every due escalation step: `planner(chain_json, step, repeats, now, count, due_at)`
        returns what to do (escalation.chains.Plan). The due rows are claimed (skipped by any
        other process claiming at the same time), so each step runs once."""
        tx = batch.tx
        rows = await tx.fetch(
            "SELECT group_id, chain, step, repeats, due_at FROM escalations WHERE state = 'running' AND due_at <= ?"
            f" ORDER BY due_at LIMIT ?{tx.skip_locked}", (now, limit))
        if not rows:
            return 0
        for chunk in chunks(sorted({r[0] for r in rows})):
            for row in await tx.fetch(f"{GROUP_SELECT} WHERE id IN ({marks(len(chunk))}){tx.for_update}", chunk):
                batch.remember(group_of(row))
        for group_id, chain, step, repeats, due_at in rows:
            g = batch.by_id.get(group_id)
            if g is None or g.state != "new":
                batch.statements.append(("UPDATE escalations SET state = 'stopped', due_at = NULL WHERE group_id = ?",
                                         (group_id,)))
                continue
            plan = await self._plan(tx, g, planner, chain, step, repeats, now, due_at)
            batch.statements.append(("UPDATE escalations SET step = ?, repeats = ?, state = ?, due_at = ?"
                                     " WHERE group_id = ?", (plan.step, plan.repeats, plan.state, plan.due_at, g.id)))
            for event, detail in plan.timeline:
                batch.timeline.append((g.id, now, event, json.dumps(detail)))
            for notifier, index in plan.notify:
                batch.notifications.append((public_id("N"), g.id, notifier, "triggered", index, now, "pending", now))
            if plan.resolve:
                await self._act(batch, g, "resolve", now, by="escalation")
        return len(rows)

    async def _plan(self, tx: Tx, g: Group, planner, chain, step, repeats, now, due_at):
        """The planner is pure and asks for alert counts as it goes: each count it needs is
        read, and it is asked again (a chain has a few window steps at most)."""
        counts: dict[float, int] = {}

        def count(seconds: float) -> int:
            if seconds not in counts:
                raise _NeedCount(seconds)
            return counts[seconds]

        while True:
            try:
                return planner(chain, step, repeats, now, count, due_at)
            except _NeedCount as need:
                last = g.last_alert_at or now
                counts[need.seconds] = (await tx.fetch(
                    "SELECT count(*) FROM alerts WHERE alert_group_id = ? AND created_at >= ?",
                    (g.id, last - need.seconds)))[0][0]

    async def _attempt_start(self, batch: Batch, notification_id: str, lease: float) -> int | None:
        tx = batch.tx
        rows = await tx.fetch("SELECT attempts, results FROM notifications WHERE id = ? AND state = 'pending'"
                              f" AND due_at <= ?{tx.skip_locked}", (notification_id, batch.now))
        if not rows:
            return None
        attempts, results = rows[0]
        if attempts > results:  # a process that claimed it stopped during its attempt: say so
            await self._interrupted(batch, notification_id, attempts)
        await tx.execute("UPDATE notifications SET attempts = attempts + 1, results = ?, due_at = ? WHERE id = ?",
                         (attempts, batch.now + lease, notification_id))
        return attempts + 1

    async def _interrupted(self, batch: Batch, notification_id: str, attempt: int) -> None:
        rows = await batch.tx.fetch("SELECT group_id, notifier, event FROM notifications WHERE id = ?",
                                    (notification_id,))
        group_id, notifier, event = rows[0]
        batch.timeline.append((group_id, batch.now, "notification", json.dumps({
            "id": notification_id, "notifier": notifier, "event": event, "attempt": attempt,
            "outcome": "interrupted", "detail": "the process stopped during the attempt; outcome unknown",
            "next_attempt_at": batch.now,
        })))

    async def _attempt_result(self, batch: Batch, now: float, notification_id: str, attempt: int, ok: bool,
                              detail: str, retry_at: float | None) -> str:
        rows = await batch.tx.fetch("SELECT group_id, notifier, event, attempts FROM notifications WHERE id = ?",
                                    (notification_id,))
        if not rows:
            return "gone"
        group_id, notifier, event, attempts = rows[0]
        if attempts != attempt:
            return "superseded"  # our lease ran out and another process attempted it since
        state = "sent" if ok else ("pending" if retry_at is not None else "failed")
        batch.statements.append(("UPDATE notifications SET state = ?, results = ?, due_at = ?, last_detail = ?"
                                 " WHERE id = ?", (state, attempt, retry_at, detail, notification_id)))
        batch.timeline.append((group_id, now, "notification", json.dumps({
            "id": notification_id, "notifier": notifier, "event": event, "attempt": attempt,
            "outcome": "sent" if ok else ("retrying" if retry_at is not None else "failed"),
            "detail": detail, "next_attempt_at": retry_at,
        })))
        return state

    async def _recover_notifications(self, batch: Batch, now: float) -> list[str]:
        """Attempts that began before a stop and never recorded an outcome, whose claim has
        ended: say so, retry now."""
        due, params = ("", ()) if self.recover_all else (" AND due_at <= ?", (now,))
        rows = await batch.tx.fetch(
            "SELECT id, notifier, attempts FROM notifications WHERE state = 'pending' AND attempts > results"
            f"{due}{batch.tx.skip_locked}", params)
        for nid, _, attempts in rows:
            await self._interrupted(batch, nid, attempts)
            batch.statements.append(("UPDATE notifications SET results = attempts, due_at = ? WHERE id = ?",
                                     (now, nid)))
        return [r[1] for r in rows]


    async def _maintenance_start(self, batch: Batch, now: float, iid: str, mode: str, seconds: float,
                                 title: str) -> dict:
        await batch.tx.lock_keys([(iid, "maintenance")])
        self.rules.maintenance_startable(await batch.maintenance(iid))
        group_id = None
        if mode == "maintenance":
            g = await batch.new_group(integration_id=iid, grouping_key=f"maintenance:{public_id('M')}", state="new",
                                      open=None, route_id=None, title=title, alerts_count=0, created_at=now)
            group_id = g.id
            batch.timeline.append((g.id, now, "maintenance_started", json.dumps({"integration": iid})))
        info = {"mode": mode, "started_at": now, "ends_at": now + seconds, "group_id": group_id}
        batch.statements.append(("INSERT INTO maintenance (integration_id, mode, started_at, ends_at, group_id)"
                                 " VALUES (?, ?, ?, ?, ?)", (iid, mode, now, now + seconds, group_id)))
        batch.maintenance_seen[iid] = info  # later writes of this batch see it
        return dict(info)

    async def _maintenance_stop(self, batch: Batch, now: float, iid: str, by: str) -> int:
        await batch.tx.lock_keys([(iid, "maintenance")])
        info = await batch.maintenance(iid)
        self.rules.maintenance_stoppable(info)
        batch.statements.append(("DELETE FROM maintenance WHERE integration_id = ?", (iid,)))
        batch.maintenance_seen[iid] = None
        resolved = 0
        if info["group_id"]:
            rows = await batch.tx.fetch(f"{GROUP_SELECT} WHERE (id = ? OR root_group_id = ?) AND state != 'resolved'"
                                        f"{batch.tx.for_update}", (info["group_id"], info["group_id"]))
            for row in rows:
                g = batch.remember(group_of(row))
                if g.state != "resolved":
                    await self._act(batch, g, "resolve", now, by=by)
                    resolved += 1
        return resolved

    async def _write(self, batch: Batch) -> None:
        tx = batch.tx
        if batch.new_groups:
            await tx.executemany(GROUP_INSERT, [tuple(getattr(g, c) for c in GROUP_COLUMNS) for g in batch.new_groups])
        if batch.escalations:
            await tx.executemany("INSERT INTO escalations (group_id, chain, state, due_at) VALUES (?, ?, ?, ?)",
                                 batch.escalations)
        if batch.changed:
            await tx.executemany(
                GROUP_UPDATE,
                [tuple(getattr(g, c) for c in GROUP_COLUMNS[4:]) + (g.id,) for g in batch.changed.values()],
            )
        if batch.resume:
            # A paused "if_alerts_in_window" step looks again when the group gets an alert.
            await tx.executemany("UPDATE escalations SET state = 'running', due_at = ? WHERE group_id = ?"
                                 " AND state = 'paused'", [(batch.now, gid) for gid in sorted(batch.resume)])
        for sql, params in batch.statements:
            await tx.execute(sql, params)
        if batch.timeline:
            await tx.executemany("INSERT INTO timeline (group_id, at, event, detail) VALUES (?, ?, ?, ?)",
                                 batch.timeline)
        if batch.notifications:
            await tx.executemany(f"INSERT INTO notifications ({_NOTIFICATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 batch.notifications)
        if batch.heartbeats:
            await tx.executemany(
                "INSERT INTO heartbeats (integration_id, last_seen, state) VALUES (?, ?, 'alive')"
                " ON CONFLICT (integration_id) DO UPDATE SET last_seen = excluded.last_seen, state = 'alive'",
                sorted(batch.heartbeats.items()),
            )
        if batch.alert_rows:
            await tx.executemany(
                "INSERT INTO alerts (seq, id, alert_group_id, integration_id, created_at, source,"
                " is_resolve_signal, payload, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch.alert_rows,
            )
        if batch.labels:
            await tx.executemany("INSERT INTO group_labels (key, value, group_seq) VALUES (?, ?, ?)"
                                 " ON CONFLICT DO NOTHING", sorted(batch.labels))
        for step in batch.after:
            await step()

    async def _prune(self, batch: Batch, before: float, limit: int) -> int:
        """Delete up to `limit` groups resolved before `before`, with everything of theirs."""
        tx = batch.tx
        ids = [r[0] for r in await tx.fetch(
            "SELECT id FROM alert_groups WHERE state = 'resolved' AND resolved_at < ? ORDER BY seq LIMIT ?",
            (before, limit),
        ) if r[0] not in batch.by_id]  # groups this batch touches stay
        for chunk in chunks(ids):
            await tx.execute("DELETE FROM group_labels WHERE group_seq IN"
                             f" (SELECT seq FROM alert_groups WHERE id IN ({marks(len(chunk))}))", chunk)
            for table, column in (("alerts", "alert_group_id"), ("timeline", "group_id"),
                                  ("notifications", "group_id"), ("escalations", "group_id"),
                                  ("alert_groups", "id")):
                await tx.execute(f"DELETE FROM {table} WHERE {column} IN ({marks(len(chunk))})", chunk)
        return len(ids)


class Reader:
    """The reads of a store (mixed into each engine, which provides `_fetch(sql, params)`)."""

    _maintenance: tuple[float, dict[str, dict]] | None

    async def _fetch(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        raise NotImplementedError

    async def maintenance(self) -> dict[str, dict]:
        """Integration id -> {mode, started_at, ends_at, group_id} for every maintenance on now.
        Read from the database (reused for MAINTENANCE_FRESH seconds; this process's own
        changes are seen at once), so every process serving the database sees the same."""
        cached = self._maintenance
        if cached is not None and time.monotonic() - cached[0] < MAINTENANCE_FRESH:
            return cached[1]
        rows = await self._fetch("SELECT integration_id, mode, started_at, ends_at, group_id FROM maintenance")
        info = {r[0]: dict(zip(_MAINTENANCE_FIELDS, r[1:])) for r in rows}
        self._maintenance = (time.monotonic(), info)
        return info

    async def receipts_seen(self, keys: list[str]) -> set[str]:
        """Which of these source receipts (see NewAlert.receipt) are already committed."""
        seen: set[str] = set()
        for chunk in chunks(sorted(set(keys))):
            seen.update(r[0] for r in await self._fetch(f"SELECT key FROM receipts WHERE key IN ({marks(len(chunk))})",
                                                        chunk))
        return seen

    async def get_group(self, group_id: str) -> Group | None:
        rows = await self._fetch(f"{GROUP_SELECT} WHERE id = ?", (group_id,))
        return group_of(rows[0]) if rows else None

    async def list_groups(
        self,
        *,
        state: str | None = None,
        integration_id: str | None = None,
        group_id: str | None = None,
        route_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        text: str | None = None,
        labels: tuple[tuple[str, str], ...] = (),
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[Group]]:
        """Groups newest first, with the total count for pagination; `text` is searched in
        titles (any case, anywhere), every (key, value) of `labels` must be the group's."""
        conditions = (("state = ?", state), ("integration_id = ?", integration_id), ("id = ?", group_id),
                      ("route_id = ?", route_id), ("created_at >= ?", since), ("created_at <= ?", until),
                      *_title_conditions(text))
        if labels:
            return await self._groups_with_labels(labels, conditions, limit, offset)
        clause, params = _where(conditions)
        (count,) = (await self._fetch(f"SELECT count(*) FROM alert_groups{clause}", params))[0]
        rows = await self._fetch(f"{GROUP_SELECT}{clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                                 [*params, limit, offset])
        return count, [group_of(r) for r in rows]

    # How the label filter joins group_labels to alert_groups; SQLite's CROSS JOIN keeps the
    # label index the outer loop (its planner may otherwise start from a state index).
    label_join = " JOIN "

    async def _groups_with_labels(self, labels: tuple[tuple[str, str], ...], conditions, limit: int,
                                  offset: int) -> tuple[int, list[Group]]:
        """list_groups with label filters, read off the rarest label's index range newest first,
        the other labels checked per row. Measured on SQLite, 100,000 groups (severity=critical,
        1 in 3): page 300 27 ms -> 9 ms and its count 33 ms -> 3 ms, against `seq IN (labels…)`."""
        sizes = []
        for key, value in dict.fromkeys(labels):
            (n,) = (await self._fetch("SELECT count(*) FROM group_labels WHERE key = ? AND value = ?", (key, value)))[0]
            if n == 0:
                return 0, []
            sizes.append((n, key, value))
        sizes.sort()
        (n, key, value), others = sizes[0], sizes[1:]
        extra = [("EXISTS (SELECT 1 FROM group_labels x WHERE x.key = ? AND x.value = ? AND x.group_seq = g.seq)",
                  (k, v)) for _, k, v in others]
        # The group conditions name alert_groups' columns unqualified: group_labels has none of them.
        clause, params = _where((("l.key = ?", key), ("l.value = ?", value), *conditions, *extra))
        tables = f" FROM group_labels l{self.label_join}alert_groups g ON g.seq = l.group_seq"
        if len(params) == 2:
            count = n
        else:
            (count,) = (await self._fetch(f"SELECT count(*){tables}{clause}", params))[0]
        rows = await self._fetch(
            "SELECT " + ", ".join(f"g.{c}" for c in GROUP_COLUMNS) + f"{tables}{clause}"
            " ORDER BY l.group_seq DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        return count, [group_of(r) for r in rows]

    async def labels_of(self, seqs: list[int]) -> dict[int, list[tuple[str, str]]]:
        """The labels of these groups (by row seq), sorted by key and value."""
        out: dict[int, list[tuple[str, str]]] = {}
        for chunk in chunks(sorted(set(seqs))):
            for key, value, seq in await self._fetch(
                f"SELECT key, value, group_seq FROM group_labels WHERE group_seq IN ({marks(len(chunk))})"
                " ORDER BY key, value", chunk,
            ):
                out.setdefault(seq, []).append((key, value))
        return out

    async def alerts_by_id(self, ids: list[str]) -> dict[str, dict]:
        """Alerts (without raw mail) keyed by id."""
        out: dict[str, dict] = {}
        for chunk in chunks(sorted(set(ids))):
            for row in await self._fetch(
                f"SELECT id, alert_group_id, integration_id, created_at, source, is_resolve_signal, payload"
                f" FROM alerts WHERE id IN ({marks(len(chunk))})", chunk
            ):
                out[row[0]] = _alert(row)
        return out

    async def list_alerts(
        self, *, alert_group_id: str | None = None, integration_id: str | None = None,
        limit: int = 50, offset: int = 0, newest_first: bool = False,
    ) -> tuple[int, list[dict]]:
        clause, params = _where((("alert_group_id = ?", alert_group_id), ("integration_id = ?", integration_id)))
        (count,) = (await self._fetch(f"SELECT count(*) FROM alerts{clause}", params))[0]
        order = "DESC" if newest_first else "ASC"
        rows = await self._fetch(
            "SELECT id, alert_group_id, integration_id, created_at, source, is_resolve_signal, payload"
            f" FROM alerts{clause} ORDER BY seq {order} LIMIT ? OFFSET ?", [*params, limit, offset]
        )
        return count, [_alert(r) for r in rows]

    async def heartbeats(self) -> dict[str, tuple[float, str]]:
        return {r[0]: (r[1], r[2]) for r in await self._fetch("SELECT integration_id, last_seen, state FROM heartbeats")}

    async def timeline(self, group_id: str) -> list[dict]:
        rows = await self._fetch("SELECT at, event, detail FROM timeline WHERE group_id = ? ORDER BY seq", (group_id,))
        return [{"at": r[0], "event": r[1], "detail": json.loads(r[2]) if r[2] else {}} for r in rows]

    async def escalation_of(self, group_id: str) -> dict | None:
        rows = await self._fetch("SELECT chain, step, repeats, state, due_at FROM escalations WHERE group_id = ?",
                                 (group_id,))
        if not rows:
            return None
        chain, step, repeats, state, due_at = rows[0]
        return {"chain": json.loads(chain), "step": step, "repeats": repeats, "state": state, "due_at": due_at}

    async def due_notifications(self, now: float, limit: int = 100) -> list[dict]:
        rows = await self._fetch(
            "SELECT id, group_id, notifier, event, step, attempts FROM notifications"
            " WHERE state = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?", (now, limit))
        return [dict(zip(("id", "group_id", "notifier", "event", "step", "attempts"), r)) for r in rows]

    async def notifications_of(self, group_id: str) -> list[dict]:
        rows = await self._fetch(
            "SELECT id, notifier, event, step, state, attempts, last_detail, created_at FROM notifications"
            " WHERE group_id = ? ORDER BY created_at, id", (group_id,))
        return [dict(zip(("id", "notifier", "event", "step", "state", "attempts", "detail", "created_at"), r))
                for r in rows]

    async def next_silence_end(self) -> float | None:
        rows = await self._fetch("SELECT min(silenced_until) FROM alert_groups WHERE state = 'silenced'")
        return rows[0][0] if rows else None

    async def next_escalation_due(self) -> float | None:
        rows = await self._fetch("SELECT min(due_at) FROM escalations WHERE state = 'running'")
        return rows[0][0] if rows else None

    async def raw_message(self, alert_id: str) -> bytes | None:
        rows = await self._fetch("SELECT raw FROM alerts WHERE id = ?", (alert_id,))
        return rows[0][0] if rows else None

    async def count_open_groups(self) -> list[tuple[str, str, int]]:
        """(integration_id, state, count) for every group still open or silenced/acked."""
        return [tuple(r) for r in await self._fetch(
            "SELECT integration_id, state, count(*) FROM alert_groups WHERE state != 'resolved'"
            " GROUP BY integration_id, state"
        )]


def _alert(row) -> dict:
    return {
        "id": row[0], "alert_group_id": row[1], "integration_id": row[2], "created_at": row[3],
        "source": row[4], "is_resolve_signal": bool(row[5]), "payload": row[6],
    }


def _where(conditions) -> tuple[str, list]:
    """A WHERE clause of the conditions whose value is not None, and its parameters (a tuple
    value: the parameters of a condition with several placeholders)."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    clause = (" WHERE " + " AND ".join(sql for sql, _ in used)) if used else ""
    return clause, [p for _, value in used for p in (value if isinstance(value, tuple) else (value,))]


def _title_conditions(text: str | None) -> list[tuple[str, Any]]:
    """The _where() condition for a title search: anywhere in the title, any case, the same
    SQL on both engines (LIKE with its wildcards escaped)."""
    if not text:
        return []
    pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return [("lower(title) LIKE ? ESCAPE '\\'", pattern)]
