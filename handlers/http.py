"""HTTP ingestion: `POST /integrations/v1/<kind>/<token>/` turns a request into payloads.

It knows HTTP and nothing of grouping: it finds the integration, parses the body,
hands the payload to the pipeline and maps the outcome to a status (CONTRACT §4).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from grouping.pipeline import Pipeline, RateLimited, Unavailable
from store import InvalidWrite

from .bodies import BadBody, BodyParsers, GcPause, parse_json_body  # noqa: F401 - parse_json_body: for handlers.api
from .edge import BodyTimeout, error, json_response

log = logging.getLogger("tocsin.http")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)[:200]


def refuse_declared_length(request: web.Request, limit: int) -> None:
    """BadBody(413) before reading, when Content-Length already says the body is too big."""
    if request.content_length is not None and request.content_length > limit:
        raise BadBody(413, f"body of {request.content_length} bytes is over the limit of {limit} bytes")


class BodyBudget:
    """The bytes all bodies still arriving may hold at once.

    Without it, 2,048 clients that each send 1 MB less a byte and stall pin 2 GB until
    their body deadline, and the allocator keeps most of it afterwards. A body that does
    not fit is refused at once with 503 (the sender retries), before it is read.
    """

    def __init__(self, total: int):
        self.total, self.held = total, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.total:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


async def read_body(request: web.Request, limit: int, budget: BodyBudget | None = None) -> bytes:
    """The whole body, or BadBody: 413 as soon as it passes `limit` bytes, 408 when it
    misses the connection's body deadline (handlers/edge.py), 400 when the client stops
    sending, 503 when `budget` cannot hold it while it arrives."""
    refuse_declared_length(request, limit)
    length = request.content_length
    if length is not None:
        # The common case: the whole body already arrived with the headers.
        try:
            data = request.content.read_nowait(-1)
        except web.RequestPayloadError as exc:
            raise BadBody(400, f"body cannot be read: {_first_line(str(exc))}") from None
        if len(data) == length:
            return data
        chunks, size = [data], len(data)
    else:
        chunks, size = [], 0
    held = 0
    try:
        while True:
            need = (length if length is not None else size + 65536) - held
            if budget is not None and need > 0:
                if not budget.take(need):
                    raise BadBody(503, "too many request bodies arriving at once, retry later")
                held += need
            chunk = await request.content.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BadBody(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except BodyTimeout as exc:
        raise BadBody(408, str(exc)) from None
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding that does not decode
        raise BadBody(400, f"body cannot be read: {_first_line(str(exc))}") from None
    finally:
        if budget is not None:
            budget.give(held)
    if length is not None and size < length and "Content-Encoding" not in request.headers:
        raise BadBody(400, f"client closed the connection after {size} of {length} body bytes")
    return b"".join(chunks)


async def parse_payload(request: web.Request, limit: int, parsers: BodyParsers,
                        budget: BodyBudget | None = None, pause: GcPause | None = None) -> tuple[Any, str | None]:
    """The payload a request carries, and its JSON text (None when there is no body)."""
    body = await read_body(request, limit, budget)
    if not body.strip():
        return {}, None  # Grafana OnCall accepts an empty body as {}
    return await parsers.parse(request.content_type, body, request.headers.get("Content-Type", ""), pause)


_FORM_KEY = web.RequestKey("tocsin.form", MultiDict)
_UI_PARSERS = BodyParsers(workers=0)  # UI forms are small and come from logged-in users: threads
_INLINE_FORM_BYTES = 64 * 1024


def _form_pairs(body: bytes) -> MultiDict:
    return MultiDict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def read_form(request: web.Request, limit: int = 1024 * 1024) -> MultiDict:
    """A form body (urlencoded or multipart, no files) read like an integration body:
    bounded, under the connection's body deadline, parsed off the loop when big. Every
    value of a repeated field is kept (`getall`: the UI's bulk form sends one per group).

    The UI's replacement for `await request.post()` (which parses on the loop); read once
    per request, so a middleware and the handler can both ask. HTTP errors as aiohttp's.
    """
    if _FORM_KEY in request:
        return request[_FORM_KEY]
    form: MultiDict = MultiDict()
    try:
        body = await read_body(request, limit)
        if body.strip() and request.content_type == "application/x-www-form-urlencoded":
            form = _form_pairs(body) if len(body) <= _INLINE_FORM_BYTES else await asyncio.to_thread(_form_pairs, body)
        elif body.strip() and request.content_type == "multipart/form-data":
            fields, _ = await _UI_PARSERS.parse(request.content_type, body, request.headers.get("Content-Type", ""))
            form = MultiDict(fields)
    except BadBody as exc:
        raise _http_error(exc) from None
    request[_FORM_KEY] = form
    return form


def _http_error(exc: BadBody) -> web.HTTPException:
    if exc.status == 413:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=str(exc))
    classes = {408: web.HTTPRequestTimeout, 415: web.HTTPUnsupportedMediaType}
    return classes.get(exc.status, web.HTTPBadRequest)(text=str(exc))


class Ingress:
    """The integration endpoints, over whichever pipeline is current."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], *, max_body_bytes: int, hooks=None,
                 on_heartbeat=None, parsers: BodyParsers | None = None):
        self.get_pipeline = get_pipeline
        self.parsers = parsers or BodyParsers()
        self.budget = BodyBudget(max(32 * 1024 * 1024, 2 * max_body_bytes))
        self.on_heartbeat = on_heartbeat  # optional coroutine (integration, previous state)
        self.max_body_bytes = max_body_bytes
        self.hooks = hooks  # optional: .accepted(integration, n, source), .rejected(integration_id, source, reason)

    def routes(self) -> list[web.RouteDef]:
        base = "/integrations/v1/{kind}/{token}"
        return [
            web.post(base, self.receive),
            web.post(base + "/", self.receive),
            web.route("*", base + "/heartbeat", self.heartbeat),
            web.route("*", base + "/heartbeat/", self.heartbeat),
        ]

    async def cleanup_ctx(self, app: web.Application):
        """For app.cleanup_ctx: the body parsers' worker processes end with the app."""
        yield
        self.parsers.close()

    def _rejected(self, integration_id: str, reason: str) -> None:
        if self.hooks is not None:
            self.hooks.rejected(integration_id, "http", reason)

    async def receive(self, request: web.Request) -> web.Response:
        with GcPause() as pause:  # held while a big payload lives (handlers/bodies.py)
            return await self._receive(request, pause)

    async def _receive(self, request: web.Request, pause: GcPause) -> web.Response:
        pipeline = self.get_pipeline()
        integration = pipeline.by_token(request.match_info["token"])
        if integration is None:
            self._rejected("", "unknown_token")
            return error(403, "Integration key was not found. Permission denied.")
        kind = request.match_info["kind"]
        if kind != integration.kind.slug:
            self._rejected(integration.id, "wrong_kind")
            return error(
                400,
                f"This url is for integration with {kind}. Key is for {integration.kind.slug}"
                f" (integration '{integration.id}')",
            )
        try:
            payload, text = await parse_payload(request, self.max_body_bytes, self.parsers, self.budget, pause)
        except BadBody as exc:
            self._rejected(integration.id, {400: "bad_body", 408: "timeout", 413: "too_large",
                                            415: "content_type", 503: "busy"}[exc.status])
            return error(exc.status, str(exc), headers={"Retry-After": "1"} if exc.status == 503 else None)
        try:
            accepted = await pipeline.ingest(integration, payload, payload_json=text, source="http")
            del payload  # freed before the pause ends: the collector never walks it
        except RateLimited as exc:
            self._rejected(integration.id, "rate_limited")
            return error(429, f"{exc} for integration '{integration.id}'",
                         headers={"Retry-After": str(exc.retry_after)})
        except Unavailable as exc:
            self._rejected(integration.id, "unavailable")
            return error(503, f"storage unavailable, retry later: {exc}",
                         headers={"Retry-After": str(exc.retry_after)})
        except InvalidWrite as exc:  # this alert only, and for good: not worth a retry
            self._rejected(integration.id, "invalid")
            return error(400, f"cannot store this alert: {exc}")
        if not accepted:
            # Only a legacy grafana body with an empty `alerts` list makes no alert. A 200
            # would say "stored"; say instead that nothing was there to store.
            self._rejected(integration.id, "bad_body")
            return error(400, 'the body holds no alerts (its "alerts" list is empty): nothing stored')
        if self.hooks is not None:
            self.hooks.accepted(integration, len(accepted), "http")
        first = accepted[0]
        body = {"alert_id": first.alert_id, "alert_group_id": first.alert_group_id,
                "grouping_key": first.grouping_key}
        if len(accepted) > 1:
            body["alerts"] = [
                {"alert_id": a.alert_id, "alert_group_id": a.alert_group_id, "grouping_key": a.grouping_key}
                for a in accepted
            ]
        return json_response(body)

    async def heartbeat(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "POST", "HEAD"):
            return error(405, f"method {request.method} not allowed")
        pipeline = self.get_pipeline()
        integration = pipeline.by_token(request.match_info["token"])
        if integration is None:
            return error(403, "Integration key was not found. Permission denied.")
        if request.match_info["kind"] != integration.kind.slug:
            return error(400, f"This url is for integration with {request.match_info['kind']}."
                              f" Key is for {integration.kind.slug}")
        try:
            previous = await pipeline.store.heartbeat(integration.id)
            if self.on_heartbeat is not None:
                await self.on_heartbeat(integration, previous)
        except Exception as exc:  # noqa: BLE001 - any storage trouble means "retry"
            return error(503, f"storage unavailable, retry later: {exc}", headers={"Retry-After": "5"})
        return json_response(":)")
