"""REST API under /api/v1/, in Grafana OnCall's public API shapes (CONTRACT §9)."""
from __future__ import annotations

import hmac
import json
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from grouping.pipeline import Integration, IntegrationError, Pipeline, build_integration, decide
from grouping.templates import render_budget
from store import ALLOWED_FROM, Group, InvalidTransition, NotFound, StoreUnavailable

from .edge import json_response
from .http import BadBody, error, parse_json_body, read_body

STATES = ("new", "acknowledged", "resolved", "silenced")
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

# Public API template names (Grafana OnCall) for the config's template names.
_API_TEMPLATE_NAMES = {
    "grouping_id": "grouping_key",
    "resolve_condition": "resolve_signal",
    "acknowledge_condition": "acknowledge_signal",
    "source_link": "source_link",
}


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with microseconds, as Grafana OnCall prints them."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def alert_json(alert: dict) -> dict:
    payload = alert["payload"]
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return {"id": alert["id"], "alert_group_id": alert["alert_group_id"],
            "created_at": iso(alert["created_at"]), "payload": payload}


def render_output(d) -> dict:
    """What `tocsin render` and the preview endpoint print for a Decision."""
    return {
        "grouping_id": d.grouping_id,
        "grouping_key": d.grouping_key,
        "resolve": d.resolve,
        "acknowledge": d.acknowledge,
        "source_link": d.source_link,
        "title": d.title,
        "message": d.message,
        "image_url": d.image_url or None,
        "route": d.route,
        "errors": dict(d.errors),
    }


class Api:
    """Handlers for /api/v1/; `settings` carries public_url, api_tokens, smtp_domain."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], *, tokens: Callable[[], tuple[str, ...]],
                 public_url: Callable[[], str], email_domain: Callable[[], str | None],
                 max_body_bytes: int = 1024 * 1024):
        self.get_pipeline = get_pipeline
        self.tokens = tokens
        self.public_url = public_url
        self.email_domain = email_domain
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        out = []
        for path, handler, method in (
            ("/api/v1/integrations", self.list_integrations, "GET"),
            ("/api/v1/integrations/{id}", self.get_integration, "GET"),
            ("/api/v1/integrations/{id}/preview", self.preview, "POST"),
            ("/api/v1/integrations/{id}/maintenance_start", self.maintenance_start, "POST"),
            ("/api/v1/integrations/{id}/maintenance_stop", self.maintenance_stop, "POST"),
            ("/api/v1/alert_groups/{id}/timeline", self.timeline, "GET"),
            ("/api/v1/alert_groups", self.list_groups, "GET"),
            ("/api/v1/alert_groups/{id}", self.get_group, "GET"),
            ("/api/v1/alert_groups/{id}/{action}", self.group_action, "POST"),
            ("/api/v1/alerts", self.list_alerts, "GET"),
        ):
            guarded = self._guard(handler)
            out.append(web.route(method, path, guarded))
            out.append(web.route(method, path + "/", guarded))
        return out

    def _guard(self, handler):
        """Wrap an API handler with token auth (per route, so ingestion pays nothing for it)."""

        async def guarded(request: web.Request):
            return await self.auth(request, handler)

        return guarded

    async def auth(self, request: web.Request, handler):
        given = request.headers.get("Authorization", "")
        if given.lower().startswith("bearer "):
            given = given[7:]
        given = given.strip().encode()
        if not given or not any(hmac.compare_digest(given, t.encode()) for t in self.tokens()):
            return error(401, "Invalid or missing API token (send 'Authorization: <token>')")
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            return error(503, f"storage unavailable, retry later: {exc}", headers={"Retry-After": "5"})

    # -- integrations ----------------------------------------------------------------

    def integration_json(self, i: Integration) -> dict:
        base = self.public_url()
        link = f"{base}/integrations/v1/{i.kind.slug}/{i.token}/"
        domain = self.email_domain()
        o = i.overrides
        maintenance = self.get_pipeline().store.maintenance.get(i.id)
        default = next((r for r in i.routes if r.is_default), None)
        return {
            "id": i.id,
            "name": i.name,
            "description_short": None,
            "type": i.kind.slug,
            "link": link,
            "inbound_email": f"{i.token}@{domain}" if domain else None,
            "heartbeat": {"link": f"{link}heartbeat/"},
            "maintenance_mode": maintenance["mode"] if maintenance else None,
            "maintenance_started_at": iso(maintenance["started_at"]) if maintenance else None,
            "maintenance_end_at": iso(maintenance["ends_at"]) if maintenance else None,
            "default_route": {"id": default.id, "escalation_chain_id": default.escalation} if default else None,
            "routes": [
                {"id": r.id, "position": n, "routing_type": "jinja2" if r.condition is not None else "regex",
                 "routing_regex": r.source, "escalation_chain_id": r.escalation, "is_the_last_route": r.is_default}
                for n, r in enumerate(i.routes)
            ],
            "templates": {
                **{api: o.get(name) for name, api in _API_TEMPLATE_NAMES.items()},
                "web": {"title": o.get("title"), "message": o.get("message"), "image_url": o.get("image_url")},
            },
        }

    async def list_integrations(self, request: web.Request) -> web.Response:
        items = [self.integration_json(i) for i in self.get_pipeline().integrations.values()]
        return json_response(self.page(request, len(items), items, *self.paging(request)[1:], slice_=True))

    def _integration(self, request) -> Integration:
        i = self.get_pipeline().by_id(request.match_info["id"])
        if i is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "Integration not found"}),
                                   content_type="application/json")
        return i

    async def get_integration(self, request: web.Request) -> web.Response:
        return json_response(self.integration_json(self._integration(request)))

    async def preview(self, request: web.Request) -> web.Response:
        integration = self._integration(request)
        try:
            body, _ = parse_json_body(await read_body(request, self.max_body_bytes))
        except BadBody as exc:
            return error(exc.status, str(exc))
        if not isinstance(body, dict) or "payload" not in body:
            return error(400, "body must be a JSON object with a 'payload'")
        templates = body.get("templates") or {}
        if not isinstance(templates, dict) or any(not isinstance(v, (str, type(None))) for v in templates.values()):
            return error(400, "'templates' must map template names to strings")
        if templates:
            try:
                merged = {**integration.overrides, **{k: v for k, v in templates.items() if v is not None}}
                unknown = set(templates) - set(integration.sources)
                if unknown:
                    return error(400, f"unknown template(s): {', '.join(sorted(unknown))}")
                integration = build_integration(integration.id, integration.name, integration.kind.slug,
                                                 integration.token, merged, integration.routes, integration.chains)
            except IntegrationError as exc:
                return error(400, str(exc))
        pipeline = self.get_pipeline()
        d = await pipeline.decide(integration, body["payload"], full=True)
        return json_response(render_output(d))

    async def maintenance_start(self, request: web.Request) -> web.Response:
        integration = self._integration(request)
        try:
            body = await _optional_json(request)
        except BadBody as exc:
            return error(exc.status, str(exc))
        mode = body.get("mode") if isinstance(body, dict) else None
        duration = body.get("duration") if isinstance(body, dict) else None
        if mode not in ("debug", "maintenance"):
            return error(400, "mode must be \"debug\" or \"maintenance\"")
        if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
            return error(400, "duration must be a positive number of seconds")
        title = f"Maintenance of {integration.name} for {_human(duration)}"
        try:
            await self.get_pipeline().store.maintenance_start(integration.id, mode, float(duration), title)
        except InvalidTransition as exc:
            return error(400, str(exc))
        return json_response(self.integration_json(integration))

    async def maintenance_stop(self, request: web.Request) -> web.Response:
        integration = self._integration(request)
        try:
            await self.get_pipeline().store.maintenance_stop(integration.id)
        except InvalidTransition as exc:
            return error(400, str(exc))
        return json_response(self.integration_json(integration))

    # -- alert groups ----------------------------------------------------------------

    def paging(self, request: web.Request) -> tuple[int, int, int]:
        try:
            page = min(max(1, int(request.query.get("page", "1"))), 2**31)  # SQLite offsets are 64-bit
            size = min(MAX_PAGE_SIZE, max(1, int(request.query.get("perpage", str(PAGE_SIZE)))))
        except ValueError:
            raise web.HTTPBadRequest(text=json.dumps({"error": "page and perpage must be integers"}),
                                     content_type="application/json") from None
        return (page - 1) * size, page, size

    def page(self, request, count: int, results: list, page: int, size: int, slice_: bool = False) -> dict:
        if slice_:
            results = results[(page - 1) * size: page * size]
        total_pages = max(1, -(-count // size))

        def link(n: int) -> str | None:
            if n < 1 or n > total_pages:
                return None
            return str(request.url.update_query({"page": str(n)}))

        return {"count": count, "next": link(page + 1), "previous": link(page - 1), "results": results,
                "current_page_number": page, "page_size": size, "total_pages": total_pages}

    async def group_json(self, groups: list[Group]) -> list[dict]:
        store = self.get_pipeline().store
        last = await store.alerts_by_id([g.last_alert_id for g in groups if g.last_alert_id])
        base = self.public_url()
        return [
            {
                "id": g.id,
                "integration_id": g.integration_id,
                "team_id": None,
                "route_id": g.route_id,
                "alerts_count": g.alerts_count,
                "state": g.state,
                "title": g.title,
                "created_at": iso(g.created_at),
                "acknowledged_at": iso(g.acknowledged_at),
                "acknowledged_by": g.acknowledged_by,
                "resolved_at": iso(g.resolved_at),
                "resolved_by": g.resolved_by,
                "silenced_at": iso(g.silenced_at),
                "silenced_until": iso(g.silenced_until),
                "grouping_key": g.grouping_key,
                "labels": [],
                "permalinks": {"web": f"{base}/ui/groups/{g.id}"},
                "last_alert": alert_json(last[g.last_alert_id]) if g.last_alert_id in last else None,
            }
            for g in groups
        ]

    async def list_groups(self, request: web.Request) -> web.Response:
        q = request.query
        state = q.get("state")
        if state is not None and state not in STATES:
            return error(400, f"state must be one of {', '.join(STATES)}")
        since = until = None
        if "started_at" in q:
            try:
                start, _, end = q["started_at"].partition("_")
                since, until = parse_time(start), parse_time(end) if end else None
            except ValueError:
                return error(400, "started_at must be '<ISO start>_<ISO end>'")
        offset, page, size = self.paging(request)
        count, groups = await self.get_pipeline().store.list_groups(
            state=state, integration_id=q.get("integration_id"), group_id=q.get("id"),
            route_id=q.get("route_id"), since=since, until=until, limit=size, offset=offset,
        )
        return json_response(self.page(request, count, await self.group_json(groups), page, size))

    async def get_group(self, request: web.Request) -> web.Response:
        g = await self.get_pipeline().store.get_group(request.match_info["id"])
        if g is None:
            return error(404, "Alert group not found")
        return json_response((await self.group_json([g]))[0])

    async def group_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ALLOWED_FROM:
            return error(404, f"no such action '{action}'")
        delay = None
        if action == "silence":
            try:
                body = await _optional_json(request)
            except BadBody as exc:
                return error(exc.status, str(exc))
            delay = body.get("delay") if isinstance(body, dict) else None
            if not isinstance(delay, int) or isinstance(delay, bool) or delay < -1:
                return error(400, "silence needs {\"delay\": seconds} (-1 = forever)")
        try:
            g = await self.get_pipeline().store.act(request.match_info["id"], action, delay=delay)
        except NotFound as exc:
            return error(404, str(exc))
        except InvalidTransition as exc:
            return error(400, str(exc))
        except StoreUnavailable as exc:
            return error(503, f"storage unavailable, retry later: {exc}", headers={"Retry-After": "5"})
        return json_response((await self.group_json([g]))[0])

    async def timeline(self, request: web.Request) -> web.Response:
        """The group's story: creation and route, escalation steps, every notification
        attempt and its outcome, state changes and who made them."""
        store = self.get_pipeline().store
        g = await store.get_group(request.match_info["id"])
        if g is None:
            return error(404, "Alert group not found")
        story = await group_story(store, g)
        escalation = story["escalation"]
        if escalation is not None:
            escalation["due_at"] = iso(escalation["due_at"])
        return json_response({
            "alert_group_id": g.id, "state": g.state, "escalation": escalation,
            "notifications": [{**n, "created_at": iso(n["created_at"])} for n in story["notifications"]],
            "results": [{**e, "at": iso(e["at"])} for e in story["entries"]],
        })

    # -- alerts ----------------------------------------------------------------------

    async def list_alerts(self, request: web.Request) -> web.Response:
        offset, page, size = self.paging(request)
        count, alerts = await self.get_pipeline().store.list_alerts(
            alert_group_id=request.query.get("alert_group_id"),
            integration_id=request.query.get("integration_id"), limit=size, offset=offset,
        )
        return json_response(self.page(request, count, [alert_json(a) for a in alerts], page, size))


async def group_story(store, g: Group) -> dict:
    """A group's timeline, escalation and notifications, times in epoch seconds: what the
    REST timeline and the UI's group page both show.

    `entries` ([{at, event, detail}], oldest first) starts with the group's creation and
    route, then the store's timeline: escalation steps, each notification attempt, state
    changes and who made them.
    """
    entries = [{"at": g.created_at, "event": "created",
                "detail": {"integration_id": g.integration_id, "route_id": g.route_id}}]
    entries += [{"at": e["at"], "event": e["event"], "detail": e["detail"]} for e in await store.timeline(g.id)]
    return {"entries": entries, "escalation": await store.escalation_of(g.id),
            "notifications": await store.notifications_of(g.id)}


async def _optional_json(request: web.Request, limit: int = 65536):
    """A small JSON body for an action; an empty body is {}."""
    raw = await read_body(request, limit)
    return parse_json_body(raw)[0] if raw.strip() else {}


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def render_standalone(integration: Integration, payload: Any, budget_seconds: float = 1.0) -> dict:
    """`tocsin render`'s answer, computed without a running daemon."""
    return render_output(decide(integration, payload, render_budget(budget_seconds), full=True))
