"""The SMTP door over real SMTP sessions on 127.0.0.1 ephemeral ports.

The first half drives SmtpIngress against a small recording pipeline (reply codes,
recipients, timeouts, refusals, drain); the second half goes through the whole
daemon and a real database (every corpus email, grouping, a SIGKILL during DATA).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import signal
import smtplib
import sqlite3
import ssl
import subprocess
from dataclasses import dataclass

import pytest

from conftest import CORPUS, TOKEN, corpus_files
from daemon.config import SmtpConfig
from grouping.pipeline import Accepted, RateLimited, Unavailable
from handlers.mail import is_cheap, parse_message
from handlers.smtp import SmtpIngress

DOMAIN = "alerts.example.com"
IO_TIMEOUT = 5


# --- a recording pipeline and a raw SMTP client -------------------------------------


@dataclass(frozen=True)
class Kind:
    slug: str


@dataclass(frozen=True)
class Integration:
    id: str
    name: str
    kind: Kind
    token: str


MAIL_A = Integration("mail-a", "Mail A", Kind("inbound_email"), "tok-mail-a-0001")
MAIL_B = Integration("mail-b", "Mail B", Kind("inbound_email"), "tok-mail-b-0001")
HOOK = Integration("hook", "Webhook", Kind("webhook"), "tok-webhook-0001")


class RecordingPipeline:
    """Stands in for grouping.pipeline.Pipeline: records what it is handed."""

    def __init__(self, *integrations: Integration):
        self.integrations = {i.token: i for i in integrations}
        self.calls: list[tuple[list, str, bytes | None]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def by_token(self, token: str):
        return self.integrations.get(token)

    async def ingest_many(self, items, *, source, raw=None):
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.calls.append((items, source, raw))
        n = len(self.calls)
        return [Accepted(f"A{n}x{k}", f"G{n}", "key") for k, _ in enumerate(items)]


class Client:
    """Just enough SMTP to see every reply code and to misbehave on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.greeting: tuple[int, str] = (0, "")

    @classmethod
    async def connect(cls, port: int) -> "Client":
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def reply(self, timeout: float = IO_TIMEOUT) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("closed by server")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(lines)

    async def cmd(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def send(self, rcpts: list[str], data: bytes, sender: str = "dev@example.net") -> tuple[int, str]:
        """A whole transaction; the code of the first refusal, else of the DATA reply."""
        for line in ("EHLO client.example.net", f"MAIL FROM:<{sender}>"):
            code, text = await self.cmd(line)
            if code != 250:
                return code, text
        accepted = 0
        for rcpt in rcpts:
            code, text = await self.cmd(f"RCPT TO:<{rcpt}>")
            accepted += code == 250
        if not accepted:
            return code, text
        code, text = await self.cmd("DATA")
        assert code == 354, text
        self.writer.write(wire(data) + b".\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def wire(data: bytes) -> bytes:
    """CRLF line ends and dot-stuffing, as an SMTP client sends a message."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines)


async def until(condition, timeout: float = 3.0) -> None:
    """Wait (bounded) for something the server does after replying."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def settings(**kw) -> SmtpConfig:
    base = dict(host="127.0.0.1", port=0, domain=DOMAIN, extra_domains=("mx.example.org",),
                max_message_bytes=64 * 1024, max_recipients=5, session_timeout=5.0,
                data_timeout=5.0, max_sessions=20)
    base.update(kw)
    return SmtpConfig(**base)


def eml(name: str, token: str = MAIL_A.token) -> bytes:
    return (CORPUS / "email" / name).read_bytes().replace(b"TOKEN@", token.encode() + b"@")


CORPUS_EMAILS = [p.name for p in corpus_files("email/*.eml")]
SIMPLE = b"From: dev@example.net\nSubject: disk full\n\nvolume /data is full\n"


@pytest.fixture
async def door():
    """Factory: an SmtpIngress on an ephemeral port over a RecordingPipeline."""
    started: list[SmtpIngress] = []

    async def start(pipeline=None, **kw):
        pipeline = pipeline or RecordingPipeline(MAIL_A, MAIL_B, HOOK)
        ingress = SmtpIngress(settings(**kw), lambda: pipeline)
        await ingress.start()
        started.append(ingress)
        return ingress, pipeline

    yield start
    for ingress in started:
        await ingress.stop(1)


# --- replies -----------------------------------------------------------------------


@pytest.mark.parametrize("name", CORPUS_EMAILS)
async def test_every_corpus_email_is_accepted_with_its_payload(door, name):
    ingress, pipeline = await door()
    client = await Client.connect(ingress.port)
    code, text = await client.send([f"{MAIL_A.token}@{DOMAIN}"], eml(name))
    await client.close()
    assert code == 250 and "2.0.0" in text, text
    [(items, source, raw)] = pipeline.calls
    assert source == "smtp"
    [(integration, payload)] = items
    assert integration is MAIL_A
    assert raw == wire(eml(name))  # what the client sent, dot-unstuffed, kept beside the alert
    assert payload == parse_message(raw)
    assert payload["subject"] and payload["sender"]


async def test_greeting_and_ehlo_advertise_size_and_8bitmime(door):
    ingress, _ = await door()
    client = await Client.connect(ingress.port)
    assert client.greeting[0] == 220 and DOMAIN in client.greeting[1]
    code, text = await client.cmd("EHLO client.example.net")
    assert code == 250 and "SIZE 65536" in text and "8BITMIME" in text and "SMTPUTF8" in text
    assert "STARTTLS" not in text
    await client.close()


@pytest.mark.parametrize(
    "rcpt, code",
    [
        (f"{MAIL_A.token}@{DOMAIN}", 250),
        (f"{MAIL_A.token}@ALERTS.Example.COM", 250),      # domain case-insensitive
        (f"{MAIL_A.token}@mx.example.org", 250),          # an extra domain
        (f"no-such-token@{DOMAIN}", 550),
        (f"{MAIL_A.token}@elsewhere.example.com", 550),   # never a relay
        (f"{MAIL_A.token}@sub.{DOMAIN}", 550),
        (f"{MAIL_A.token.upper()}@{DOMAIN}", 550),        # tokens are case-sensitive secrets
        ("postmaster", 550),
    ],
)
async def test_rcpt_selects_integration_or_550(door, rcpt, code):
    ingress, _ = await door()
    client = await Client.connect(ingress.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<dev@example.net>")
    got, text = await client.cmd(f"RCPT TO:<{rcpt}>")
    await client.close()
    assert got == code, text
    if code == 550:
        assert "5.1.1" in text


async def test_null_sender_and_helo_are_accepted(door):
    ingress, pipeline = await door()
    client = await Client.connect(ingress.port)
    assert (await client.cmd("HELO old-device"))[0] == 250
    assert (await client.cmd("MAIL FROM:<>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{MAIL_A.token}@{DOMAIN}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(wire(SIMPLE) + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert len(pipeline.calls) == 1


async def test_multi_recipient_makes_one_alert_per_integration(door):
    ingress, pipeline = await door()
    client = await Client.connect(ingress.port)
    code, text = await client.send(
        [f"{MAIL_A.token}@{DOMAIN}", f"{MAIL_B.token}@mx.example.org", f"{MAIL_A.token}@ALERTS.EXAMPLE.COM",
         f"{HOOK.token}@{DOMAIN}", f"unknown@{DOMAIN}"],
        SIMPLE,
    )
    await client.close()
    assert code == 250, text
    [(items, _, _)] = pipeline.calls  # one atomic hand-over
    assert [i.id for i, _ in items] == ["mail-a", "mail-b", "hook"]
    assert all(p == items[0][1] for _, p in items)


async def test_too_many_recipients_452(door):
    ingress, pipeline = await door(max_recipients=2)
    client = await Client.connect(ingress.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<dev@example.net>")
    codes = [(await client.cmd(f"RCPT TO:<{t}@{DOMAIN}>"))[0] for t in (MAIL_A.token, MAIL_B.token, HOOK.token)]
    assert codes == [250, 250, 452]
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(wire(SIMPLE) + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    [(items, _, _)] = pipeline.calls
    assert [i.id for i, _ in items] == ["mail-a", "mail-b"]


async def test_oversized_message_552_and_nothing_stored(door):
    ingress, pipeline = await door(max_message_bytes=4096)
    client = await Client.connect(ingress.port)
    big = SIMPLE + b"x" * 70 + (b"\n" + b"y" * 70) * 100
    code, text = await client.send([f"{MAIL_A.token}@{DOMAIN}"], big)
    assert code == 552, text
    # The session goes on: a message that fits is still taken.
    code, _ = await client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE)
    assert code == 250
    await client.close()
    assert len(pipeline.calls) == 1 and pipeline.calls[0][2] == wire(SIMPLE)


async def test_declared_size_over_limit_552_at_mail_from(door):
    ingress, _ = await door(max_message_bytes=4096)
    client = await Client.connect(ingress.port)
    await client.cmd("EHLO c")
    code, text = await client.cmd("MAIL FROM:<dev@example.net> SIZE=5000")
    await client.close()
    assert code == 552, text


@pytest.mark.parametrize(
    "error, code, enhanced",
    [
        (Unavailable("database locked"), 451, "4.3.0"),
        (RateLimited("10/minute", 30), 451, "4.7.0"),
        (RuntimeError("bug"), 451, "4.3.0"),
    ],
)
async def test_pipeline_trouble_answers_451_so_the_sender_retries(door, error, code, enhanced):
    ingress, pipeline = await door()
    pipeline.fail = error
    client = await Client.connect(ingress.port)
    got, text = await client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE)
    assert (got, enhanced in text) == (code, True), text
    # The session survives and the retry goes through once storage is back.
    pipeline.fail = None
    got, _ = await client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE)
    assert got == 250
    await client.close()


async def test_250_only_after_the_commit_returned(door):
    ingress, pipeline = await door()
    pipeline.gate = asyncio.Event()
    client = await Client.connect(ingress.port)
    reply = asyncio.create_task(client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE))
    await asyncio.wait_for(pipeline.entered.wait(), IO_TIMEOUT)
    await asyncio.sleep(0.1)
    assert not reply.done()  # the commit is pending: no reply yet
    pipeline.gate.set()
    code, _ = await asyncio.wait_for(reply, IO_TIMEOUT)
    assert code == 250 and len(pipeline.calls) == 1
    await client.close()


async def test_raw_message_is_capped(door):
    ingress, pipeline = await door(max_stored_raw_bytes=40)
    client = await Client.connect(ingress.port)
    assert (await client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE))[0] == 250
    await client.close()
    [(items, _, raw)] = pipeline.calls
    assert raw == wire(SIMPLE)[:40]
    assert items[0][1]["message"] == "volume /data is full"  # parsed from the whole message


async def test_integration_gone_by_data_time_550(door):
    pipeline = RecordingPipeline(MAIL_A)
    ingress, _ = await door(pipeline)
    client = await Client.connect(ingress.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<dev@example.net>")
    assert (await client.cmd(f"RCPT TO:<{MAIL_A.token}@{DOMAIN}>"))[0] == 250
    pipeline.integrations.clear()  # a reload removed it
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(wire(SIMPLE) + b".\r\n")
    code, text = await client.reply()
    await client.close()
    assert code == 550 and "5.1.1" in text and not pipeline.calls


async def test_big_html_only_mail_parses_off_the_loop(door):
    ingress, pipeline = await door(max_message_bytes=1024 * 1024)
    rows = "".join(f"<tr><td>disk{i}</td><td>ok</td></tr>\n" for i in range(2000))
    html = f"<html><head><title>Report</title></head><body><table>{rows}</table></body></html>"
    data = f"From: nas@example.net\nSubject: report\nContent-Type: text/html\n\n{html}\n".encode()
    client = await Client.connect(ingress.port)
    assert (await client.send([f"{MAIL_A.token}@{DOMAIN}"], data))[0] == 250
    await client.close()
    message = pipeline.calls[0][0][0][1]["message"]
    # <td> is not a block element in OnCall's list: cells of a row run together.
    assert message.startswith("Report\ndisk0ok\ndisk1ok\n") and message.endswith("\ndisk1999ok")
    assert not is_cheap(wire(data))  # so it was parsed in the worker thread


async def test_real_client_many_messages_per_connection(door):
    ingress, pipeline = await door()

    def client() -> None:  # the stdlib's SMTP client, in a thread
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=IO_TIMEOUT) as smtp:
            for name in CORPUS_EMAILS:
                smtp.ehlo()
                smtp.mail("dev@example.net")
                assert smtp.rcpt(f"{MAIL_B.token}@{DOMAIN}")[0] == 250
                code, text = smtp.data(eml(name, MAIL_B.token))
                assert code == 250 and text.startswith(b"2.0.0 OK stored as"), text

    await asyncio.wait_for(asyncio.to_thread(client), 20)
    assert [parse_message(raw)["subject"] for _, _, raw in pipeline.calls] == [
        parse_message(eml(n))["subject"] for n in CORPUS_EMAILS
    ]


# --- timeouts, refusals, TLS, drain ----------------------------------------------------


async def test_idle_client_gets_421_and_is_disconnected(door):
    ingress, _ = await door(session_timeout=0.3)
    client = await Client.connect(ingress.port)
    await client.cmd("EHLO c")
    code, text = await client.reply(timeout=3)  # say nothing more
    assert code == 421 and "4.4.2" in text
    assert await asyncio.wait_for(client.reader.read(), 3) == b""  # closed
    await client.close()
    await until(lambda: not ingress._sessions)


async def test_slow_data_hits_the_data_timeout_and_stores_nothing(door):
    ingress, pipeline = await door(session_timeout=5.0, data_timeout=0.4)
    client = await Client.connect(ingress.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<dev@example.net>")
    await client.cmd(f"RCPT TO:<{MAIL_A.token}@{DOMAIN}>")
    assert (await client.cmd("DATA"))[0] == 354
    for line in (b"Subject: slow\r\n", b"\r\n", b"first line\r\n"):  # then stall, short of the dot
        client.writer.write(line)
        await asyncio.sleep(0.1)
    code, text = await client.reply(timeout=3)
    assert code == 421, text
    await client.close()
    assert not pipeline.calls


async def test_allowed_networks_refuse_others_with_554(door):
    ingress, pipeline = await door(allowed_networks=("10.0.0.0/8", "2001:db8::/32"))
    client = await Client.connect(ingress.port)
    assert client.greeting[0] == 554
    assert await asyncio.wait_for(client.reader.read(), 3) == b""
    await client.close()

    ingress, _ = await door(allowed_networks=("10.0.0.0/8", "127.0.0.0/8"))
    client = await Client.connect(ingress.port)
    assert client.greeting[0] == 220
    await client.close()


async def test_session_cap_extra_connections_get_421(door):
    ingress, _ = await door(max_sessions=2)
    first, second = await Client.connect(ingress.port), await Client.connect(ingress.port)
    third = await Client.connect(ingress.port)
    assert (first.greeting[0], second.greeting[0], third.greeting[0]) == (220, 220, 421)
    await third.close()
    await first.cmd("QUIT")
    await first.close()
    await until(lambda: len(ingress._sessions) < 2)
    fourth = await Client.connect(ingress.port)  # a slot is free again
    assert fourth.greeting[0] == 220
    for c in (second, fourth):
        await c.close()


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={DOMAIN}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


async def test_starttls_when_configured(door, cert_pair):
    cert, key = cert_pair
    ingress, pipeline = await door(tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=IO_TIMEOUT) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            smtp.starttls(context=context)
            smtp.ehlo()
            assert not smtp.has_extn("auth")  # tokens, not SMTP AUTH
            assert smtp.sendmail("dev@example.net", [f"{MAIL_A.token}@{DOMAIN}"], SIMPLE) == {}

    await asyncio.wait_for(asyncio.to_thread(client), 20)
    assert len(pipeline.calls) == 1


async def test_stop_lets_in_flight_data_finish_and_refuses_the_rest(door):
    ingress, pipeline = await door()
    pipeline.gate = asyncio.Event()
    busy, idle = await Client.connect(ingress.port), await Client.connect(ingress.port)
    reply = asyncio.create_task(busy.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE))
    await asyncio.wait_for(pipeline.entered.wait(), IO_TIMEOUT)
    stopping = asyncio.create_task(ingress.stop(5))
    assert (await idle.reply(timeout=3))[0] == 421  # idle: told to go now
    with pytest.raises(OSError):
        await Client.connect(ingress.port)  # no longer listening
    await asyncio.sleep(0.1)
    assert not stopping.done() and not reply.done()
    pipeline.gate.set()
    assert (await asyncio.wait_for(reply, IO_TIMEOUT))[0] == 250  # in flight: finished
    assert (await busy.reply(timeout=3))[0] == 421
    await asyncio.wait_for(stopping, IO_TIMEOUT)
    for c in (busy, idle):
        await c.close()


async def test_client_gone_mid_commit_does_not_cut_the_commit(door):
    ingress, pipeline = await door()
    pipeline.gate = asyncio.Event()
    client = await Client.connect(ingress.port)
    reply = asyncio.create_task(client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE))
    await asyncio.wait_for(pipeline.entered.wait(), IO_TIMEOUT)
    client.writer.transport.abort()
    await until(lambda: not ingress._sessions)  # the session is gone ...
    pipeline.gate.set()
    await until(lambda: len(pipeline.calls) == 1)  # ... and its commit still completes
    reply.cancel()
    await asyncio.gather(reply, return_exceptions=True)


async def test_junk_and_broken_mail_never_crash_the_session(door):
    ingress, pipeline = await door()
    client = await Client.connect(ingress.port)
    junk = [
        b"\xff\xfe\x00garbage without headers\n",
        b"Subject: =?bogus-charset?q?x=ZZ?=\nContent-Type: multipart/mixed\n\n--b\nno end",
        b"From: \xe9\xe9 <a@b\nContent-Transfer-Encoding: base64\n\n!!!notbase64",
        b"Content-Type: multipart/mixed; boundary=x\n\n" + b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 300,
    ]
    for data in junk:
        code, text = await client.send([f"{MAIL_A.token}@{DOMAIN}"], data)
        assert code == 250, text
    code, _ = await client.cmd("NOOP")
    assert code == 250
    await client.close()
    assert len(pipeline.calls) == len(junk)
    for items, _, _ in pipeline.calls:
        json.dumps(items[0][1])  # storable


# --- enhanced status codes, PIPELINING, STARTTLS inside TLS ---------------------------

ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


async def test_ehlo_advertises_pipelining_and_enhanced_status_codes(door):
    ingress, _ = await door()
    client = await Client.connect(ingress.port)
    code, text = await client.cmd("EHLO client.example.net")
    await client.close()
    assert code == 250
    lines = [line[4:] for line in text.splitlines()]
    assert "PIPELINING" in lines and "ENHANCEDSTATUSCODES" in lines
    assert text.splitlines()[-1].startswith("250 ")


async def test_every_reply_after_the_greeting_carries_an_enhanced_code(door):
    ingress, _ = await door(max_recipients=1)
    client = await Client.connect(ingress.port)
    replies = [("before EHLO", await client.cmd("MAIL FROM:<a@b>"))]
    assert (await client.cmd("EHLO client.example.net"))[0] == 250  # EHLO lines: plain (RFC 2034)
    for line in ["NOOP", "MAIL FROM:<a@b>", "RSET", "DATA", "FOO", "MAIL FROM:", "RCPT TO:<x@y>",
                 "VRFY", "VRFY someone", "EXPN x", "HELP", "HELP MAIL", "STARTTLS",
                 "MAIL FROM:<a@b>", "MAIL FROM:<a@b>", f"RCPT TO:<nobody@{DOMAIN}>",
                 f"RCPT TO:<{MAIL_A.token}@{DOMAIN}>", f"RCPT TO:<{MAIL_B.token}@{DOMAIN}>",
                 "MAIL FROM:<a@b> SIZE=99999999", "X" * 70000, "RSET",
                 "MAIL FROM:<a@b> SIZE=99999999"]:
        try:
            replies.append((line[:30], await client.cmd(line)))
        except ConnectionError:
            break
    code, text = await client.cmd("QUIT")
    replies.append(("QUIT", (code, text)))
    await client.close()
    for line, (code, text) in replies:
        for reply in text.splitlines():
            assert ENHANCED.match(reply), (line, reply)
    codes = {line: code for line, (code, _) in replies}
    assert codes["before EHLO"] == 503 and codes["FOO"] == 500 and codes["DATA"] == 503
    assert codes["MAIL FROM:"] == 501
    assert codes[f"RCPT TO:<nobody@{DOMAIN}>"[:30]] == 550


async def test_refused_data_replies_carry_enhanced_codes(door):
    ingress, pipeline = await door(max_message_bytes=1000)
    client = await Client.connect(ingress.port)
    code, text = await client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE + b"x" * 5000 + b"\n")
    assert code == 552 and ENHANCED.match(text) and " 5.3.4 " in text, text
    pipeline.fail = Unavailable("down")
    code, text = await client.send([f"{MAIL_A.token}@{DOMAIN}"], SIMPLE)
    assert code == 451 and " 4.3.0 " in text, text
    await client.close()


async def test_helo_client_gets_a_plain_helo_reply_then_enhanced_codes(door):
    ingress, _ = await door()
    client = await Client.connect(ingress.port)
    assert client.greeting[0] == 220
    code, text = await client.cmd("HELO client.example.net")
    assert code == 250 and not ENHANCED.match(text)
    code, text = await client.cmd("MAIL FROM:<a@b>")
    assert code == 250 and ENHANCED.match(text)
    await client.close()


async def test_starttls_inside_tls_is_503(door, cert_pair):
    cert, key = cert_pair
    ingress, _ = await door(tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def client() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=IO_TIMEOUT) as smtp:
            smtp.starttls(context=context)
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            answer = smtp.docmd("STARTTLS")
            assert smtp.noop()[0] == 250  # the session goes on
            return answer

    code, text = await asyncio.wait_for(asyncio.to_thread(client), 20)
    assert code == 503 and text.startswith(b"5.5.1")


async def test_pipelined_transaction_gets_every_reply_in_order(door):
    ingress, pipeline = await door()
    reader, writer = await asyncio.open_connection("127.0.0.1", ingress.port)
    await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
    writer.write((f"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<{MAIL_A.token}@{DOMAIN}>\r\n"
                  f"RCPT TO:<nobody@{DOMAIN}>\r\nDATA\r\n").encode())
    codes = []
    while len(codes) < 5:
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        if line[3:4] == b" ":
            codes.append(int(line[:3]))
    assert codes == [250, 250, 250, 550, 354]
    writer.write(wire(SIMPLE) + b".\r\nQUIT\r\n")
    assert (await asyncio.wait_for(reader.readline(), IO_TIMEOUT)).startswith(b"250 2.0.0")
    writer.close()
    assert len(pipeline.calls) == 1


# --- mail decoding never hands the store a lone surrogate --------------------------------

NASTY_MAILS = [
    b"Subject: caf\xe9 \xff\n\xe9X-Odd\xff: v\xe9\nX-\xff\xfe: 1\nFrom: \xe9 <a@b>\n\nbody \xff\xfe\n",
    b"Subject: =?utf-7?Q?+2AA-?=\nContent-Type: text/plain; charset=utf-7\n\n+2AA- lone\n",
    b"Subject: =?utf-16-le?B?ANg=?=\nContent-Type: text/plain; charset=utf-16-le\n"
    b"Content-Transfer-Encoding: base64\n\nANgA3A==\n",
    b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: application/octet-stream;"
    b" name=\"\xe9\xff.bin\"\nContent-Disposition: attachment; filename*=utf-7''+2AA-.bin\n\nxx\n--b--\n",
    b"From: \"\xff\" <\xe9@\xff.example>\nTo: \xff@x, =?utf-7?Q?+2AA-?= <a@b>\nMessage-ID: <\xff@x>\n\nx\n",
]


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


@pytest.mark.parametrize("raw", NASTY_MAILS)
def test_decoded_mail_is_valid_unicode(raw):
    for data in (raw, raw.replace(b"\n", b"\r\n")):
        payload = parse_message(data)
        for text in strings(payload):
            text.encode("utf-8")  # a lone surrogate would raise here (and in the store)


# --- end to end: the daemon, a real database -------------------------------------------

NAGIOS_TEMPLATES = """
[[integrations]]
id = "nagios"
name = "Nagios by mail"
kind = "inbound_email"
token = "tok-nagios-mail-1"
[integrations.templates]
grouping_id = '{{ payload.subject | regex_replace("^\\\\*\\\\* (PROBLEM|RECOVERY) (.*) is \\\\w+ \\\\*\\\\*$", "\\\\2") }}'
resolve_condition = '{{ payload.subject.startswith("** RECOVERY") }}'
"""


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


async def smtp_send(port: int, token: str, data: bytes, rcpts: list[str] | None = None) -> tuple[int, str]:
    client = await Client.connect(port)
    try:
        return await client.send(rcpts or [f"{token}@{DOMAIN}"], data)
    finally:
        await client.close()


@pytest.mark.parametrize("name", CORPUS_EMAILS)
async def test_e2e_corpus_email_lands_grouped_by_subject(start_tocsin, name):
    h = await start_tocsin(smtp=True)
    token = TOKEN["mail"]
    data = eml(name, token)
    code, text = await smtp_send(h.daemon.smtp_port, token, data)
    assert code == 250, text
    payload = parse_message(wire(data))
    [group] = await h.groups(integration_id="mail")
    status, alerts = await h.api("GET", f"alerts/?alert_group_id={group['id']}")
    assert status == 200
    [alert] = alerts["results"]
    assert alert["payload"] == payload
    assert group["title"] == payload["subject"]
    with sqlite3.connect(h.daemon.config.daemon.database) as db:
        [(key,)] = db.execute("SELECT grouping_key FROM alert_groups WHERE id = ?", (group["id"],)).fetchall()
    assert key == md5(payload["subject"].upper())
    # Default resolve condition: the message is "ok" (backup-ok makes a group created resolved).
    assert group["state"] == ("resolved" if payload["message"].upper() == "OK" else "new")


async def test_e2e_nagios_defaults_make_two_groups(start_tocsin):
    h = await start_tocsin(smtp=True)
    for name in ("nagios-problem.eml", "nagios-recovery.eml"):
        assert (await smtp_send(h.daemon.smtp_port, TOKEN["mail"], eml(name, TOKEN["mail"])))[0] == 250
    groups = await h.groups(integration_id="mail")
    assert sorted(g["state"] for g in groups) == ["new", "new"]


async def test_e2e_nagios_recovery_resolves_with_custom_templates(start_tocsin):
    h = await start_tocsin(smtp=True, extra_integrations=NAGIOS_TEMPLATES)
    token = "tok-nagios-mail-1"
    assert (await smtp_send(h.daemon.smtp_port, token, eml("nagios-problem.eml", token)))[0] == 250
    [group] = await h.groups(integration_id="nagios")
    assert group["state"] == "new"
    assert (await smtp_send(h.daemon.smtp_port, token, eml("nagios-recovery.eml", token)))[0] == 250
    [group] = await h.groups(integration_id="nagios")
    assert group["state"] == "resolved" and group["alerts_count"] == 2
    with sqlite3.connect(h.daemon.config.daemon.database) as db:
        [(key,)] = db.execute("SELECT grouping_key FROM alert_groups WHERE id = ?", (group["id"],)).fetchall()
    assert key == md5("Service Alert: web01/HTTP")


async def test_e2e_one_mail_to_two_integrations_and_raw_kept(start_tocsin):
    h = await start_tocsin(smtp=True)
    rcpts = [f"{TOKEN['mail']}@{DOMAIN}", f"{TOKEN['wh']}@{DOMAIN}", f"{TOKEN['mail']}@ALERTS.EXAMPLE.COM"]
    data = eml("with-attachment.eml", TOKEN["mail"])
    code, text = await smtp_send(h.daemon.smtp_port, "", data, rcpts)
    assert code == 250, text
    assert len(await h.groups(integration_id="mail")) == 1
    assert len(await h.groups(integration_id="wh")) == 1
    with sqlite3.connect(h.daemon.config.daemon.database) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(alerts)")]
        assert db.execute("SELECT count(*) FROM alerts").fetchone()[0] == 2
        if "raw" in columns:
            raws = [row[0] for row in db.execute("SELECT raw FROM alerts")]
            assert all(bytes(r) == wire(data) for r in raws)


async def test_e2e_unknown_token_550_nothing_stored(start_tocsin):
    h = await start_tocsin(smtp=True)
    code, text = await smtp_send(h.daemon.smtp_port, "nope-nope-nope", SIMPLE)
    assert code == 550 and "5.1.1" in text
    status, body = await h.api("GET", "alerts/")
    assert status == 200 and body["count"] == 0


async def _mail_load(port: int, token: str, accepted: list[str], stop: asyncio.Event, worker: int) -> None:
    n = 0
    while not stop.is_set():
        try:
            client = await Client.connect(port)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.02)
            continue
        try:
            for _ in range(20):
                n += 1
                subject = f"load {worker}-{n}"
                code, text = await client.send([f"{token}@{DOMAIN}"], f"From: d@example.net\nSubject: {subject}\n\nbody {n}\n".encode())
                if code == 250:
                    accepted.append(subject)
        except (OSError, asyncio.TimeoutError, ConnectionError, AssertionError):
            await asyncio.sleep(0.02)
        finally:
            await client.close()


async def test_e2e_sigkill_during_data_loses_nothing_that_got_250(spawn, tmp_path):
    proc = spawn(smtp=True)
    accepted: list[str] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_mail_load(proc.smtp_port, TOKEN["mail"], accepted, stop, w)) for w in range(16)]
    for _ in range(100):  # bounded: until a few hundred are in
        await asyncio.sleep(0.05)
        if len(accepted) >= 200:
            break
    # And one client surely in the middle of DATA when the kill comes.
    midway = await Client.connect(proc.smtp_port)
    for line in ("EHLO c", "MAIL FROM:<d@example.net>", f"RCPT TO:<{TOKEN['mail']}@{DOMAIN}>", "DATA"):
        await midway.cmd(line)
    midway.writer.write(b"Subject: never finished\r\n\r\nhalf a body\r\n")
    await midway.writer.drain()
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=10)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), 20)
    assert len(accepted) >= 20, "the load never got going:\n" + "".join(proc.output[-20:])

    again = spawn(proc.config_path)
    assert again.stop() == 0
    with sqlite3.connect(tmp_path / "tocsin.db") as db:
        subjects = {json.loads(p)["subject"] for (p,) in db.execute("SELECT payload FROM alerts")}
    missing = [s for s in accepted if s not in subjects]
    assert not missing, f"{len(missing)} of {len(accepted)} acknowledged mails lost"
    assert "never finished" not in subjects
    await midway.close()
