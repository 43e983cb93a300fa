"""Notifiers: one delivery attempt to a webhook, a Slack incoming webhook or a mailbox.

`send` makes one attempt and never raises; the dispatcher owns retries, using
`SendResult.retry`, `backoff` and `MAX_ATTEMPTS`. User templates (webhook body and
header values) render in grouping's sandbox under a time budget.
"""
from __future__ import annotations

import asyncio
import email.utils
import errno
import functools
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from email.message import EmailMessage
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import jinja2

from grouping.durations import parse_duration
from grouping.templates import (
    MAX_RESULT_LENGTH,
    Budget,
    NeedsMoreTime,
    TemplateCompileError,
    compile_template,
    render,
)

KINDS = ("webhook", "slack", "email")
EVENTS = ("triggered", "acknowledged", "unacknowledged", "resolved", "unresolved", "silenced")
DEFAULT_EVENTS = ("acknowledged", "resolved")
MAX_ATTEMPTS = 6
USER_AGENT = "tocsin"

# A render first runs on the event loop with this much time; past it, it restarts in a
# worker thread with the full budget (the same split as grouping's pipeline).
INLINE_SECONDS = 0.01
RENDER_SECONDS = 1.0

# Headers tocsin sets itself (or the HTTP client owns): a notifier may not replace them.
RESERVED_HEADERS = frozenset(
    {"idempotency-key", "x-tocsin-event", "x-tocsin-attempt", "content-length", "host", "transfer-encoding"}
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

_COMMON_KEYS = frozenset({"name", "kind", "events", "timeout"})
_KIND_KEYS = {
    "webhook": frozenset({"url", "body", "headers"}),
    "slack": frozenset({"url"}),
    "email": frozenset({"to", "sender", "smtp_host", "smtp_port", "starttls", "username", "password"}),
}
_ALL_KEYS = _COMMON_KEYS.union(*_KIND_KEYS.values())

_STATE_EMOJI = {
    "new": ":red_circle:",
    "acknowledged": ":large_yellow_circle:",
    "resolved": ":large_green_circle:",
    "silenced": ":white_circle:",
}
# When the group's state is missing: what the event implies.
_EVENT_STATE = {
    "triggered": "new",
    "acknowledged": "acknowledged",
    "unacknowledged": "new",
    "resolved": "resolved",
    "unresolved": "new",
    "silenced": "silenced",
}
_SLACK_SECTION_LIMIT = 3000  # characters in one section block's text


@dataclass(frozen=True)
class NotifierConfig:
    """One [[notifiers]] table, validated, defaults applied."""

    name: str
    kind: str  # "webhook" | "slack" | "email"
    events: tuple[str, ...] = DEFAULT_EVENTS  # lifecycle events it is also told about
    url: str | None = None  # webhook, slack (incoming-webhook URL)
    body: str | None = None  # webhook: Jinja template for the body; None: documented_body()
    # webhook: extra headers, values are Jinja templates; left out of hash() (a mapping has none)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    timeout: float = 10.0  # seconds for one attempt
    to: tuple[str, ...] = ()
    sender: str = "tocsin@localhost"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Delivery:
    """What one attempt carries; notification_id is the idempotency key, stable across retries."""

    notification_id: str
    attempt: int  # 1, 2, …
    event: str  # "triggered", "acknowledged", …
    alert_group: Mapping  # id, integration_id, route_id, state, alerts_count, title, message, …
    integration: Mapping  # id, name, kind
    step: int | None  # escalation step index for "triggered", else None


@dataclass(frozen=True)
class SendResult:
    """How one attempt went; `retry` says whether another attempt could do better."""

    ok: bool
    retry: bool
    detail: str


# ---------------------------------------------------------------- configuration


def parse_notifier(table: dict, where: str, problems: list[str]) -> NotifierConfig | None:
    """Validate one [[notifiers]] table; each defect is one line in `problems`, prefixed by `where`."""
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return None
    found: list[str] = []

    def problem(text: str) -> None:
        found.append(f"{where}: {text}")

    def get(key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in table:
            if required:
                problem(f"missing required key '{key}'")
            return default
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            names = " or ".join(k.__name__ for k in _as_tuple(kind))
            problem(f"'{key}' must be {names}, got {type(value).__name__}")
            return default
        return value

    for key in table:
        if key not in _ALL_KEYS:
            problem(f"unknown key '{key}'")

    name = get("name", str, "", required=True)
    if isinstance(table.get("name"), str) and not name.strip():
        problem("'name' must not be empty")
    kind = get("kind", str, "", required=True)
    if kind and kind not in KINDS:
        problem(f"unknown kind '{kind}' (known: {', '.join(KINDS)})")
    elif kind:
        for key in table:
            if key in _ALL_KEYS and key not in _COMMON_KEYS and key not in _KIND_KEYS[kind]:
                problem(f"'{key}' does not apply to kind '{kind}'")

    events = _parse_events(get("events", list, list(DEFAULT_EVENTS)), problem)

    timeout = get("timeout", (int, float, str), 10.0)
    try:
        timeout = parse_duration(timeout)
        if timeout <= 0:
            problem("'timeout' must be a positive duration")
    except ValueError as exc:
        problem(f"'timeout': {exc}")
        timeout = 10.0

    url = get("url", str, None, required=kind in ("webhook", "slack"))
    if url is not None and not _is_http_url(url):
        problem("'url' must be an http:// or https:// URL with a host")

    body = get("body", str, None)
    if body is not None:
        _check_template(body, "template 'body'", problem)
    headers = _parse_headers(get("headers", dict, {}), problem)

    to = get("to", list, [], required=kind == "email")
    if kind == "email" and isinstance(table.get("to"), list) and not to:
        problem("'to' must list at least one address")
    for address in to:
        if not isinstance(address, str) or not _ADDRESS.match(address):
            problem(f"'to' entry {address!r} is not an email address")
    sender = get("sender", str, "tocsin@localhost")
    if not _ADDRESS.match(sender):
        problem(f"'sender' {sender!r} is not an email address")
    smtp_host = get("smtp_host", str, "127.0.0.1")
    if not smtp_host.strip():
        problem("'smtp_host' must not be empty")
    smtp_port = get("smtp_port", int, 25)
    if not 0 < smtp_port < 65536:
        problem(f"'smtp_port' {smtp_port} out of range")
    starttls = get("starttls", bool, False)
    username = get("username", str, None)
    password = get("password", str, None)
    if password is not None and username is None:
        problem("'password' needs 'username'")

    problems.extend(found)
    if found:
        return None
    return NotifierConfig(
        name=name,
        kind=kind,
        events=events,
        url=url,
        body=body,
        headers=MappingProxyType(headers),
        timeout=float(timeout),
        to=tuple(to),
        sender=sender,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        starttls=starttls,
        username=username,
        password=password,
    )


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _parse_events(events: list, problem) -> tuple[str, ...]:
    chosen = []
    for event in events:
        if event not in EVENTS:
            problem(f"unknown event {event!r} in 'events' (known: {', '.join(EVENTS)})")
        elif event not in chosen:
            chosen.append(event)
    return tuple(chosen)


def _parse_headers(headers: dict, problem) -> dict[str, str]:
    valid = {}
    seen: set[str] = set()
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            problem(f"header name {name!r} is not a valid HTTP header name")
        elif name.lower() in RESERVED_HEADERS:
            problem(f"header '{name}' is set by tocsin and cannot be configured")
        elif name.lower() in seen:
            problem(f"header '{name}' is given twice")
        elif not isinstance(value, str):
            problem(f"header '{name}' must be a string template, got {type(value).__name__}")
        elif _check_template(value, f"header '{name}'", problem):
            valid[name] = value
        seen.add(name.lower())
    return valid


def _check_template(source: str, what: str, problem) -> bool:
    try:
        _compiled(source)
    except TemplateCompileError as exc:
        problem(f"{what}: {exc}")
        return False
    return True


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # raises on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# ---------------------------------------------------------------- retry schedule


def backoff(attempt: int) -> float:
    """Seconds to wait after attempt `attempt` failed: 1, 2, 4, … capped at 60."""
    return float(min(60, 2 ** (min(max(attempt, 1), 7) - 1)))


# ---------------------------------------------------------------- sending


async def send(notifier: NotifierConfig, delivery: Delivery, session: aiohttp.ClientSession) -> SendResult:
    """One attempt to deliver; every outcome, failures included, is a SendResult."""
    try:
        if notifier.kind == "webhook":
            return await _send_webhook(notifier, delivery, session)
        if notifier.kind == "slack":
            return await _post(session, notifier, _json_bytes(slack_message(delivery)), {
                "Content-Type": "application/json", "User-Agent": USER_AGENT,
            })
        if notifier.kind == "email":
            return await _send_email(notifier, delivery)
        return SendResult(False, False, f"unknown notifier kind '{notifier.kind}'")
    except Exception as exc:  # a bug here must not take the dispatcher down
        return SendResult(False, False, f"unexpected error: {type(exc).__name__}: {exc}")


def documented_body(delivery: Delivery) -> dict:
    """The default webhook JSON; the same names are the variables of a notifier's templates."""
    return {
        "event": delivery.event,
        "alert_group": dict(delivery.alert_group),
        "integration": dict(delivery.integration),
        "step": delivery.step,
        "notification_id": delivery.notification_id,
        "attempt": delivery.attempt,
    }


# ---- webhook


class _TemplateFailed(Exception):
    """A notifier template failed to render; str() names the template and the reason."""


async def _send_webhook(notifier: NotifierConfig, delivery: Delivery, session: aiohttp.ClientSession) -> SendResult:
    try:
        body, content_type, custom = await _render_webhook(notifier, documented_body(delivery))
    except _TemplateFailed as exc:
        return SendResult(False, False, f"template error: {exc}")
    if body is None:
        body, content_type = _json_bytes(documented_body(delivery)), "application/json"
    headers = {"Content-Type": content_type, "User-Agent": USER_AGENT}
    for name, value in custom.items():  # a configured Content-Type or User-Agent wins
        for existing in [k for k in headers if k.lower() == name.lower()]:
            del headers[existing]
        headers[name] = value
    headers["Idempotency-Key"] = delivery.notification_id
    headers["X-Tocsin-Event"] = delivery.event
    headers["X-Tocsin-Attempt"] = str(delivery.attempt)
    return await _post(session, notifier, body, headers)


async def _render_webhook(notifier: NotifierConfig, variables: dict) -> tuple[bytes | None, str, dict[str, str]]:
    """(body or None for the default, its content type, rendered custom headers)."""
    if notifier.body is None and not notifier.headers:
        return None, "application/json", {}
    try:
        templates = {name: _compiled(source) for name, source in notifier.headers.items()}
        body_template = _compiled(notifier.body) if notifier.body is not None else None
    except TemplateCompileError as exc:  # only when a config skipped parse_notifier
        raise _TemplateFailed(str(exc)) from None

    def run(budget: Budget) -> tuple[str | None, dict[str, str]]:
        headers = {}
        for name, template in templates.items():
            outcome = render(template, variables, budget)
            if outcome.error is not None:
                raise _TemplateFailed(f"header '{name}': {outcome.error}")
            value = outcome.text.strip()
            if any(c in value for c in "\r\n\0"):
                raise _TemplateFailed(f"header '{name}': the rendered value contains a line break")
            headers[name] = value
        if body_template is None:
            return None, headers
        outcome = render(body_template, variables, budget)
        if outcome.error is not None:
            raise _TemplateFailed(f"body: {outcome.error}")
        if len(outcome.text) > MAX_RESULT_LENGTH:  # render() cut it: never send a truncated body
            raise _TemplateFailed(f"body: the rendered body exceeds {MAX_RESULT_LENGTH} characters")
        return outcome.text, headers

    start = time.monotonic()
    try:
        text, headers = run(Budget(start + INLINE_SECONDS, True, RENDER_SECONDS))
    except NeedsMoreTime:
        budget = Budget(time.monotonic() + RENDER_SECONDS, False, RENDER_SECONDS)
        text, headers = await asyncio.get_running_loop().run_in_executor(None, run, budget)
    if text is None:
        return None, "application/json", headers
    try:
        json.loads(text)
        content_type = "application/json"
    except ValueError:
        content_type = "text/plain; charset=utf-8"
    return text.encode("utf-8"), content_type, headers


@functools.lru_cache(maxsize=512)
def _compiled(source: str) -> jinja2.Template:
    # Notifier configs are plain values; compiling once per distinct source keeps send() cheap.
    return compile_template(source)


# ---- HTTP, shared by webhook and slack


async def _post(session: aiohttp.ClientSession, notifier: NotifierConfig, body: bytes,
                headers: dict[str, str]) -> SendResult:
    seconds = notifier.timeout
    try:
        async with asyncio.timeout(seconds):
            async with session.post(
                notifier.url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                status = response.status
                excerpt = await response.content.read(512)
    except TimeoutError:  # asyncio's, and aiohttp's own timeouts subclass it
        return SendResult(False, True, f"timeout after {seconds:g} s")
    except aiohttp.InvalidURL:
        return SendResult(False, False, "invalid URL")  # its text would repeat a secret URL
    except aiohttp.ClientConnectorError as exc:
        return SendResult(False, True, _connect_failure(exc))
    except aiohttp.ServerDisconnectedError:
        return SendResult(False, True, "server disconnected")
    except (aiohttp.ClientError, OSError) as exc:
        return SendResult(False, True, f"connection error: {type(exc).__name__}: {exc}")
    if 200 <= status < 300:
        return SendResult(True, False, f"HTTP {status}")
    detail = f"HTTP {status}"
    if 300 <= status < 400:
        detail += " (redirects are not followed)"
    reason = " ".join(excerpt.decode("utf-8", "replace").split())[:200]
    if reason:
        detail += f": {reason}"
    return SendResult(False, status >= 500 or status in (408, 429), detail)


def _connect_failure(exc: aiohttp.ClientConnectorError) -> str:
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    if dns_error is not None and isinstance(exc, dns_error):
        return f"cannot resolve host '{exc.host}'"
    cause = exc.os_error
    if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    return f"cannot connect to {exc.host}:{exc.port}: {cause.strerror or cause}"


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, default=_json_default).encode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


# ---- slack


def slack_message(delivery: Delivery) -> dict:
    """An incoming-webhook message: fallback text plus blocks, OnCall's alert group summary."""
    group = delivery.alert_group
    event = delivery.event
    state = group.get("state") or _EVENT_STATE.get(event, "new")
    emoji = _STATE_EMOJI.get(state, ":bell:")
    title = _one_line(group.get("title")) or f"Alert group {group.get('id', '')}".strip()
    label = _slack_escape(title[:500])
    link = _slack_url(group.get("source_link"))
    heading = f"<{link}|{label}>" if link else label
    integration = delivery.integration.get("name") or delivery.integration.get("id") or "?"
    count = group.get("alerts_count")
    alerts = f"{count} alert{'' if count == 1 else 's'}" if isinstance(count, int) else None
    what = event.capitalize() + (f" (escalation step {delivery.step})" if delivery.step is not None else "")
    facts = " · ".join(part for part in (f"*{what}*", _slack_escape(str(integration)), alerts) if part)
    blocks: list[dict] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} *{heading}*\n{facts}"}},
    ]
    message = (group.get("message") or "").strip()
    if message:
        text = _slack_escape(message)
        if len(text) > _SLACK_SECTION_LIMIT:
            text = text[: _SLACK_SECTION_LIMIT - 1] + "…"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    context = [f"State: {state}"]
    permalink = _slack_url(group.get("permalink"))
    if permalink:
        context.append(f"<{permalink}|Open in tocsin>")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]})
    fallback = f"{emoji} [{event}] {_slack_escape(title)} ({_slack_escape(str(integration))}"
    fallback += f", {alerts})" if alerts else ")"
    return {"text": fallback, "blocks": blocks}


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn treats only these three as control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_url(url: Any) -> str | None:
    if not isinstance(url, str) or not _is_http_url(url.strip()):
        return None
    return url.strip().replace("|", "%7C").replace("<", "%3C").replace(">", "%3E")


def _one_line(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


# ---- email


def email_message(notifier: NotifierConfig, delivery: Delivery) -> EmailMessage:
    """The plain-text notification; Message-ID is derived from notification_id and attempt."""
    group = delivery.alert_group
    title = _one_line(group.get("title"))[:500] or f"alert group {group.get('id', '')}".strip()
    message = EmailMessage()
    message["From"] = notifier.sender
    message["To"] = ", ".join(notifier.to)
    message["Subject"] = f"[tocsin] {delivery.event.upper()}: {title}"
    message["Date"] = email.utils.formatdate(localtime=False)
    domain = notifier.sender.rpartition("@")[2] or "localhost"
    message["Message-ID"] = f"<{_id_part(delivery.notification_id)}.{delivery.attempt}@{domain}>"
    if group.get("id") is not None:
        # Every notification of one group refers to the same root, so mail clients thread them.
        message["References"] = f"<alert-group.{_id_part(str(group['id']))}@{domain}>"
    message["Auto-Submitted"] = "auto-generated"
    message["X-Tocsin-Notification-Id"] = _one_line(delivery.notification_id)
    message["X-Tocsin-Event"] = delivery.event
    message["X-Tocsin-Attempt"] = str(delivery.attempt)
    message.set_content(_email_text(delivery, title))
    return message


def _email_text(delivery: Delivery, title: str) -> str:
    group, integration = delivery.alert_group, delivery.integration
    event = delivery.event + (f" (escalation step {delivery.step})" if delivery.step is not None else "")
    rows = [
        ("Event", event),
        ("State", group.get("state")),
        ("Integration", _integration_label(integration)),
        ("Alerts", group.get("alerts_count")),
        ("Alert group", group.get("id")),
        ("Route", group.get("route_id")),
        ("Created", group.get("created_at")),
        ("Acknowledged", group.get("acknowledged_at")),
        ("Resolved", group.get("resolved_at")),
        ("Silenced", group.get("silenced_at")),
        ("Source", group.get("source_link")),
        ("Open", group.get("permalink")),
    ]
    lines = [title, ""]
    lines += [f"{label + ':':<14}{value}" for label, value in rows if value not in (None, "")]
    message = (group.get("message") or "").strip()
    if message:
        lines += ["", message]
    return "\n".join(lines) + "\n"


def _integration_label(integration: Mapping) -> str | None:
    name, kind = integration.get("name") or integration.get("id"), integration.get("kind")
    if name and kind:
        return f"{name} ({kind})"
    return name or kind


def _id_part(value: str) -> str:
    if _SAFE_ID.match(value):
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


async def _send_email(notifier: NotifierConfig, delivery: Delivery) -> SendResult:
    message = email_message(notifier, delivery)
    seconds = notifier.timeout
    try:
        async with asyncio.timeout(seconds):
            refused, reply = await aiosmtplib.send(
                message,
                sender=notifier.sender,
                recipients=list(notifier.to),
                hostname=notifier.smtp_host,
                port=notifier.smtp_port,
                username=notifier.username,
                password=notifier.password,
                start_tls=notifier.starttls,
                timeout=seconds,
            )
    except TimeoutError:  # asyncio's and aiosmtplib's
        return SendResult(False, True, f"timeout after {seconds:g} s")
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: SMTP {r.code} {_one_line(r.message)}" for r in exc.recipients)
        return SendResult(False, bool(codes) and all(400 <= c < 500 for c in codes), f"all recipients refused: {text}")
    except aiosmtplib.SMTPResponseException as exc:
        return SendResult(False, 400 <= exc.code < 500, f"SMTP {exc.code}: {_one_line(exc.message)}")
    except aiosmtplib.SMTPConnectError as exc:
        cause = exc.__cause__
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return SendResult(False, True, "connection refused")
        return SendResult(False, True, f"cannot connect: {exc}")
    except aiosmtplib.SMTPServerDisconnected as exc:
        return SendResult(False, True, f"SMTP server disconnected: {exc}")
    except aiosmtplib.SMTPException as exc:
        # What is left is the server lacking what the config asks for (STARTTLS, AUTH, SMTPUTF8).
        return SendResult(False, False, f"SMTP: {exc}")
    except OSError as exc:  # TLS failures among them
        return SendResult(False, True, f"connection error: {type(exc).__name__}: {exc}")
    detail = f"SMTP 250: {_one_line(reply)}"
    if refused:
        # Some recipients have the message: a retry would send it to them twice.
        detail += "; refused: " + "; ".join(f"{rcpt}: SMTP {r.code} {_one_line(r.message)}" for rcpt, r in refused.items())
    return SendResult(True, False, detail)
