"""What a storage engine provides: the `Store` protocol both engines (SQLite, PostgreSQL) implement.

Everything above store/ talks to a Store through these methods only. Writes are durable
when their awaitable resolves; reads see every committed write of any process serving
the same database.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, ContextManager, Protocol

from .db import Group, NewAlert, StoredAlert


class Store(Protocol):
    """One tocsin database, whichever engine holds it."""

    lifecycle_events: dict[str, frozenset[str]]  # notifier name -> lifecycle events it hears of
    on_commit: Callable[[int, float], None] | None  # (writes in the commit, seconds)
    closed_cleanly: bool
    migrated_from: int | None  # the schema version found when opened (migrated up from it)

    # -- lifecycle and health
    async def open(self) -> None: """Open (creating and migrating); DatabaseUnusable says why not."""
    async def close(self) -> None: """Finish queued writes, then close."""
    def problem(self) -> str | None: """What stops writes now, known without trying one."""
    async def readiness(self, timeout: float = 5.0) -> str | None: """Why an alert could not be committed now."""

    # -- writes (each durable when it returns)
    def add_alerts(self, alerts: list[NewAlert]) -> "asyncio.Future[list[StoredAlert | None]]":
        """Store alerts where the grouping rules put them."""
    def expect(self) -> ContextManager[Any]: """Announce a write on its way (group commit waits a moment)."""
    async def act(self, group_id: str, action: str, *, delay: int | None = None, by: str = "user") -> Group:
        """Apply a group action."""
    async def ping(self) -> None: """Commit one small real write."""
    async def heartbeat(self, integration_id: str) -> str | None: """Record a ping; the state before it."""
    async def heartbeat_expired(self, integration_id: str, last_seen: float) -> bool:
        """Mark a heartbeat expired unless a ping came after `last_seen`."""
    async def escalate(self, planner, now: float | None = None, limit: int = 1000) -> int:
        """Run due escalation steps."""
    async def attempt_start(self, notification_id: str) -> int | None: """Record an attempt's start."""
    async def attempt_result(self, notification_id: str, attempt: int, ok: bool, detail: str,
                             retry_at: float | None) -> str: """Record an attempt's outcome."""
    async def recover_notifications(self) -> list[str]: """Mark interrupted attempts for retry."""
    async def maintenance_start(self, integration_id: str, mode: str, seconds: float, title: str) -> dict:
        """Start maintenance."""
    async def maintenance_stop(self, integration_id: str, by: str = "stop maintenance") -> int:
        """End maintenance; how many groups it resolved."""
    async def prune(self, resolved_before: float, limit: int = 500) -> int: """Delete old resolved groups."""
    async def expire_silences(self, now: float | None = None) -> list[str]: """Unsilence ended silences."""

    # -- reads
    async def maintenance(self) -> dict[str, dict]: """Every maintenance on now, by integration id."""
    async def receipts_seen(self, keys: list[str]) -> set[str]: """Which source receipts are committed."""
    async def get_group(self, group_id: str) -> Group | None: """One group."""
    async def list_groups(self, *, state: str | None = None, integration_id: str | None = None,
                          group_id: str | None = None, route_id: str | None = None, since: float | None = None,
                          until: float | None = None, limit: int = 50, offset: int = 0) -> tuple[int, list[Group]]:
        """Groups newest first, with the total count."""
    async def alerts_by_id(self, ids: list[str]) -> dict[str, dict]: """Alerts keyed by id."""
    async def list_alerts(self, *, alert_group_id: str | None = None, integration_id: str | None = None,
                          limit: int = 50, offset: int = 0, newest_first: bool = False) -> tuple[int, list[dict]]:
        """Alerts with the total count."""
    async def heartbeats(self) -> dict[str, tuple[float, str]]: """integration id -> (last seen, state)."""
    async def timeline(self, group_id: str) -> list[dict]: """A group's timeline entries."""
    async def escalation_of(self, group_id: str) -> dict | None: """A group's escalation state."""
    async def due_notifications(self, now: float, limit: int = 100) -> list[dict]: """Notifications due."""
    async def notifications_of(self, group_id: str) -> list[dict]: """A group's notifications."""
    async def next_silence_end(self) -> float | None: """When the next silence ends."""
    async def next_escalation_due(self) -> float | None: """When the next escalation step is due."""
    async def raw_message(self, alert_id: str) -> bytes | None: """An alert's raw mail."""
    async def count_open_groups(self) -> list[tuple[str, str, int]]: """(integration, state, count) unresolved."""
