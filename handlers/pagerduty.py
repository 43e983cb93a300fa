"""PagerDuty Events API v2 ingress: `POST /v2/enqueue` and `/integrations/v1/pagerduty/<token>/`.

It knows the protocol and nothing of grouping: it checks an event as PagerDuty's reference
describes it, gives a trigger without a dedup_key a fresh one, hands the event to the pipeline
and answers in PagerDuty's shapes: 202 after the commit, 400 "invalid event", 429, 503.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Callable

from aiohttp import web

from grouping.pipeline import Integration, Pipeline, RateLimited, Unavailable

from store import InvalidWrite

from .bodies import BadBody, BodyParsers, GcPause
from .edge import json_response
from .http import BodyBudget, read_body

KIND = "pagerduty"
ACTIONS = ("trigger", "acknowledge", "resolve")
SEVERITIES = ("critical", "error", "warning", "info")
MAX_SUMMARY = 1024    # characters, per PagerDuty's reference
MAX_DEDUP_KEY = 255


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _check_string(errors: list[str], name: str, value: Any, *, limit: int | None = None) -> None:
    """A required string: present, not blank, within `limit` characters."""
    if _blank(value):
        errors.append(f"'{name}' is missing or blank")
    elif not isinstance(value, str):
        errors.append(f"'{name}' is invalid (must be a string)")
    elif limit is not None and len(value) > limit:
        errors.append(f"'{name}' is too long ({len(value)} characters; the maximum is {limit})")


def _check_objects(errors: list[str], name: str, value: Any, required: str) -> None:
    """`links` / `images`: absent, or a list of objects that each carry `required` (href / src)."""
    if value is None:
        return
    if not isinstance(value, list):
        errors.append(f"'{name}' is invalid (must be a list of objects with '{required}')")
        return
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            errors.append(f"'{name}[{i}]' is invalid (must be an object with '{required}')")
        else:
            _check_string(errors, f"{name}[{i}].{required}", item.get(required))


def event_errors(event: Any) -> list[str]:
    """Every reason the event is invalid (the routing key aside), in PagerDuty's words; [] if valid."""
    if not isinstance(event, dict):
        return ["the event must be a JSON object"]
    errors: list[str] = []
    action = event.get("event_action")
    if _blank(action):
        errors.append("'event_action' is missing or blank")
    elif action not in ACTIONS:
        errors.append("'event_action' is invalid (must be one of trigger, acknowledge, resolve)")
    dedup_key = event.get("dedup_key")
    if action in ("acknowledge", "resolve") or not _blank(dedup_key):
        # A trigger may leave it out (one is made); acknowledge and resolve must name their alert.
        _check_string(errors, "dedup_key", dedup_key, limit=MAX_DEDUP_KEY)
    if action == "trigger":
        payload = event.get("payload")
        if payload is None:
            errors.append("'payload' is missing or blank")
        elif not isinstance(payload, dict):
            errors.append("'payload' is invalid (must be an object)")
        else:
            _check_string(errors, "payload.summary", payload.get("summary"), limit=MAX_SUMMARY)
            _check_string(errors, "payload.source", payload.get("source"))
            severity = payload.get("severity")
            if _blank(severity):
                errors.append("'payload.severity' is missing or blank")
            elif severity not in SEVERITIES:
                errors.append("'payload.severity' is invalid (must be one of critical, error, warning, info)")
            timestamp = payload.get("timestamp")
            if timestamp is not None and not _is_timestamp(timestamp):
                errors.append("'payload.timestamp' is invalid (must be an ISO 8601 date and time)")
    _check_objects(errors, "links", event.get("links"), "href")
    _check_objects(errors, "images", event.get("images"), "src")
    return errors


def _is_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or len(value) < 10:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def alert_payload(event: dict) -> dict:
    """What is stored: the event without its routing key (a secret that notifiers would
    forward), with a fresh dedup_key when a trigger came without one."""
    payload = {k: v for k, v in event.items() if k != "routing_key"}
    if _blank(payload.get("dedup_key")):
        payload["dedup_key"] = uuid.uuid4().hex  # 32 characters, like PagerDuty's own keys
    return payload


def _refusal(status: int, errors: list[str], *, state: str = "invalid event",
             message: str = "Event object is invalid", headers: dict | None = None) -> web.Response:
    # PagerDuty's error shape; `error` too, as every refusal under /integrations/ carries it.
    body = {"status": state, "message": message, "errors": errors, "error": "; ".join(errors)}
    return json_response(body, status=status, headers=headers)


class PagerDutyEvents:
    """The two PagerDuty endpoints, over whichever pipeline is current."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], *, max_body_bytes: int, parsers: BodyParsers,
                 budget: BodyBudget | None = None, hooks=None):
        self.get_pipeline = get_pipeline
        self.max_body_bytes = max_body_bytes
        # The integration endpoints' own body parsers and budget (handlers/http.Ingress): big
        # bodies are parsed off the loop, and stalled uploads share one bound.
        self.parsers, self.budget = parsers, budget
        self.hooks = hooks  # optional: .accepted(integration, n, source), .rejected(integration_id, source, reason)

    def routes(self) -> list[web.RouteDef]:
        """Registered before the generic `/integrations/v1/{kind}/{token}` routes, which they shadow."""
        base = f"/integrations/v1/{KIND}/{{token}}"
        return [
            web.post("/v2/enqueue", self.enqueue),
            web.post(base, self.integration_url),
            web.post(base + "/", self.integration_url),
        ]

    def _rejected(self, integration_id: str, reason: str) -> None:
        if self.hooks is not None:
            self.hooks.rejected(integration_id, "http", reason)

    async def _event(self, request: web.Request) -> Any:
        """The JSON body, whatever the Content-Type says (PagerDuty reads JSON only); BadBody else."""
        body = await read_body(request, self.max_body_bytes, self.budget)
        if not body.strip():
            raise BadBody(400, "JSON parse error - the body is empty")
        with GcPause() as pause:
            return (await self.parsers.parse("application/json", body, "application/json", pause))[0]

    async def enqueue(self, request: web.Request) -> web.Response:
        """`POST /v2/enqueue`: the body's routing_key names the integration."""
        try:
            event = await self._event(request)
        except BadBody as exc:
            self._rejected("", "bad_body")
            return _refusal(exc.status, [str(exc)])
        pipeline = self.get_pipeline()
        errors, integration = [], None
        key = event.get("routing_key") if isinstance(event, dict) else None
        if isinstance(event, dict):
            if _blank(key):
                errors.append("'routing_key' is missing or blank")
            elif not isinstance(key, str):
                errors.append("'routing_key' is invalid (must be a string)")
            else:
                integration = pipeline.by_token(key)
                if integration is None or integration.kind.slug != KIND:
                    integration = None
                    errors.append("'routing_key' is invalid (no PagerDuty integration has this key)")
        errors += event_errors(event)
        if errors:
            self._rejected(integration.id if integration else "", "invalid_event")
            return _refusal(400, errors)
        return await self._ingest(pipeline, integration, event)

    async def integration_url(self, request: web.Request) -> web.Response:
        """`POST /integrations/v1/pagerduty/<token>/`: the URL names the integration; a
        routing_key in the body, if any, must be the same key."""
        pipeline = self.get_pipeline()
        token = request.match_info["token"]
        integration = pipeline.by_token(token)
        if integration is None:
            self._rejected("", "unknown_token")
            return _refusal(403, ["Integration key was not found. Permission denied."])
        if integration.kind.slug != KIND:
            self._rejected(integration.id, "wrong_kind")
            return _refusal(400, [f"This url is for integration with {KIND}. Key is for"
                                  f" {integration.kind.slug} (integration '{integration.id}')"])
        try:
            event = await self._event(request)
        except BadBody as exc:
            self._rejected(integration.id, "bad_body")
            return _refusal(exc.status, [str(exc)])
        errors = []
        if isinstance(event, dict) and event.get("routing_key") is not None and event["routing_key"] != token:
            errors.append("'routing_key' is invalid (it differs from the key in the URL)")
        errors += event_errors(event)
        if errors:
            self._rejected(integration.id, "invalid_event")
            return _refusal(400, errors)
        return await self._ingest(pipeline, integration, event)

    async def _ingest(self, pipeline: Pipeline, integration: Integration, event: dict) -> web.Response:
        payload = alert_payload(event)
        try:
            accepted = await pipeline.ingest(integration, payload, source="http")
        except RateLimited as exc:
            self._rejected(integration.id, "rate_limited")
            return _refusal(429, [f"{exc} for integration '{integration.id}'"], state="throttle event",
                            message="Request Limit Exceeded", headers={"Retry-After": str(exc.retry_after)})
        except Unavailable as exc:
            self._rejected(integration.id, "unavailable")
            return _refusal(503, [f"storage unavailable, retry later: {exc}"], state="unavailable",
                            message="Event not stored", headers={"Retry-After": str(exc.retry_after)})
        except InvalidWrite as exc:  # this event only, and for good
            self._rejected(integration.id, "invalid")
            return _refusal(400, [f"cannot store this event: {exc}"])
        if self.hooks is not None:
            self.hooks.accepted(integration, len(accepted), "http")
        # An acknowledge or resolve without an open alert is dropped, yet answered 202 (as PagerDuty does).
        return json_response(
            {"status": "success", "message": "Event processed", "dedup_key": payload["dedup_key"]}, status=202)
