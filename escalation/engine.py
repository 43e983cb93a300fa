"""The background side of tocsin: due escalation steps, notification delivery,
heartbeat expiry and the end of maintenance windows.

Everything it acts on lives in the database, so a restart picks up where the process
stopped: due steps run (late rather than never), interrupted deliveries are retried
under the same idempotency key. Work that another process writes to the same database
(`tocsin resolve` from the command line: its lifecycle notifications, a restarted
escalation) is found the same way, by the next tick's look for due rows.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp

from store import LEASE_MARGIN, InvalidTransition, InvalidWrite

from .chains import Chain, plan
from .notifiers import MAX_ATTEMPTS, Delivery, backoff, send

log = logging.getLogger("tocsin.escalation")

TICK = 0.25            # seconds between looks at due steps and deliveries
BATCH = 1000           # escalations advanced per transaction
MAX_SENDING = 16       # deliveries in flight at once


@functools.lru_cache(maxsize=256)
def _chain(snapshot: str) -> Chain:
    return Chain.from_json(snapshot)


def planner(snapshot: str, step: int, repeats: int, now: float, count: Callable[[float], int],
            due_at: float | None = None):
    """What the store calls for each due escalation (see store.Store.escalate); `due_at` is when it was due."""
    return plan(_chain(snapshot), step, repeats, now, count)


class Hooks:
    """What the engine reports as it works; the daemon passes its metrics, which has these methods."""

    def notification_attempt(self, notifier: str, outcome: str) -> None:
        """One delivery attempt ended: outcome is ok, retry, failed or interrupted."""

    def escalation_ran(self, steps: list[str], late: float | None) -> None:
        """A due escalation ran these step kinds, `late` seconds after it was due (None: unknown)."""

    def heartbeat(self, integration_id: str, event: str) -> None:
        """A heartbeat was "expired" or "restored"."""


def _iso(ts: float | None) -> str | None:
    if ts is None or ts != ts:
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, ValueError, OSError):  # a stored time past year 9999 must not stop a delivery
        return "9999-12-31T23:59:59.999999Z" if ts > 0 else "0001-01-01T00:00:00.000000Z"


class Engine:
    """Runs as tasks inside the daemon; `get_pipeline()` is the running config generation
    (its `settings` carry the notifiers, the public URL and the heartbeat timeouts)."""

    def __init__(self, store, get_pipeline: Callable[[], Any], hooks: Hooks | None = None):
        self.store = store
        self.hooks = hooks or Hooks()
        self.get_pipeline = get_pipeline
        self._tasks: list[asyncio.Task] = []
        self._sending: set[str] = set()
        self._slots = asyncio.Semaphore(MAX_SENDING)
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        recovered = await self.store.recover_notifications()
        for notifier in recovered:
            self.hooks.notification_attempt(notifier, "interrupted")
        if recovered:
            log.warning("notification attempts were interrupted by a stop; retrying them",
                        extra={"count": len(recovered)})
        for name, loop in (("escalations", self._escalations), ("deliveries", self._deliveries),
                           ("heartbeats", self._heartbeats), ("maintenance", self._maintenance)):
            self._tasks.append(asyncio.create_task(self._forever(name, loop), name=f"engine-{name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        """Look at due work now rather than at the next tick (a new group, an action)."""
        self._wake.set()

    async def _forever(self, name: str, step: Callable[[], Any]) -> None:
        while True:
            try:
                busy = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged and retried on the next tick
                log.warning("engine loop failed; retrying next tick", extra={"loop": name, "error": str(exc)})
                busy = False
            if not busy:
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()

    # -- escalation steps --------------------------------------------------------------

    async def _escalations(self) -> bool:
        """Advance every due escalation; True when there may be more right away."""
        due = await self.store.next_escalation_due()  # a read: the writer is only asked when needed
        if due is None or due > time.time():
            return False
        ran: list[tuple[list[str], float | None]] = []

        def run(snapshot, step, repeats, now, count, due_at=None):
            p = planner(snapshot, step, repeats, now, count)
            ran.append((p.ran, None if due_at is None else max(0.0, now - due_at)))
            return p

        looked_at = await self.store.escalate(run, limit=BATCH)
        for steps, late in ran:  # reported once committed: a refused batch ran nothing
            self.hooks.escalation_ran(steps, late)
        return looked_at >= BATCH

    # -- deliveries --------------------------------------------------------------------

    async def _deliveries(self) -> bool:
        due = await self.store.due_notifications(time.time(), 200)
        for n in due:
            if n["id"] in self._sending:
                continue
            self._sending.add(n["id"])
            asyncio.create_task(self._deliver(n))
        return False

    async def _deliver(self, n: dict) -> None:
        try:
            async with self._slots:
                await self._deliver_once(n)
        except Exception as exc:  # noqa: BLE001 - the attempt stays recorded as started; retried after restart
            log.warning("delivery failed unexpectedly",
                        extra={"notification": n["id"], "notifier": n["notifier"], "error": str(exc)})
        finally:
            self._sending.discard(n["id"])

    async def _deliver_once(self, n: dict) -> None:
        notifier = self.get_pipeline().settings.notifiers.get(n["notifier"])
        # Claimed and committed before anything is sent; the claim outlasts the attempt's own
        # timeout, after which another process (or a restart) may take the attempt over.
        lease = (notifier.timeout if notifier is not None else 0.0) + LEASE_MARGIN
        attempt = await self.store.attempt_start(n["id"], lease=lease)
        if attempt is None:
            return
        if notifier is None:
            await self.store.attempt_result(n["id"], attempt, False, "notifier no longer configured", None)
            self.hooks.notification_attempt(n["notifier"], "failed")
            return
        delivery = await self._delivery(n, attempt)
        if delivery is None:
            await self.store.attempt_result(n["id"], attempt, False, "alert group no longer exists", None)
            self.hooks.notification_attempt(n["notifier"], "failed")
            return
        result = await send(notifier, delivery, self._session)
        retry_at = None
        if not result.ok and result.retry and attempt < MAX_ATTEMPTS:
            retry_at = time.time() + backoff(attempt)
        await self.store.attempt_result(n["id"], attempt, result.ok, result.detail, retry_at)
        outcome = "ok" if result.ok else ("retry" if retry_at is not None else "failed")
        self.hooks.notification_attempt(n["notifier"], outcome)
        fields = {"notification": n["id"], "notifier": n["notifier"], "event": n["event"], "attempt": attempt,
                  "outcome": outcome, "detail": result.detail}
        if outcome == "failed":
            log.warning("notification failed for good", extra=fields)
        elif outcome == "retry":
            log.info("notification attempt failed, will retry",
                     extra={**fields, "retry_in": round(retry_at - time.time(), 3)})
        else:
            log.info("notification sent", extra=fields)

    async def _delivery(self, n: dict, attempt: int) -> Delivery | None:
        group = await self.store.get_group(n["group_id"])
        if group is None:
            return None
        pipeline = self.get_pipeline()
        integration = pipeline.by_id(group.integration_id)
        title, message, link = group.title, None, None
        if integration is not None and group.last_alert_id:
            last = (await self.store.alerts_by_id([group.last_alert_id])).get(group.last_alert_id)
            if last is not None:
                try:
                    payload = json.loads(last["payload"])
                except ValueError:
                    payload = {}
                d = await pipeline.decide(integration, payload, full=True, alert_group_id=group.id)
                title, message, link = group.title or d.title, d.message, d.source_link
        return Delivery(
            notification_id=n["id"],
            attempt=attempt,
            event=n["event"],
            alert_group={
                "id": group.id, "integration_id": group.integration_id, "route_id": group.route_id,
                "state": group.state, "alerts_count": group.alerts_count, "title": title, "message": message,
                "source_link": link, "created_at": _iso(group.created_at),
                "acknowledged_at": _iso(group.acknowledged_at), "resolved_at": _iso(group.resolved_at),
                "silenced_at": _iso(group.silenced_at), "permalink": f"{pipeline.settings.public_url}/ui/groups/{group.id}",
            },
            integration={"id": group.integration_id,
                         "name": integration.name if integration else group.integration_id,
                         "kind": integration.kind.slug if integration else None},
            step=n["step"],
        )

    # -- heartbeats --------------------------------------------------------------------

    async def _heartbeats(self) -> bool:
        timeouts = self.get_pipeline().settings.heartbeat_timeouts
        if not timeouts:
            return False
        now = time.time()
        beats = await self.store.heartbeats()
        for iid, timeout in timeouts.items():
            seen = beats.get(iid)
            # Armed only after the first ping; expired once per silence.
            if seen is None or seen[1] != "alive" or seen[0] + timeout > now:
                continue
            integration = self.get_pipeline().by_id(iid)
            if integration is None:
                continue
            # The alert first, then the mark: a crash in between tries again, never loses it.
            # The alert carries a receipt naming this silence, and a receipt is stored once:
            # where several processes serve the database (or a restart retries), one alert
            # is kept and the others are refused by the database (InvalidWrite).
            receipt = f"heartbeat-expired:{iid}:{seen[0]!r}"
            if not await self.store.receipts_seen([receipt]):
                try:
                    await self.get_pipeline().ingest(
                        integration, integration.kind.heartbeat_payload(integration.name, restored=False),
                        source="heartbeat", receipt=receipt)
                except InvalidWrite:
                    pass  # another process stored it first
            if not await self.store.heartbeat_expired(iid, seen[0]):
                continue  # another process marked it: its log line and metric, not ours
            self.hooks.heartbeat(iid, "expired")
            log.warning("heartbeat expired", extra={"integration": iid, "silent_for": round(now - seen[0], 3),
                                                    "timeout": timeout})
        return False

    async def heartbeat_received(self, integration, previous_state: str | None) -> None:
        """A ping arrived; after an expiry it feeds the kind's "restored" payload (which resolves)."""
        if previous_state == "expired":
            await self.get_pipeline().ingest(
                integration, integration.kind.heartbeat_payload(integration.name, restored=True), source="heartbeat")
            self.hooks.heartbeat(integration.id, "restored")
            log.info("heartbeat restored", extra={"integration": integration.id})

    # -- maintenance -------------------------------------------------------------------

    async def _maintenance(self) -> bool:
        now = time.time()
        for iid, info in (await self.store.maintenance()).items():
            if info["ends_at"] <= now:
                try:
                    await self.store.maintenance_stop(iid)
                except InvalidTransition:
                    continue  # another process serving the database ended it first
                log.info("maintenance ended", extra={"integration": iid})
        return False
