"""REST API under /api/v1/, in Grafana OnCall's public API shapes (CONTRACT §9)."""
from __future__ import annotations

import hmac
import json
from typing import Callable

from aiohttp import web

from grouping import lifecycle
from grouping.lifecycle import ActionError, UnknownAction
from grouping.pipeline import Integration, IntegrationError, Pipeline, preview_json, with_templates
from grouping.views import (MAX_PAGE, STATES, alert_json, group_story, groups_json, integration_json, parse_time,
                            timeline_json)
from store import Group, InvalidTransition, NotFound, StoreUnavailable

from .edge import json_response
from .http import BadBody, error, parse_json_body, read_body

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class Api:
    """Handlers for /api/v1/, over the running pipeline (its `settings` carry the API tokens,
    the public URL and the email domain of the running config)."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], *, max_body_bytes: int = 1024 * 1024, hooks=None):
        self.get_pipeline = get_pipeline
        self.hooks = hooks  # optional: .auth_failure("api") on every 401
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
        if not given or not any(hmac.compare_digest(given, t.encode()) for t in self.get_pipeline().settings.api_tokens):
            if self.hooks is not None:
                self.hooks.auth_failure("api")
            return error(401, "Invalid or missing API token (send 'Authorization: <token>')")
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            return error(503, f"storage unavailable, retry later: {exc}", headers={"Retry-After": "5"})

    # -- integrations ----------------------------------------------------------------

    async def integration_json(self, i: Integration) -> dict:
        pipeline = self.get_pipeline()
        settings = pipeline.settings
        maintenance = (await pipeline.store.maintenance()).get(i.id)
        return integration_json(i, public_url=settings.public_url, email_domain=settings.email_domain,
                                maintenance=maintenance)

    async def list_integrations(self, request: web.Request) -> web.Response:
        items = [await self.integration_json(i) for i in self.get_pipeline().integrations.values()]
        return json_response(self.page(request, len(items), items, *self.paging(request)[1:], slice_=True))

    def _integration(self, request) -> Integration:
        i = self.get_pipeline().by_id(request.match_info["id"])
        if i is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "Integration not found"}),
                                   content_type="application/json")
        return i

    async def get_integration(self, request: web.Request) -> web.Response:
        return json_response(await self.integration_json(self._integration(request)))

    async def preview(self, request: web.Request) -> web.Response:
        """What `tocsin render` prints for the payload, with `templates` (config names) in
        place of the running ones; null keeps the running template."""
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
        unknown = set(templates) - set(integration.sources)
        if unknown:
            return error(400, f"unknown template(s): {', '.join(sorted(unknown))}")
        edits = {k: v for k, v in templates.items() if v is not None}
        if edits:
            try:
                integration = with_templates(integration, {**integration.overrides, **edits})
            except IntegrationError as exc:
                return error(400, str(exc))
        results = await self.get_pipeline().preview(integration, body["payload"])
        return json_response(preview_json(results))

    async def maintenance_start(self, request: web.Request) -> web.Response:
        integration = self._integration(request)
        try:
            body = await _optional_json(request)
        except BadBody as exc:
            return error(exc.status, str(exc))
        if not isinstance(body, dict):
            return error(400, 'body must be {"mode": "debug"|"maintenance", "duration": seconds}')
        try:
            await lifecycle.maintenance_start(self.get_pipeline().store, integration.id, integration.name,
                                              body.get("mode"), body.get("duration"))
        except (ActionError, InvalidTransition) as exc:
            return error(400, str(exc))
        return json_response(await self.integration_json(integration))

    async def maintenance_stop(self, request: web.Request) -> web.Response:
        integration = self._integration(request)
        try:
            await lifecycle.maintenance_stop(self.get_pipeline().store, integration.id)
        except InvalidTransition as exc:
            return error(400, str(exc))
        return json_response(await self.integration_json(integration))

    # -- alert groups ----------------------------------------------------------------

    def paging(self, request: web.Request) -> tuple[int, int, int]:
        """(offset, page, size) from ?page= and ?perpage=; a 400 naming the range otherwise."""
        page = _bounded(request.query.get("page", "1"), 1, MAX_PAGE)
        size = _bounded(request.query.get("perpage", str(PAGE_SIZE)), 1, MAX_PAGE_SIZE)
        if page is None or size is None:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"page must be an integer from 1 to {MAX_PAGE},"
                                          f" perpage one from 1 to {MAX_PAGE_SIZE}"}),
                content_type="application/json")
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
        pipeline = self.get_pipeline()
        return await groups_json(pipeline.store, groups, public_url=pipeline.settings.public_url)

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
        delay = None
        if action == "silence":
            try:
                body = await _optional_json(request)
            except BadBody as exc:
                return error(exc.status, str(exc))
            delay = body.get("delay") if isinstance(body, dict) else None
        try:
            g = await lifecycle.act(self.get_pipeline().store, request.match_info["id"], action, delay=delay)
        except (UnknownAction, NotFound) as exc:
            return error(404, str(exc))
        except (ActionError, InvalidTransition) as exc:
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
        return json_response(timeline_json(g, await group_story(store, g)))

    # -- alerts ----------------------------------------------------------------------

    async def list_alerts(self, request: web.Request) -> web.Response:
        offset, page, size = self.paging(request)
        count, alerts = await self.get_pipeline().store.list_alerts(
            alert_group_id=request.query.get("alert_group_id"),
            integration_id=request.query.get("integration_id"), limit=size, offset=offset,
        )
        return json_response(self.page(request, count, [alert_json(a) for a in alerts], page, size))


async def _optional_json(request: web.Request, limit: int = 65536):
    """A small JSON body for an action; an empty body is {}."""
    raw = await read_body(request, limit)
    return parse_json_body(raw)[0] if raw.strip() else {}


def _bounded(text: str, low: int, high: int) -> int | None:
    """An integer query parameter within [low, high], or None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


