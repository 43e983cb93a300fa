"""Prometheus metrics (prometheus-client) and the `/metrics` endpoint.

One registry per process; ingress, the store, the SMTP door, the escalation engine
and both logins report into it through the small methods below, never through
prometheus objects directly.
"""
from __future__ import annotations

import platform
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from escalation.chains import STEP_KINDS

STATES = ("new", "acknowledged", "silenced")
AUTH_SURFACES = ("api", "ui")


class Metrics:
    """Every metric tocsin exports."""

    def __init__(self, version: str = "unknown") -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.received_total = Counter("tocsin_alerts_received_total", "Alerts accepted (committed)",
                                ["integration", "source"], registry=r)
        self.rejected_total = Counter("tocsin_alerts_rejected_total", "Alerts refused",
                                ["integration", "source", "reason"], registry=r)
        self.template_errors = Counter("tocsin_template_errors_total", "Template renders that failed",
                                       ["integration", "template"], registry=r)
        self.open_groups = Gauge("tocsin_alert_groups_open", "Alert groups not resolved, by state",
                                 ["integration", "state"], registry=r)
        self.commit_seconds = Histogram(
            "tocsin_commit_seconds", "Time of one group commit (transaction and fsync)", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.commit_batch = Histogram(
            "tocsin_commit_batch_size", "Writes committed together", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self._received: dict[tuple[str, str], Counter] = {}
        self.smtp_sessions = Gauge("tocsin_smtp_sessions", "SMTP sessions open now", registry=r)
        self.smtp_replies = Counter("tocsin_smtp_replies_total", "SMTP replies to DATA and RCPT, by code",
                                    ["code"], registry=r)
        self.mailbox_up = Gauge("tocsin_imap_mailbox_up", "1 while tocsin is logged in to the IMAP mailbox",
                                ["integration"], registry=r)
        self.mailbox_messages = Counter("tocsin_imap_messages_total", "IMAP messages handled, by outcome",
                                        ["integration", "outcome"], registry=r)
        self.notification_attempts = Counter(
            "tocsin_notification_attempts_total",
            "Notification delivery attempts by outcome (ok, retry, failed for good, interrupted by a stop)",
            ["notifier", "outcome"], registry=r)
        self.escalation_steps = Counter("tocsin_escalation_steps_total", "Escalation steps run, by kind",
                                        ["step"], registry=r)
        self.escalation_lateness = Histogram(
            "tocsin_escalation_lateness_seconds", "How long after it was due a due escalation ran", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
        )
        self.heartbeats = Counter("tocsin_heartbeats_total", "Heartbeats expired and restored",
                                  ["integration", "event"], registry=r)
        self.auth_failures = Counter("tocsin_auth_failures_total", "Requests refused for a wrong or missing"
                                     " API token (api) and failed logins (ui)", ["surface"], registry=r)
        for surface in AUTH_SURFACES:  # present at 0 from the start, so rate() and alerts see the first one
            self.auth_failures.labels(surface)
        for kind in STEP_KINDS:
            self.escalation_steps.labels(kind)
        Gauge("tocsin_build_info", "The running tocsin: version and Python version", ["version", "python"],
              registry=r).labels(version, platform.python_version()).set(1)

    # -- hooks the rest of tocsin calls ---------------------------------------------

    def accepted(self, integration, n: int, source: str) -> None:
        key = (integration.id, source)
        child = self._received.get(key)
        if child is None:  # labels() takes a lock and builds a key: once per integration and source
            child = self._received[key] = self.received_total.labels(*key)
        child.inc(n)

    def rejected(self, integration_id: str, source: str, reason: str) -> None:
        self.rejected_total.labels(integration_id or "unknown", source, reason).inc()

    def template_error(self, integration_id: str, template: str) -> None:
        self.template_errors.labels(integration_id, template).inc()

    def committed(self, batch: int, seconds: float) -> None:
        self.commit_batch.observe(batch)
        self.commit_seconds.observe(seconds)

    def smtp_reply(self, code: int | str) -> None:
        self.smtp_replies.labels(str(code)).inc()

    def mailbox_state(self, integration_id: str, connected: bool) -> None:
        self.mailbox_up.labels(integration_id).set(1 if connected else 0)

    def mailbox_message(self, integration_id: str, outcome: str) -> None:
        self.mailbox_messages.labels(integration_id, outcome).inc()
    def auth_failure(self, surface: str) -> None:
        """A wrong or missing credential: surface is "api" or "ui"."""
        self.auth_failures.labels(surface).inc()

    # the escalation engine's hooks (escalation.engine.Hooks)

    def notification_attempt(self, notifier: str, outcome: str) -> None:
        self.notification_attempts.labels(notifier, outcome).inc()

    def escalation_ran(self, steps: list[str], late: float | None) -> None:
        for kind in steps:
            self.escalation_steps.labels(kind).inc()
        if late is not None:
            self.escalation_lateness.observe(late)

    def heartbeat(self, integration_id: str, event: str) -> None:
        self.heartbeats.labels(integration_id, event).inc()

    def handler(self, count_groups: Callable[[], Awaitable[list[tuple[str, str, int]]]]):
        """The `/metrics` handler; open-group gauges are read from the database per scrape."""

        async def metrics(request: web.Request) -> web.Response:
            try:
                rows = await count_groups()
            except Exception:  # noqa: BLE001 - a scrape still answers with what it has
                rows = None
            if rows is not None:
                self.open_groups.clear()
                for integration, state, count in rows:
                    self.open_groups.labels(integration, state).set(count)
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        return metrics

