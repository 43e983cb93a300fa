"""Request bodies into payloads: strict JSON, urlencoded forms and multipart forms.

Pure functions over bytes, stdlib only, so a worker process can import this module
cheaply; `BodyParsers` runs the big ones in such a worker. Every refusal is a BadBody
carrying its HTTP status.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import marshal
import math
import re
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from email.errors import NoBoundaryInMultipartDefect, StartBoundaryNotFoundDefect
from email.parser import BytesParser
from email.policy import Compat32
from email.utils import collapse_rfc2231_value
from multiprocessing import get_context
from typing import Any
from urllib.parse import parse_qsl

log = logging.getLogger("tocsin.http")

MAX_JSON_DEPTH = 128
# Bodies up to this size are parsed on the loop (a millisecond or two at most); larger
# ones in a worker process, see BodyParsers.
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

    def __reduce__(self):  # crosses from a worker process
        return BadBody, (self.status, str(self))


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


def parse_body(ctype: str, body: bytes, content_type: str = "") -> tuple[Any, str]:
    """(payload, its JSON text) for a body of media type `ctype` (`content_type`: the whole
    header, for the multipart boundary); BadBody(415) for a type tocsin does not read."""
    if ctype == "multipart/form-data":
        return parse_multipart_body(body, content_type)
    if ctype == "application/x-www-form-urlencoded":
        return parse_form_body(body)
    if _is_json(ctype):
        return parse_json_body(body)
    raise BadBody(415, f'Unsupported media type "{ctype}" in request')


def _is_json(ctype: str) -> bool:
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


def _parse_for_transfer(ctype: str, body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """In the worker: parse and check everything; hand back the payload marshalled (the
    fastest C loader of plain JSON values) and the JSON text when it is not the body."""
    payload, text = parse_body(ctype, body, content_type)
    return _pack(payload), None if _is_json(ctype) else text


# The loop builds a big payload in steps of about this much marshal data (~2-4 ms each).
_PIECE_BYTES = 64 * 1024


def _pack(payload: Any) -> list[bytes]:
    """The payload marshalled in pieces: its top level (dict items, list elements) cut
    into runs of about _PIECE_BYTES, so the loop can build it in bounded steps."""
    whole = marshal.dumps(payload)
    if len(whole) <= _PIECE_BYTES or len(payload) < 2:
        return [whole]
    items = list(payload.items()) if isinstance(payload, dict) else payload
    step = max(1, len(items) * _PIECE_BYTES // len(whole))
    runs = (items[i:i + step] for i in range(0, len(items), step))
    return [marshal.dumps(dict(run) if isinstance(payload, dict) else run) for run in runs]


async def _unpack(pieces: list[bytes]) -> Any:
    """The payload from _pack's pieces, yielding to the loop between them."""
    payload = _unmarshal(pieces[0])
    for piece in pieces[1:]:
        await asyncio.sleep(0)
        part = _unmarshal(piece)
        if isinstance(payload, dict):
            payload.update(part)
        else:
            payload.extend(part)
    return payload


class GcPause:
    """Pauses the cyclic GC while a big payload built from a worker is alive.

    A 1 MB body of 200k empty lists is 200k GC-tracked containers; while they live, the
    next full collection walks them all: 100-230 ms of stopped loop measured (one to four
    such bodies at once). A tracked object freed before the collector runs leaves no work
    behind, so the collector waits until the request that owns the payload is over
    (`with GcPause() as pause:` around it; the parser calls `pause.hold()`). Pauses
    overlap; a pause never lasts beyond MAX_SECONDS, so cycles elsewhere still get
    collected under a steady stream of big bodies.
    """

    MAX_SECONDS = 2.0
    _holders = 0
    _since = 0.0

    def __init__(self):
        self.held = False

    def hold(self) -> None:
        cls = type(self)
        if self.held:
            return
        now = time.monotonic()
        if cls._holders == 0:
            if not gc.isenabled():
                return  # paused by someone else: leave it alone
            cls._since = now
            gc.disable()
        elif now - cls._since > self.MAX_SECONDS:
            return
        cls._holders += 1
        self.held = True

    def __enter__(self) -> "GcPause":
        return self

    def __exit__(self, *exc) -> None:
        cls = type(self)
        if self.held:
            self.held = False
            cls._holders -= 1
            if cls._holders == 0:
                gc.enable()


def _unmarshal(data: bytes) -> Any:
    """The payload back from a worker, with the cyclic GC paused: building 200k lists
    with it on costs 44-62 ms (full collections over the half-built payload), off 14 ms.
    Safe: marshal data from our own worker, JSON values only, no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return marshal.loads(data)
    finally:
        if enabled:
            gc.enable()


def _quiet_worker() -> None:
    """A worker leaves Ctrl-C to the daemon (which shuts the pool down), no traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BodyParsers:
    """Where bodies are parsed: small ones inline, big ones in worker processes.

    Why processes. Parsing a 1 MB body is pure Python for the most part (the depth walk,
    parse_qsl, the MIME parser: 100-400 ms). In a thread it still holds the GIL in 5 ms
    slices, and with a few such threads the loop waits for the GIL at every turn: /healthz
    took 0.4-0.6 s under four concurrent bodies (bench/loop_lag.py). A worker does all of
    it and every check, and returns the payload's JSON text; the loop's only work is one
    marshal.loads of the payload (C, 7-28 ms for the worst 1 MB bodies, see _unmarshal).
    `workers=0` parses big bodies in a thread instead (no processes).
    """

    def __init__(self, workers: int = 2):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, ctype: str, body: bytes, content_type: str = "",
                    pause: GcPause | None = None) -> tuple[Any, str]:
        """(payload, its JSON text); `pause` is held when the payload is a big one."""
        if len(body) <= INLINE_BYTES:
            return parse_body(ctype, body, content_type)
        if self.workers <= 0:
            return await asyncio.to_thread(parse_body, ctype, body, content_type)
        try:
            # Submitted from a thread: the first submit starts the worker processes (a
            # few hundred ms of forkserver start-up that must not land on the loop).
            job = await asyncio.to_thread(self._executor().submit, _parse_for_transfer, ctype, body, content_type)
            pieces, text = await asyncio.wrap_future(job)
            if pause is not None:
                pause.hold()
        except BrokenProcessPool:  # a worker died (OOM killer?): start afresh next time
            log.warning("body parser worker died; restarting the pool")
            self.close()
            return await asyncio.to_thread(parse_body, ctype, body, content_type)
        return await _unpack(pieces), text if text is not None else body.decode("utf-8")

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: the workers never inherit the daemon's threads or sockets.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("forkserver"),
                                             initializer=_quiet_worker)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
