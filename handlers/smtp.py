"""SMTP ingress: an aiosmtpd listener on tocsin's own event loop.

`RCPT TO:<token>@<domain>` picks the integration (else 550 5.1.1; tocsin never
relays). DATA parses the mail into the payload (handlers/mail.py), hands it to the
pipeline for every integration named, and answers 250 only once the alerts are on
disk; storage trouble and anything unexpected answer 451, so the sender keeps the
mail and retries.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from aiosmtpd.smtp import SMTP, syntax

from grouping.pipeline import RateLimited, Unavailable
from store import InvalidWrite

from .mail import is_cheap, parse_message

log = logging.getLogger("tocsin.smtp")

# aiosmtpd logs every command and connection at INFO on this logger.
_AIOSMTPD_LOG = "mail.log"
# RFC 5321 says 1000 octets a line, but devices send long HTML lines and a 500 at the
# end of DATA is a permanent failure: a lost alert. Accept lines up to this.
_LINE_LIMIT = 64 * 1024
_MAX_REPLY_IDS = 3


# RFC 3463 codes for replies written without one (aiosmtpd's own, mostly).
_ENHANCED_FOR = {
    "211": "2.0.0", "214": "2.0.0", "220": "2.0.0", "221": "2.0.0", "250": "2.0.0", "252": "2.5.0",
    "421": "4.4.2", "450": "4.2.0", "451": "4.3.0", "452": "4.5.3", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
    "550": "5.1.1", "552": "5.3.4", "553": "5.1.3", "554": "5.7.1", "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)")


def enhanced(reply: str) -> str:
    """The reply with an RFC 2034 enhanced status code after the 3-digit one, if it had none.

    3xx replies (354, 334) take none.
    """
    if len(reply) < 3 or reply[0] not in "245" or _HAS_ENHANCED.match(reply):
        return reply
    code, sep, text = reply[:3], reply[3:4] or " ", reply[4:]
    return f"{code}{sep}{_ENHANCED_FOR.get(code, reply[0] + '.0.0')} {text}".rstrip()


class SmtpIngress:
    """The SMTP listener. `start()` binds (then `port` is the bound port, so port 0
    works); `stop(timeout)` stops accepting and lets in-flight DATA finish.

    `settings` is duck-typed like daemon.config.SmtpConfig: host, port, domain,
    domains, max_message_bytes, max_recipients, session_timeout (idle time allowed
    between commands), data_timeout (time allowed to send the message after DATA,
    and again to parse and commit it), max_sessions, tls_cert, tls_key,
    allowed_networks, max_stored_raw_bytes.

    `get_pipeline()` returns the current grouping.pipeline.Pipeline (swapped on reload).

    `metrics` (optional, handlers.metrics.Metrics or alike) gets the calls HTTP
    ingress makes, with source "smtp": `accepted(integration, n, source)` and
    `rejected(integration_id, source, reason)`; plus `smtp_reply(code)` for every
    reply to RCPT and DATA (aiosmtpd's own 552 too) and the `smtp_sessions` gauge.
    Missing methods are skipped.
    """

    def __init__(self, settings: Any, get_pipeline: Callable[[], Any], *, metrics: Any = None):
        self.settings = settings
        self.get_pipeline = get_pipeline
        self.metrics = metrics
        self.port: int | None = None
        self.draining = False
        self._domains = frozenset(d.lower().rstrip(".") for d in settings.domains)
        self._networks = tuple(ipaddress.ip_network(str(n), strict=False) for n in settings.allowed_networks)
        self._handler = MailHandler(self)
        self._sessions: set[_Session] = set()
        self._idle = asyncio.Event()
        self._commits: set[asyncio.Future] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tls: ssl.SSLContext | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._session_args: dict[str, Any] = {}

    async def start(self) -> None:
        aiosmtpd_log = logging.getLogger(_AIOSMTPD_LOG)
        if aiosmtpd_log.level == logging.NOTSET:  # unless the operator asked for it
            aiosmtpd_log.setLevel(logging.WARNING)
        s = self.settings
        if s.tls_cert and s.tls_key:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tocsin-mail")
        loop = asyncio.get_running_loop()
        self._session_args = dict(
            data_size_limit=s.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=s.domain,  # else aiosmtpd asks DNS for our FQDN on every connection
            ident="tocsin",
            tls_context=self._tls,
            require_starttls=False,
            timeout=s.session_timeout,
            loop=loop,
        )
        self._server = await loop.create_server(lambda: _Gate(self), s.host, s.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("smtp listening", extra={"host": s.host, "port": self.port, "domains": sorted(self._domains),
                                          "starttls": self._tls is not None})

    def reconfigure(self, settings: Any) -> bool:
        """Take a reloaded [smtp] table: domains, allowed networks and limits apply to the
        next session. False when it changes what needs a restart (listen address, TLS)."""
        old = self.settings
        if (settings.host, settings.port, settings.tls_cert, settings.tls_key) != (
                old.host, old.port, old.tls_cert, old.tls_key):
            return False
        self.settings = settings
        self._domains = frozenset(d.lower().rstrip(".") for d in settings.domains)
        self._networks = tuple(ipaddress.ip_network(str(n), strict=False) for n in settings.allowed_networks)
        self._session_args.update(data_size_limit=settings.max_message_bytes, hostname=settings.domain,
                                  timeout=settings.session_timeout)
        return True

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; idle sessions get 421 now, sessions in DATA after their reply."""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.draining = True
        self._server.close()
        for session in list(self._sessions):
            if not session.in_data:
                session.shut("421 4.3.2 Service shutting down")
        if self._sessions:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.warning("smtp stop: sessions still in DATA, closing them",
                            extra={"sessions": len(self._sessions), "waited": timeout})
        if self._commits:  # a commit whose client went away still finishes
            await asyncio.wait(list(self._commits), timeout=max(0.01, deadline - loop.time()))
        for session in list(self._sessions):
            session.shut("421 4.3.2 Service shutting down")
        self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- used by the gate, the sessions and the handler ---------------------------

    def integration_for(self, pipeline: Any, address: str) -> Any:
        """The integration `<token>@<one of our domains>` names, or None."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower().rstrip(".") not in self._domains:
            return None
        if len(local) > 1 and local[0] == '"' and local[-1] == '"':
            local = local[1:-1]
        return pipeline.by_token(local) if local else None

    def refusal(self, peer: Any) -> tuple[str, str] | None:
        """(reply, reason) for a connection we will not serve, else None."""
        if self._networks and not self._allowed(peer):
            return "554 5.7.1 Access denied", "refused_network"
        if self.draining:
            return "421 4.3.2 Service shutting down", "refused_draining"
        if len(self._sessions) >= self.settings.max_sessions:
            return "421 4.7.0 Too many connections, try again later", "refused_busy"
        return None

    def _allowed(self, peer: Any) -> bool:
        try:
            ip = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def new_session(self) -> "_Session":
        session = _Session(self, self._handler, **self._session_args)
        self._sessions.add(session)
        self._idle.clear()
        self._count_sessions()
        return session

    def session_closed(self, session: "_Session") -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._idle.set()
        self._count_sessions()

    def _count_sessions(self) -> None:
        gauge = getattr(self.metrics, "smtp_sessions", None)
        if gauge is not None:
            gauge.set(len(self._sessions))

    async def parse(self, raw: bytes) -> dict:
        """The payload; a message that may be slow to parse goes to a worker thread."""
        if is_cheap(raw):
            return parse_message(raw)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, parse_message, raw)
        return await asyncio.wait_for(work, self.settings.data_timeout)

    async def commit(self, pipeline: Any, items: list, raw: bytes) -> list:
        """Hand the alerts over; returns once they are committed.

        The commit runs shielded: a client that hangs up or times out mid-commit gets
        no reply (it will retry), but the commit itself is never cut in half.
        """
        cap = self.settings.max_stored_raw_bytes
        task = asyncio.ensure_future(
            pipeline.ingest_many(items, source="smtp", raw=raw[:cap] if cap > 0 else None)
        )
        self._commits.add(task)
        task.add_done_callback(self._commit_done)
        return await asyncio.wait_for(asyncio.shield(task), self.settings.data_timeout)

    def _commit_done(self, task: asyncio.Future) -> None:
        self._commits.discard(task)
        if not task.cancelled():
            task.exception()  # mark it retrieved; the waiting handler, if any, reports it

    def record(self, hook: str, *args: Any) -> None:
        """Call metrics.<hook>(*args) if there is such a hook; never fails the caller."""
        method = getattr(self.metrics, hook, None)
        if method is not None:
            try:
                method(*args)
            except Exception:
                log.debug("smtp metrics hook failed", extra={"hook": hook}, exc_info=True)


class MailHandler:
    """aiosmtpd handler: RCPT resolves the integration, DATA parses, hands over and
    maps the pipeline's answer to an SMTP reply."""

    def __init__(self, ingress: SmtpIngress):
        self.ingress = ingress

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        # No SMTP AUTH: the token in the address is the credential, and aiosmtpd's
        # default mechanisms (offered after STARTTLS) would refuse every login.
        kept = [r for r in responses if not r.startswith("250-AUTH")]
        # aiosmtpd reads pipelined commands in order; every reply carries an enhanced
        # code (_Session.push). Both go before the last line ("250 HELP").
        return kept[:-1] + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"] + kept[-1:]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= self.ingress.settings.max_recipients:
            self.ingress.record("rejected", "", "smtp", "too_many_recipients")
            return "452 4.5.3 Too many recipients"
        if self.ingress.integration_for(self.ingress.get_pipeline(), address) is None:
            self.ingress.record("rejected", "", "smtp", "unknown_token")
            return "550 5.1.1 Recipient address rejected: no such integration here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        ingress = self.ingress
        # Resolve again: a config reload may have swapped the pipeline since RCPT.
        pipeline = ingress.get_pipeline()
        targets: dict[str, Any] = {}
        for address in envelope.rcpt_tos:
            integration = ingress.integration_for(pipeline, address)
            if integration is not None:
                targets.setdefault(integration.id, integration)  # one alert per integration
        if not targets:
            ingress.record("rejected", "", "smtp", "unknown_token")
            return "550 5.1.1 Recipient address rejected: no such integration here"
        raw = envelope.original_content
        # Parsing and committing get their own data_timeout; keep the idle timer off them.
        server.hold_timeout(2 * ingress.settings.data_timeout + 5)
        try:
            payload = await ingress.parse(raw)
            accepted = await ingress.commit(pipeline, [(i, payload) for i in targets.values()], raw)
        except Unavailable:
            reason, reply = "unavailable", "451 4.3.0 Storage unavailable, try again later"
        except InvalidWrite:  # this message only, and for good: a retry would fail the same way
            reason, reply = "invalid", "554 5.6.0 Message content cannot be stored"
        except RateLimited:
            reason, reply = "rate_limited", "451 4.7.0 Rate limit exceeded, try again later"
        except TimeoutError:
            reason, reply = "timeout", "451 4.3.0 Timed out storing the message, try again later"
        except Exception:
            log.exception("smtp: could not ingest message", extra={"peer": (session.peer or ("",))[0]})
            reason, reply = "error", "451 4.3.0 Internal error, try again later"
        else:
            for integration in targets.values():
                ingress.record("accepted", integration, 1, "smtp")
            ids = " ".join(a.alert_id for a in accepted[:_MAX_REPLY_IDS])
            more = f" (+{len(accepted) - _MAX_REPLY_IDS} more)" if len(accepted) > _MAX_REPLY_IDS else ""
            return f"250 2.0.0 OK stored as {ids}{more}"
        for integration_id in targets:
            ingress.record("rejected", integration_id, "smtp", reason)
        return reply

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp: session error", extra={"error_type": type(error).__name__}, exc_info=error)
        return "451 4.3.0 Internal error, try again later"


class _Session(SMTP):
    """One SMTP connection: aiosmtpd's SMTP with tocsin's timeouts and drain.

    Uses aiosmtpd 1.4's timer hooks (_reset_timeout, _timeout_cb), which the package
    pins.
    """

    line_length_limit = _LINE_LIMIT

    def __init__(self, ingress: SmtpIngress, handler: MailHandler, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self._ingress = ingress
        self.in_data = False
        self._counting = False  # replies to RCPT and DATA are counted by code
        self._greeted = False   # the 220 greeting goes out as it is
        self._plain = False     # inside EHLO / HELO

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if self._greeted and not self._plain:
                status = enhanced(status)
            self._greeted = True
            if self._counting and not status.startswith("354"):
                self._ingress.record("smtp_reply", status[:3])
        await super().push(status)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain = True  # RFC 2034: the EHLO lines carry no enhanced codes
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._plain = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # aiosmtpd would start a second handshake inside the first one.
            await self.push("503 5.5.1 Already running TLS")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str) -> None:
        self._counting = True
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._counting = False

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._ingress.session_closed(self)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        # Say why before hanging up (RFC 5321 4.2: 421 when closing the channel).
        if not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 Timeout, closing connection\r\n")
        super()._timeout_cb()

    def hold_timeout(self, seconds: float) -> None:
        """Re-arm the idle timer with a longer delay (while tocsin, not the client, works)."""
        if self.transport is not None:
            self._reset_timeout(seconds)

    def shut(self, reply: str) -> None:
        """Send a final reply and close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode("ascii") + b"\r\n")
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.rcpt_tos and not arg:
            self._reset_timeout(self._ingress.settings.data_timeout)  # the whole upload
        self.in_data = self._counting = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = self._counting = False
            if self.transport is not None:
                self._reset_timeout()
        if self._ingress.draining:
            self.shut("421 4.3.2 Service shutting down")


class _Gate(asyncio.Protocol):
    """First protocol of every connection: refuses it (554 foreign network, 421 busy)
    or hands the transport to a new SMTP session."""

    def __init__(self, ingress: SmtpIngress):
        self._ingress = ingress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = self._ingress.refusal(transport.get_extra_info("peername"))
        if refusal is None:
            try:
                session = self._ingress.new_session()
                transport.set_protocol(session)
                session.connection_made(transport)
                return
            except Exception:
                log.exception("smtp: could not start a session")
                refusal = ("421 4.3.0 Internal error, try again later", "error")
        reply, reason = refusal
        self._ingress.record("rejected", "", "smtp", reason)
        transport.write(reply.encode("ascii") + b"\r\n")
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # a refused client talking anyway

    def eof_received(self) -> bool:
        return False
