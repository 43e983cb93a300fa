"""Notifiers against a real HTTP receiver and a real SMTP sink on 127.0.0.1 ephemeral ports."""
from __future__ import annotations

import asyncio
import email
import email.policy
import json
import socket
from dataclasses import replace
from types import MappingProxyType

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from escalation.notifiers import (
    MAX_ATTEMPTS,
    Delivery,
    NotifierConfig,
    backoff,
    documented_body,
    parse_notifier,
    send,
)

GROUP = {
    "id": "IG7K2",
    "integration_id": "am",
    "route_id": "default",
    "state": "new",
    "alerts_count": 3,
    "title": "Disk <full> on db1 & db2",
    "message": "Only 2% left on /var",
    "source_link": "https://grafana.example.com/d/abc?x=1",
    "created_at": "2026-11-22T03:04:05Z",
    "acknowledged_at": None,
    "resolved_at": None,
    "silenced_at": None,
    "permalink": "http://127.0.0.1:8080/ui/groups/IG7K2",
}
INTEGRATION = {"id": "am", "name": "Prod Alertmanager", "kind": "alertmanager"}


def delivery(**kw) -> Delivery:
    values = dict(notification_id="n-0001", attempt=1, event="triggered",
                  alert_group=MappingProxyType(GROUP), integration=INTEGRATION, step=0)
    values.update(kw)
    return Delivery(**values)


# --- a real HTTP receiver ------------------------------------------------------------


class Receiver:
    """Records every request; answers `status` with `reply`, after `delay` seconds."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200
        self.reply = "ok"
        self.delay = 0.0
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append({"method": request.method, "path": request.path,
                              "headers": request.headers, "body": await request.read()})
        if self.delay:
            try:
                await asyncio.wait_for(self.release.wait(), self.delay)
            except TimeoutError:
                pass
        return web.Response(status=self.status, text=self.reply)

    @property
    def last(self) -> dict:
        assert self.requests, "no request received"
        return self.requests[-1]


@pytest.fixture
async def receiver():
    r = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    r.url = f"http://127.0.0.1:{port}/hook"
    yield r
    r.release.set()
    await runner.cleanup()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def webhook(receiver: Receiver, **kw) -> NotifierConfig:
    return NotifierConfig(name="hook", kind="webhook", url=receiver.url, **kw)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- webhook ---------------------------------------------------------------------------


async def test_webhook_posts_the_documented_json_with_idempotency_headers(receiver, session):
    result = await send(webhook(receiver), delivery(attempt=2), session)
    assert result.ok and not result.retry and result.detail == "HTTP 200"
    req = receiver.last
    assert req["method"] == "POST" and req["path"] == "/hook"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Idempotency-Key"] == "n-0001"
    assert req["headers"]["X-Tocsin-Event"] == "triggered"
    assert req["headers"]["X-Tocsin-Attempt"] == "2"
    body = json.loads(req["body"])
    assert body == {
        "event": "triggered",
        "alert_group": GROUP,
        "integration": INTEGRATION,
        "step": 0,
        "notification_id": "n-0001",
        "attempt": 2,
    }
    assert body == json.loads(json.dumps(documented_body(delivery(attempt=2))))


async def test_the_idempotency_key_is_stable_across_attempts(receiver, session):
    notifier = webhook(receiver)
    for attempt in (1, 2, 3):
        assert (await send(notifier, delivery(attempt=attempt), session)).ok
    assert [r["headers"]["Idempotency-Key"] for r in receiver.requests] == ["n-0001"] * 3
    assert [r["headers"]["X-Tocsin-Attempt"] for r in receiver.requests] == ["1", "2", "3"]


async def test_custom_body_and_header_templates(receiver, session):
    notifier = webhook(
        receiver,
        body='{"summary": {{ alert_group.title | tojson }}, "what": "{{ event }}", '
             '"from": "{{ integration.name }}", "step": {{ step | tojson }}}',
        headers={"Authorization": "Bearer {{ integration.id }}-secret", "X-Group": "{{ alert_group.id }}"},
    )
    result = await send(notifier, delivery(event="acknowledged", step=None), session)
    assert result.ok, result.detail
    req = receiver.last
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Authorization"] == "Bearer am-secret"
    assert req["headers"]["X-Group"] == "IG7K2"
    assert req["headers"]["Idempotency-Key"] == "n-0001"
    assert json.loads(req["body"]) == {
        "summary": "Disk <full> on db1 & db2", "what": "acknowledged", "from": "Prod Alertmanager", "step": None,
    }


async def test_a_body_that_is_not_json_goes_as_text(receiver, session):
    notifier = webhook(receiver, body="{{ event | upper }}: {{ alert_group.title }} ({{ alert_group.alerts_count }})")
    assert (await send(notifier, delivery(), session)).ok
    req = receiver.last
    assert req["headers"]["Content-Type"].startswith("text/plain")
    assert req["body"].decode() == "TRIGGERED: Disk <full> on db1 & db2 (3)"


async def test_a_slow_template_finishes_off_the_event_loop(receiver, session):
    # Well past the 10 ms inline slice: the render restarts in a worker with the full budget.
    notifier = webhook(receiver, body='{% for c in "x" * 300000 %}{% endfor %}{{ alert_group.id }}')
    result = await send(notifier, delivery(), session)
    assert result.ok, result.detail
    assert receiver.last["body"] == b"IG7K2"


async def test_a_configured_content_type_wins(receiver, session):
    notifier = webhook(receiver, body="<alert>{{ alert_group.id }}</alert>",
                       headers={"content-type": "application/xml"})
    assert (await send(notifier, delivery(), session)).ok
    assert receiver.last["headers"].getall("Content-Type") == ["application/xml"]


@pytest.mark.parametrize(
    "status, retry",
    [(500, True), (503, True), (429, True), (408, True), (400, False), (404, False), (410, False)],
)
async def test_http_status_decides_retry(receiver, session, status, retry):
    receiver.status, receiver.reply = status, "nope"
    result = await send(webhook(receiver), delivery(), session)
    assert not result.ok and result.retry is retry
    assert result.detail == f"HTTP {status}: nope"


async def test_redirects_are_not_followed(receiver, session):
    receiver.status, receiver.reply = 302, ""
    result = await send(webhook(receiver), delivery(), session)
    assert not result.ok and not result.retry and result.detail.startswith("HTTP 302")
    assert len(receiver.requests) == 1


async def test_a_slow_receiver_is_a_retryable_timeout(receiver, session):
    receiver.delay = 5
    result = await send(webhook(receiver, timeout=0.2), delivery(), session)
    assert result == type(result)(False, True, "timeout after 0.2 s")


async def test_connection_refused_is_retryable(session):
    notifier = NotifierConfig(name="hook", kind="webhook", url=f"http://127.0.0.1:{free_port()}/hook", timeout=2)
    result = await send(notifier, delivery(), session)
    assert (result.ok, result.retry, result.detail) == (False, True, "connection refused")


@pytest.mark.parametrize(
    "body, headers",
    [
        ("{{ alert_group.nope.deeper }}", {}),                      # undefined: OnCall's Template Warning
        ("{{ 1 / 0 }}", {}),                                        # a Template Error
        (None, {"X-Broken": "{{ alert_group.title.nope.x }}"}),     # in a header
        (None, {"X-Two-Lines": "a{{ '\\n' }}b"}),                   # header injection refused
        ("{{ 'x' * 60000 }}", {}),                                  # render() would truncate it
    ],
)
async def test_a_template_error_is_final(receiver, session, body, headers):
    result = await send(webhook(receiver, body=body, headers=headers), delivery(), session)
    assert not result.ok and not result.retry
    assert result.detail.startswith("template error: "), result.detail
    assert receiver.requests == []


async def test_send_never_raises_on_a_bad_config(session):
    # Built by hand, past parse_notifier: a template that does not compile, an invalid URL.
    bad_template = NotifierConfig(name="x", kind="webhook", url="http://127.0.0.1:1/", body="{{ oops")
    result = await send(bad_template, delivery(), session)
    assert not result.ok and not result.retry and result.detail.startswith("template error: ")
    result = await send(NotifierConfig(name="x", kind="webhook", url="not a url"), delivery(), session)
    assert not result.ok and not result.retry


# --- slack -----------------------------------------------------------------------------


async def test_slack_incoming_webhook_message(receiver, session):
    notifier = NotifierConfig(name="chat", kind="slack", url=receiver.url)
    result = await send(notifier, delivery(), session)
    assert result.ok and result.detail == "HTTP 200"
    req = receiver.last
    assert req["headers"]["Content-Type"] == "application/json"
    message = json.loads(req["body"])
    assert set(message) == {"text", "blocks"}
    assert ":red_circle:" in message["text"] and "Disk &lt;full&gt; on db1 &amp; db2" in message["text"]
    head = message["blocks"][0]
    assert head["type"] == "section" and head["text"]["type"] == "mrkdwn"
    text = head["text"]["text"]
    assert text.startswith(":red_circle: *<https://grafana.example.com/d/abc?x=1|Disk &lt;full&gt; on db1 &amp; db2>*")
    assert "Prod Alertmanager" in text and "3 alerts" in text and "Triggered" in text
    assert all(b["type"] in ("section", "context") for b in message["blocks"])
    context = message["blocks"][-1]["elements"][0]["text"]
    assert "<http://127.0.0.1:8080/ui/groups/IG7K2|" in context


async def test_slack_resolved_without_a_source_link(receiver, session):
    group = {**GROUP, "state": "resolved", "source_link": None, "alerts_count": 1}
    notifier = NotifierConfig(name="chat", kind="slack", url=receiver.url)
    assert (await send(notifier, delivery(event="resolved", step=None, alert_group=group), session)).ok
    message = json.loads(receiver.last["body"])
    text = message["blocks"][0]["text"]["text"]
    assert text.startswith(":large_green_circle: *Disk &lt;full&gt;")
    assert "1 alert" in text and "1 alerts" not in text and "Resolved" in text


async def test_slack_errors_carry_slacks_reason(receiver, session):
    receiver.status, receiver.reply = 404, "no_service"
    result = await send(NotifierConfig(name="chat", kind="slack", url=receiver.url), delivery(), session)
    assert (result.ok, result.retry, result.detail) == (False, False, "HTTP 404: no_service")


# --- email -----------------------------------------------------------------------------


class Sink:
    """aiosmtpd handler: collects envelopes, or answers `reply` to DATA; refuses `refuse`d recipients."""

    def __init__(self):
        self.envelopes = []
        self.reply = "250 OK"
        self.refuse: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.reply.startswith("250"):
            self.envelopes.append(envelope)
        return self.reply


class EphemeralController(Controller):
    """A Controller bound to port 0: learn the port before the first connection."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def smtp_sink():
    sink = Sink()
    sink.logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        sink.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret", handled=False, auth_data=auth_data)

    controller = EphemeralController(sink, hostname="127.0.0.1", port=0,
                                     authenticator=authenticator, auth_require_tls=False)
    controller.start()
    sink.port = controller.port
    yield sink
    controller.stop()


def mailer(port: int, **kw) -> NotifierConfig:
    return NotifierConfig(name="mail", kind="email", to=("ops@example.com", "oncall@example.com"),
                          sender="tocsin@alerts.example.com", smtp_port=port, timeout=5, **kw)


async def test_email_is_delivered_with_subject_and_headers(smtp_sink, session):
    result = await send(mailer(smtp_sink.port), delivery(attempt=3), session)
    assert result.ok and not result.retry and result.detail.startswith("SMTP 250")
    [envelope] = smtp_sink.envelopes
    assert envelope.mail_from == "tocsin@alerts.example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "oncall@example.com"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert message["Subject"] == "[tocsin] TRIGGERED: Disk <full> on db1 & db2"
    assert message["From"] == "tocsin@alerts.example.com"
    assert message["To"] == "ops@example.com, oncall@example.com"
    assert message["Message-ID"] == "<n-0001.3@alerts.example.com>"
    assert message["X-Tocsin-Notification-Id"] == "n-0001"
    assert message["X-Tocsin-Event"] == "triggered" and message["X-Tocsin-Attempt"] == "3"
    text = message.get_content()
    for line in ("Disk <full> on db1 & db2", "Prod Alertmanager (alertmanager)", "Alerts:       3",
                 "https://grafana.example.com/d/abc?x=1", "http://127.0.0.1:8080/ui/groups/IG7K2",
                 "Only 2% left on /var", "escalation step 0"):
        assert line in text


async def test_each_attempt_has_its_own_message_id(smtp_sink, session):
    for attempt in (1, 2):
        assert (await send(mailer(smtp_sink.port), delivery(attempt=attempt), session)).ok
    ids = [email.message_from_bytes(e.original_content)["Message-ID"] for e in smtp_sink.envelopes]
    assert ids == ["<n-0001.1@alerts.example.com>", "<n-0001.2@alerts.example.com>"]


@pytest.mark.parametrize("reply, retry", [("451 4.3.0 try later", True), ("554 5.7.1 rejected", False)])
async def test_smtp_replies_decide_retry(smtp_sink, session, reply, retry):
    smtp_sink.reply = reply
    result = await send(mailer(smtp_sink.port), delivery(), session)
    assert not result.ok and result.retry is retry
    assert result.detail.startswith(f"SMTP {reply[:3]}") and reply[4:] in result.detail


async def test_smtp_credentials(smtp_sink, session):
    result = await send(mailer(smtp_sink.port, username="tocsin", password="s3cret"), delivery(), session)
    assert result.ok, result.detail
    assert smtp_sink.logins == [(b"tocsin", b"s3cret")] and len(smtp_sink.envelopes) == 1
    result = await send(mailer(smtp_sink.port, username="tocsin", password="wrong"), delivery(), session)
    assert not result.ok and not result.retry and result.detail.startswith("SMTP 535")


async def test_some_recipients_refused_is_delivered_not_retried(smtp_sink, session):
    smtp_sink.refuse = {"oncall@example.com"}
    result = await send(mailer(smtp_sink.port), delivery(), session)
    assert result.ok and not result.retry
    assert "refused: oncall@example.com: SMTP 550" in result.detail
    assert smtp_sink.envelopes[0].rcpt_tos == ["ops@example.com"]


async def test_all_recipients_refused(smtp_sink, session):
    smtp_sink.refuse = {"ops@example.com", "oncall@example.com"}
    result = await send(mailer(smtp_sink.port), delivery(), session)
    assert not result.ok and not result.retry and result.detail.startswith("all recipients refused")


async def test_smtp_connection_refused_is_retryable(session):
    result = await send(mailer(free_port()), delivery(), session)
    assert (result.ok, result.retry, result.detail) == (False, True, "connection refused")


async def test_starttls_to_a_server_without_it_is_final(smtp_sink, session):
    result = await send(mailer(smtp_sink.port, starttls=True), delivery(), session)
    assert not result.ok and not result.retry and "STARTTLS" in result.detail


# --- configuration ---------------------------------------------------------------------


def parse(table: dict) -> tuple[NotifierConfig | None, list[str]]:
    problems: list[str] = []
    return parse_notifier(table, "[[notifiers]] #1", problems), problems


def test_parse_a_full_webhook():
    notifier, problems = parse({
        "name": "ops-hook", "kind": "webhook", "url": "https://hooks.example.com/x",
        "events": ["triggered", "resolved"], "body": "{{ event }}",
        "headers": {"Authorization": "Bearer {{ integration.id }}"}, "timeout": 3,
    })
    assert problems == []
    assert notifier.events == ("triggered", "resolved") and notifier.timeout == 3.0
    assert dict(notifier.headers) == {"Authorization": "Bearer {{ integration.id }}"}
    hash(notifier)  # usable as a key


def test_parse_defaults():
    notifier, problems = parse({"name": "m", "kind": "email", "to": ["ops@example.com"]})
    assert problems == []
    assert notifier == NotifierConfig(name="m", kind="email", to=("ops@example.com",))
    assert notifier.events == ("acknowledged", "resolved")
    assert (notifier.smtp_host, notifier.smtp_port, notifier.starttls) == ("127.0.0.1", 25, False)


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"name": "a", "kind": "webhook", "url": "http://x/", "colour": "red"}, "unknown key 'colour'"),
        ({"name": "a", "kind": "pager", "url": "http://x/"}, "unknown kind 'pager'"),
        ({"name": "a", "kind": "webhook"}, "missing required key 'url'"),
        ({"name": "a", "kind": "slack"}, "missing required key 'url'"),
        ({"name": "a", "kind": "email"}, "missing required key 'to'"),
        ({"kind": "webhook", "url": "http://x/"}, "missing required key 'name'"),
        ({"name": "a", "kind": "webhook", "url": "ftp://x/"}, "'url' must be an http:// or https:// URL"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "events": ["resolved", "exploded"]},
         "unknown event 'exploded'"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "body": "{{ event "}, "template 'body': line 1"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "headers": {"X-A": "{% if %}"}}, "header 'X-A': line 1"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "headers": {"Idempotency-Key": "x"}},
         "header 'Idempotency-Key' is set by tocsin"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "headers": {"Bad Name": "x"}}, "not a valid HTTP header"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "timeout": 0}, "'timeout' must be a positive"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "timeout": "soon"}, "'timeout': duration 'soon' is not"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "timeout": [10]}, "'timeout' must be int or float or str"),
        ({"name": "a", "kind": "slack", "url": "http://x/", "body": "{{ event }}"},
         "'body' does not apply to kind 'slack'"),
        ({"name": "a", "kind": "email", "to": ["not-an-address"]}, "is not an email address"),
        ({"name": "a", "kind": "email", "to": []}, "at least one address"),
        ({"name": "a", "kind": "email", "to": ["a@b.c"], "smtp_port": 70000}, "'smtp_port' 70000 out of range"),
        ({"name": "a", "kind": "email", "to": ["a@b.c"], "password": "pw"}, "'password' needs 'username'"),
        ({"name": "a", "kind": "email", "to": ["a@b.c"], "starttls": "yes"}, "'starttls' must be bool"),
    ],
)
def test_parse_problems(table, expected):
    notifier, problems = parse(table)
    assert notifier is None
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("[[notifiers]] #1: ") for p in problems)


def test_parse_reports_every_problem_once():
    _, problems = parse({"name": "a", "kind": "webhook", "colour": 1, "events": ["nope"], "timeout": -1})
    assert len(problems) == 4, problems  # unknown key, missing url, bad event, bad timeout


def test_parse_not_a_table():
    _, problems = parse(["webhook"])
    assert problems == ["[[notifiers]] #1: must be a table"]


# --- retry schedule --------------------------------------------------------------------


def test_backoff_doubles_from_one_second_up_to_a_minute():
    assert [backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff(1000) == 60
    assert MAX_ATTEMPTS >= 5


def test_config_values_are_plain_and_frozen():
    notifier = NotifierConfig(name="x", kind="webhook", url="http://x/")
    with pytest.raises(Exception):
        notifier.url = "http://y/"  # type: ignore[misc]
    assert replace(notifier, timeout=1.0).timeout == 1.0
