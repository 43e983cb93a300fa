"""HTTP ingestion: `POST /integrations/v1/<kind>/<token>/` turns a request into payloads.

It knows HTTP and nothing of grouping: it finds the integration, parses the body,
hands the payload to the pipeline and maps the outcome to a status (CONTRACT §4).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from email.errors import NoBoundaryInMultipartDefect, StartBoundaryNotFoundDefect
from email.parser import BytesParser
from email.policy import Compat32
from email.utils import collapse_rfc2231_value
from typing import Any, Callable
from urllib.parse import parse_qsl

from aiohttp import web

from grouping.pipeline import Pipeline, RateLimited, Unavailable

from .edge import BodyCut, BodyTimeout, error, json_response

log = logging.getLogger("tocsin.http")

MAX_JSON_DEPTH = 128
# Bodies up to this size are parsed on the loop (well under a millisecond); larger ones
# in a thread. Measured on a 1 MB body of 200k empty lists: json.loads 35-75 ms, the old
# recursive-free depth walk 380 ms, parse_qsl of a 100k-field form 150 ms, all of it on
# the loop; see bench/loop_lag.py for what remains.
INLINE_BYTES = 64 * 1024

# A float literal can only overflow to infinity with a 3-digit exponent or 300+ digits;
# only then is every float checked (parse_float costs a Python call per number).
_MAY_OVERFLOW = re.compile(rb"[eE][+]?0*[1-9][0-9]{2}|[0-9]{300}")
# A lone surrogate can only come from a \uD800-\uDFFF escape (strict UTF-8 decoding
# refuses encoded ones); only then are the parsed strings checked.
_MAY_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


class BadBody(Exception):
    """The request body cannot become a payload; carries the HTTP status."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when containers nest at most `limit` deep (level by level, without recursion).

    Each level is one list comprehension, so a 200k-container body costs ~20 ms rather
    than the 380 ms of a per-item stack walk.
    """
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        if not level:
            return True
        level = [v for c in level for v in (c.values() if type(c) is dict else c)
                 if type(v) is dict or type(v) is list]
    return not level


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json_body(body: bytes) -> tuple[Any, str]:
    """(payload, the text as received); BadBody(400) for anything that is not strict JSON:
    NaN, Infinity, numbers that overflow and lone surrogates are refused, as Grafana
    OnCall's parser and any SQL store would refuse them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(400, f"body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    kwargs: dict[str, Any] = {"parse_constant": _no_constant}
    if _MAY_OVERFLOW.search(body):
        kwargs["parse_float"] = _finite_float
    try:
        payload = json.loads(text.lstrip("\ufeff"), **kwargs)
    except RecursionError:
        raise BadBody(400, "JSON parse error - nested too deeply") from None
    except ValueError as exc:
        raise BadBody(400, f"JSON parse error - {exc}") from None
    if not isinstance(payload, (dict, list)):
        raise BadBody(400, "JSON body must be an object or an array")
    if (body.count(b"[") + body.count(b"{")) > MAX_JSON_DEPTH and not json_depth_ok(payload):
        raise BadBody(400, f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels")
    if _MAY_SURROGATE.search(body):
        check_text(payload)
    return payload, text


def check_text(payload: Any) -> None:
    """BadBody(400) when a string holds a lone surrogate (a half UTF-16 pair, which no
    UTF-8 store can keep): one C-speed encode of the whole payload finds it."""
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start]
        raise BadBody(400, f"JSON parse error - lone surrogate \\u{ord(bad):04x} in a string"
                           " (half a UTF-16 pair is not valid Unicode)") from None


def parse_form_body(body: bytes) -> tuple[dict, str]:
    """(payload, its JSON text): last value per key, as Grafana OnCall keeps it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody(400, "form body is not valid UTF-8") from None
    # Percent-escapes decode with errors="replace": never a lone surrogate.
    payload = dict(parse_qsl(text, keep_blank_values=True, strict_parsing=False))
    return payload, json.dumps(payload)


def parse_multipart_body(body: bytes, content_type: str) -> tuple[dict, str]:
    """(payload, its JSON text) of multipart/form-data, through the stdlib MIME parser;
    BadBody(400) for files and for anything that is not multipart."""
    head = b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    msg = _MIME.parsebytes(head + body)
    if not msg.is_multipart() or any(isinstance(d, _NO_PARTS) for d in msg.defects):
        raise BadBody(400, "malformed multipart body: no parts found for its boundary")
    payload: dict[str, str] = {}
    for part in msg.get_payload():
        if part.get_filename() is not None:
            raise BadBody(400, "File uploads are not allowed")
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        name = _header_text(collapse_rfc2231_value(name))
        data = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "utf-8"
        try:
            payload[name] = data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            raise BadBody(400, f"multipart field '{name}' is not valid {charset}") from None
        check_text(payload[name])
    return payload, json.dumps(payload)


def _header_text(value: str) -> str:
    """A MIME header value as text: raw 8-bit bytes (surrogate-escaped by the parser) read as UTF-8."""
    if value.isascii():
        return value
    try:
        return value.encode("ascii", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise BadBody(400, "multipart field name is not valid UTF-8") from None


class _RawHeaders(Compat32):
    """compat32 handing header values back raw: 8-bit bytes stay surrogate-escaped for
    _header_text to read as UTF-8 (compat32 would turn them into U+FFFD)."""

    def header_fetch_parse(self, name, value):
        return value


_MIME = BytesParser(policy=_RawHeaders())
_NO_PARTS = (NoBoundaryInMultipartDefect, StartBoundaryNotFoundDefect)


def refuse_declared_length(request: web.Request, limit: int) -> None:
    """BadBody(413) before reading, when Content-Length already says the body is too big."""
    if request.content_length is not None and request.content_length > limit:
        raise BadBody(413, f"body of {request.content_length} bytes is over the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or BadBody(413) as soon as it passes `limit` bytes, or BadBody(408)
    when it misses the connection's body deadline (handlers/edge.py)."""
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
        while True:
            chunk = await request.content.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BadBody(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except BodyTimeout as exc:
        raise BadBody(408, str(exc)) from None
    except BodyCut as exc:
        raise BadBody(400, str(exc)) from None
    return b"".join(chunks)


async def off_loop(size: int, parse: Callable, *args) -> Any:
    """parse(*args), in a thread when the body is big enough to stall the loop."""
    if size <= INLINE_BYTES:
        return parse(*args)
    return await asyncio.to_thread(parse, *args)


async def parse_payload(request: web.Request, limit: int) -> tuple[Any, str | None]:
    """The payload a request carries, and its JSON text (None when there is no body)."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}, None  # Grafana OnCall accepts an empty body as {}
    ctype = request.content_type
    if ctype == "multipart/form-data":
        return await off_loop(len(body), parse_multipart_body, body, request.headers.get("Content-Type", ""))
    parse = _PARSERS.get(ctype)
    if parse is None and ctype.startswith("application/") and ctype.endswith("+json"):
        parse = parse_json_body
    if parse is None:
        raise BadBody(415, f'Unsupported media type "{ctype}" in request')
    return await off_loop(len(body), parse, body)


_FORM_KEY = "tocsin.form"


async def read_form(request: web.Request, limit: int = 1024 * 1024) -> dict[str, str]:
    """A form body (urlencoded or multipart, no files) read like an integration body:
    bounded, under the connection's body deadline, parsed off the loop when big.

    The UI's replacement for `await request.post()` (which parses on the loop); read once
    per request, so a middleware and the handler can both ask. HTTP errors as aiohttp's.
    """
    if _FORM_KEY in request:
        return request[_FORM_KEY]
    try:
        body = await read_body(request, limit)
        ctype = request.content_type
        if ctype == "multipart/form-data" and body.strip():
            form, _ = await off_loop(len(body), parse_multipart_body, body, request.headers.get("Content-Type", ""))
        elif ctype == "application/x-www-form-urlencoded":
            form, _ = await off_loop(len(body), parse_form_body, body)
        else:
            form = {}
    except BadBody as exc:
        raise _http_error(exc) from None
    request[_FORM_KEY] = form
    return form


def _http_error(exc: BadBody) -> web.HTTPException:
    classes = {408: web.HTTPRequestTimeout, 413: web.HTTPRequestEntityTooLarge, 415: web.HTTPUnsupportedMediaType}
    if exc.status == 413:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=str(exc))
    return classes.get(exc.status, web.HTTPBadRequest)(text=str(exc))


_PARSERS = {
    "application/json": parse_json_body,
    "application/x-www-form-urlencoded": parse_form_body,
    "multipart/form-data": parse_multipart_body,
}


class Ingress:
    """The integration endpoints, over whichever pipeline is current."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], *, max_body_bytes: int, hooks=None,
                 on_heartbeat=None):
        self.get_pipeline = get_pipeline
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
            payload, text = await parse_payload(request, self.max_body_bytes)
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
