"""HTTP ingestion: `POST /integrations/v1/<kind>/<token>/` turns a request into payloads.

It knows HTTP and nothing of grouping: it finds the integration, parses the body,
hands the payload to the pipeline and maps the outcome to a status (CONTRACT §4).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable
from urllib.parse import parse_qsl

from aiohttp import web

from grouping.pipeline import Pipeline, RateLimited, Unavailable
from store import InvalidWrite

log = logging.getLogger("tocsin.http")

MAX_JSON_DEPTH = 128


def error(status: int, text: str, headers: dict | None = None) -> web.Response:
    """Every refusal is JSON `{"error": …}`."""
    return web.json_response({"error": text}, status=status, headers=headers)


class BadBody(Exception):
    """The request body cannot become a payload; carries the HTTP status."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when containers nest at most `limit` deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return True


def parse_json_body(body: bytes) -> tuple[Any, str]:
    """(payload, the text as received); BadBody(400) for anything that is not JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(400, f"body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        payload = json.loads(text.lstrip("\ufeff"))
    except RecursionError:
        raise BadBody(400, "JSON parse error - nested too deeply") from None
    except ValueError as exc:
        raise BadBody(400, f"JSON parse error - {exc}") from None
    if not isinstance(payload, (dict, list)):
        raise BadBody(400, "JSON body must be an object or an array")
    if (body.count(b"[") + body.count(b"{")) > MAX_JSON_DEPTH and not json_depth_ok(payload):
        raise BadBody(400, f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels")
    return payload, text


BODY_TIMEOUT = 30.0


def refuse_declared_length(request: web.Request, limit: int) -> None:
    """BadBody(413) before reading, when Content-Length already says the body is too big."""
    if request.content_length is not None and request.content_length > limit:
        raise BadBody(413, f"body of {request.content_length} bytes is over the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The whole body, or BadBody(413) as soon as it passes `limit` bytes, or BadBody(408)
    when it takes longer than `timeout` to arrive (a stalled client frees its slot)."""
    refuse_declared_length(request, limit)
    length = request.content_length
    if length is not None:
        # The common case: the whole body already arrived with the headers.
        data = request.content.read_nowait(-1)
        if len(data) == length:
            return data
        chunks, size = [data], len(data)
    else:
        chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise BadBody(413, f"body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BadBody(408, f"body not received within {timeout:g} s") from None
    return b"".join(chunks)


async def parse_payload(request: web.Request, limit: int, timeout: float = BODY_TIMEOUT) -> tuple[Any, str | None]:
    """The payload a request carries, and its JSON text when it came as JSON."""
    ctype = request.content_type
    if ctype == "multipart/form-data":
        refuse_declared_length(request, limit)
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise BadBody(413, f"body is over the limit of {limit} bytes") from None
        except (ValueError, AssertionError) as exc:
            raise BadBody(400, f"malformed multipart body: {exc}") from None
        payload = {}
        for key, value in form.items():
            if isinstance(value, web.FileField):
                raise BadBody(400, "File uploads are not allowed")
            payload[key] = value
        return payload, None
    body = await read_body(request, limit, timeout)
    if not body.strip():
        return {}, None  # Grafana OnCall accepts an empty body as {}
    if ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json")):
        return parse_json_body(body)
    if ctype == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise BadBody(400, "form body is not valid UTF-8") from None
        return dict(pairs), None  # last value per key, as Grafana OnCall keeps it
    raise BadBody(415, f'Unsupported media type "{ctype}" in request')


class Ingress:
    """The integration endpoints, over whichever pipeline is current."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], *, max_body_bytes: int, hooks=None,
                 body_timeout: float = BODY_TIMEOUT, on_heartbeat=None):
        self.get_pipeline = get_pipeline
        self.on_heartbeat = on_heartbeat  # optional coroutine (integration, previous state)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.hooks = hooks  # optional: .accepted(integration, n, source), .rejected(integration_id, source, reason)

    def routes(self) -> list[web.RouteDef]:
        base = "/integrations/v1/{kind}/{token}"
        return [
            web.post(base, self.receive),
            web.post(base + "/", self.receive),
            web.route("*", base + "/heartbeat", self.heartbeat),
            web.route("*", base + "/heartbeat/", self.heartbeat),
        ]

    def _rejected(self, integration_id: str, reason: str) -> None:
        if self.hooks is not None:
            self.hooks.rejected(integration_id, "http", reason)

    async def receive(self, request: web.Request) -> web.Response:
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
            payload, text = await parse_payload(request, self.max_body_bytes, self.body_timeout)
        except BadBody as exc:
            self._rejected(integration.id, {400: "bad_body", 408: "timeout", 413: "too_large",
                                            415: "content_type"}[exc.status])
            return error(exc.status, str(exc))
        try:
            accepted = await pipeline.ingest(integration, payload, payload_json=text, source="http")
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
        if self.hooks is not None:
            self.hooks.accepted(integration, len(accepted), "http")
        if not accepted:
            return web.json_response({"alerts": []})
        first = accepted[0]
        body = {"alert_id": first.alert_id, "alert_group_id": first.alert_group_id,
                "grouping_key": first.grouping_key}
        if len(accepted) > 1:
            body["alerts"] = [
                {"alert_id": a.alert_id, "alert_group_id": a.alert_group_id, "grouping_key": a.grouping_key}
                for a in accepted
            ]
        return web.json_response(body)

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
        return web.json_response(":)")


_BUSY = json.dumps({"error": "too many connections, retry later"}).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY
)


class _Refused(asyncio.Protocol):
    """Answers 503 and hangs up: the connection cap is reached."""

    def connection_made(self, transport) -> None:
        transport.write(_BUSY_RESPONSE)
        transport.close()


class _Counted(asyncio.Protocol):
    """An aiohttp connection, counted while it lives."""

    def __init__(self, inner: asyncio.Protocol, gate: "ConnectionGate"):
        self._inner, self._gate = inner, gate

    def connection_made(self, transport) -> None:
        self._gate.active += 1
        self._inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self._gate.active -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionGate:
    """A protocol factory that caps open HTTP connections, so memory stays bounded."""

    def __init__(self, factory, limit: int):
        self._factory, self.limit, self.active = factory, limit, 0

    def __call__(self) -> asyncio.Protocol:
        if self.active >= self.limit:
            return _Refused()
        return _Counted(self._factory(), self)


class GatedSite(web.BaseSite):
    """A TCP site whose connections pass through a ConnectionGate."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 backlog: int = 1024):
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self.max_connections = host, port, max_connections
        self.gate: ConnectionGate | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self.gate = ConnectionGate(self._runner.server, self.max_connections)
        self._server = await asyncio.get_running_loop().create_server(
            self.gate, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
