"""The HTTP edge under aiohttp: deadlines for every connection, the connection cap, and
JSON for every refusal aiohttp makes on its own (bad request lines, 404, 405, 500).

aiohttp has a keep-alive timeout but no deadline for a request head or body: a socket
that never finishes its head holds its slot for good. So each connection is a
`Connection` (aiohttp's RequestHandler with three timers) made by a `ConnectionGate`,
and `edge_middleware` tells the connection when a request starts and ends.

- head: `header_timeout` from the first byte of a request (or from connect) until the
  head is parsed; late: 408 if some of it came, else a silent close.
- body: `body_timeout` from the head until the body's last byte, on every body path
  (JSON, forms, multipart, the UI's forms): a read after the deadline raises
  `BodyTimeout`, answered 408.
- idle keep-alive: aiohttp's own `keepalive_timeout`.

At the cap, a new connection evicts the connection that has waited longest for a
request (idle or still sending its head), so idle sockets never shut out a client;
only when every connection is inside a request does it get 503.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("tocsin.http")


class BodyTimeout(asyncio.TimeoutError):
    """The request body did not arrive within body_timeout.

    A TimeoutError, so aiohttp's lingering read after a response takes it as the end.
    """


class Throttled:
    """One log line per kind per interval; the next line says how many were skipped."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self.logger, self.interval = logger, interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, text: str, *, level: int = logging.WARNING, exc_info: Any = None) -> None:
        """Log `text` unless a line of this kind went out less than `interval` ago."""
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f" ({skipped} more like it suppressed)" if skipped else ""
        self.logger.log(level, "%s%s", text, more, exc_info=exc_info)


_throttled = Throttled(log)  # for requests that did not come through a ConnectionGate


def dumps(value: Any) -> str:
    """Standard JSON only: NaN and infinities (from rows stored before the edge refused
    them) become null instead of the non-standard `NaN` tokens."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value - value == 0 else None  # nan - nan and inf - inf are nan
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_response(body: Any, *, status: int = 200, headers: dict | None = None) -> web.Response:
    """web.json_response that never emits NaN or Infinity."""
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


def error(status: int, text: str, headers: dict | None = None) -> web.Response:
    """Every refusal is JSON `{"error": …}`."""
    return json_response({"error": text}, status=status, headers=headers)


def _raw_response(status: int, reason: str, text: str, extra: str = "") -> bytes:
    body = json.dumps({"error": text}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n{extra}"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


_BUSY = _raw_response(503, "Service Unavailable", "too many connections, retry later", "Retry-After: 1\r\n")


class Connection(RequestHandler):
    """aiohttp's per-connection protocol with a head deadline, a body deadline and a
    JSON answer for the requests it cannot parse."""

    def __init__(self, manager: web.Server, *, gate: "ConnectionGate", **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._request: web.BaseRequest | None = None
        self._head_bytes = False   # some of the next request head has arrived
        self._eof = False
        self._last_body = None     # the previous request's body: aiohttp may still drain it

    # --- asyncio protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        self._gate.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._request is None and (self._last_body is None or self._last_body.is_eof()):
            self._head_bytes = True
            if self._head_timer is None:
                self._arm_head()
        super().data_received(data)

    def eof_received(self) -> bool:
        """A half-close: finish the request in progress and answer it, then close."""
        self._eof = True
        request = self._request
        if request is None and not self._head_bytes:
            return False  # nothing to answer: let the transport close
        # A head that arrived with the EOF starts its request in a moment (and sees
        # _eof then); one that never completes meets the head deadline.
        self.keep_alive(False)
        if request is not None and not request.content.is_eof():
            # No more body can come: readers see the end now (a short body is the
            # reader's error to report), and aiohttp does not linger for the rest.
            request.content.feed_eof()
        return True

    @property
    def half_closed(self) -> bool:
        """The client shut its sending side (it still reads our answer)."""
        return self._eof

    # --- the head deadline --------------------------------------------------------

    def _arm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self._loop.call_later(self._gate.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._request is not None or self.transport is None:
            return
        if self._head_bytes:
            self._gate.refused("header_timeout")
            self.transport.write(_raw_response(408, "Request Timeout",
                                               f"request head not received within {self._gate.header_timeout:g} s"))
        self.force_close()

    # --- called by edge_middleware ------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        """The head is parsed: stop the head deadline, start the body deadline."""
        self._request = request
        self._head_bytes = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._gate.busy(self)
        content = request.content
        if request.body_exists and not content.is_eof():
            timeout = self._gate.body_timeout
            self._body_timer = self._loop.call_later(timeout, self._body_late, content, timeout)
            content.on_eof(self._body_arrived)
        if self._eof:
            self.eof_received()

    def request_finished(self) -> None:
        """The handler answered: the connection waits for its next request."""
        if self._request is not None:
            self._last_body = self._request.content
        self._request = None
        self._body_arrived()
        self._gate.waiting(self)

    def _body_arrived(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self, content, timeout: float) -> None:
        self._body_timer = None
        if not content.is_eof():
            content.set_exception(BodyTimeout(f"body not received within {timeout:g} s"))

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # --- aiohttp's own errors -----------------------------------------------------

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """JSON instead of aiohttp's text, and one short log line instead of a traceback."""
        if status >= 500:
            self._gate.log.warning("http_500", f"http: unhandled error on {request.method} {request.path}: {exc!r}",
                                   level=logging.ERROR, exc_info=exc)
            text = "internal error"
        else:
            text = _first_line(message or (str(exc) if exc else "") or "bad request")
            self._gate.log.warning(f"http_{status}_{type(exc).__name__}",
                              f"http: malformed request from {request.remote}: {text}")
            self._gate.refused("malformed")
        if request.writer.output_size > 0:  # the response already started: nothing more to say
            raise ConnectionError("response already started")
        resp = error(status, text if status < 500 else "internal error")
        resp.force_close()
        return resp


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


class _Refused(asyncio.Protocol):
    """Answers 503 and hangs up: every connection is inside a request."""

    def connection_made(self, transport) -> None:
        transport.write(_BUSY)
        transport.close()


class ConnectionGate:
    """The protocol factory: caps open connections (so memory stays bounded), evicting
    the connection that has waited longest for a request before refusing anyone."""

    def __init__(self, server: web.Server, *, limit: int, header_timeout: float, body_timeout: float,
                 on_refused=None):
        self._server = server
        self.limit = limit
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.on_refused = on_refused  # optional callable(reason): metrics
        self.log = Throttled(log)
        self._open: set[Connection] = set()
        # Connections between requests, oldest first (dicts keep insertion order).
        self._waiting: dict[Connection, None] = {}
        self.evicted = 0

    @property
    def active(self) -> int:
        return len(self._open)

    def __call__(self) -> asyncio.Protocol:
        if len(self._open) >= self.limit and not self._evict():
            self.refused("busy")
            return _Refused()
        # Server keeps its RequestHandler arguments (keepalive_timeout, limits) in _kwargs.
        conn = Connection(self._server, gate=self, loop=self._server._loop, **self._server._kwargs)
        self._open.add(conn)
        self._waiting[conn] = None
        return conn

    def _evict(self) -> bool:
        # A connection whose transport is not attached yet (accepted this very loop
        # iteration) is skipped: closing it is not possible before connection_made.
        victim = next((c for c in self._waiting if c.transport is not None), None)
        if victim is None:
            return False
        self.closed(victim)
        self.evicted += 1
        victim.force_close()
        return True

    def busy(self, conn: Connection) -> None:
        """The connection is inside a request: not evictable."""
        self._waiting.pop(conn, None)

    def waiting(self, conn: Connection) -> None:
        """The connection waits for its next request: last in line for eviction."""
        if conn in self._open:
            self._waiting.pop(conn, None)
            self._waiting[conn] = None  # to the back of the line

    def closed(self, conn: Connection) -> None:
        """The connection is gone (or evicted): its slot is free."""
        self._open.discard(conn)
        self._waiting.pop(conn, None)

    def refused(self, reason: str) -> None:
        """Count a refusal (busy, header_timeout, malformed) in the metrics hook."""
        if self.on_refused is not None:
            self.on_refused(reason)


class GatedSite(web.BaseSite):
    """A TCP site whose connections come from a ConnectionGate."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 header_timeout: float = 10.0, body_timeout: float = 30.0, backlog: int = 1024,
                 on_refused=None):
        super().__init__(runner, backlog=backlog)
        self._host, self._port = host, port
        self.max_connections, self.header_timeout, self.body_timeout = max_connections, header_timeout, body_timeout
        self.on_refused = on_refused  # optional callable(reason): busy, header_timeout, malformed
        self.gate: ConnectionGate | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self.gate = ConnectionGate(self._runner.server, limit=self.max_connections,
                                   header_timeout=self.header_timeout, body_timeout=self.body_timeout,
                                   on_refused=self.on_refused)
        self._server = await asyncio.get_running_loop().create_server(
            self.gate, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


def _wants_json(request: web.BaseRequest) -> bool:
    return not request.path.startswith("/ui/")  # the UI answers with its own pages


@web.middleware
async def edge_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Marks the request's start and end on its connection (the head and body
    deadlines) and turns every refusal outside the UI into JSON."""
    conn = request.protocol if isinstance(request.protocol, Connection) else None
    if conn is not None:
        conn.request_started(request)
    try:
        response = await handler(request)
        if conn is not None and conn.half_closed:
            response.force_close()  # the client sends nothing more: close once answered
        if request.content.exception() is not None:
            # The body broke (undecodable, late): close once answered, and end the stream
            # so aiohttp's lingering read does not raise (and log) the error again.
            response.force_close()
            request.content.feed_eof()
        return response
    except BodyTimeout as exc:
        resp = error(408, str(exc))
        resp.force_close()
        return resp
    except web.HTTPException as exc:
        if not _wants_json(request) or exc.status < 400 or (exc.content_type or "").endswith("json"):
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        text = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 405:
            text = f"method {request.method} not allowed here"
        elif exc.status == 404:
            text = f"no such resource: {request.path}"
        return error(exc.status, text, headers)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one JSON line, log it
        (conn._gate.log if conn is not None else _throttled).warning(
            "http_500", f"http: unhandled error on {request.method} {request.path}: {exc!r}",
            level=logging.ERROR, exc_info=exc)
        if not _wants_json(request):
            raise
        return error(500, "internal error")
    finally:
        if conn is not None:
            conn.request_finished()
