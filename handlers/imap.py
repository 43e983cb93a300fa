"""IMAP mailboxes as an inbound_email door: read a mailbox nobody will re-point at tocsin.

One `Mailbox` per integration with `imap = {…}`. Its session runs in a thread of its own
(imapclient is synchronous; IDLE blocks) and hands each message to the event loop, where it
goes through the same email pipeline as SMTP mail. Exactly once across crashes: a message's
receipt (mailbox, UIDVALIDITY, UID) is committed with its alert, and `after` (mark seen,
delete, move) is applied only once that commit is durable; a message whose receipt is
already stored is not stored again, only finished. Reconnects back off, capped at 30 s.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import imapclient
from imapclient.exceptions import IMAPClientError

from .mail import is_cheap, parse_message

log = logging.getLogger("tocsin.imap")

BACKOFF_MAX = 30.0
COMMAND_TIMEOUT = 30.0   # seconds for one IMAP command (connect, fetch, store)
FETCH_CHUNK = 20         # messages looked up and fetched per round trip
IDLE_SLICE = 1.0         # an IDLE wait is cut in slices this long, so stop() is honoured fast


class _Refused(Exception):
    """A setting the server cannot honour (no STARTTLS to a remote host)."""


@dataclass
class MailboxState:
    """What /healthz and the metrics say about one mailbox."""

    state: str = "starting"        # starting | connected | unreachable | stopped
    error: str | None = None
    since: float = 0.0
    last_message_at: float | None = None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Mailbox:
    """Reads one integration's mailbox into the pipeline until stopped."""

    def __init__(self, integration_id: str, settings: Any, get_pipeline: Callable[[], Any], *,
                 max_stored_raw_bytes: int = 1024 * 1024, metrics: Any = None):
        self.integration_id = integration_id
        self.settings = settings
        self.get_pipeline = get_pipeline
        self.max_stored_raw_bytes = max_stored_raw_bytes
        self.metrics = metrics
        self.status = MailboxState(since=time.time())
        self._stop = threading.Event()
        self._poisoned: set[str] = set()  # receipts of messages that can never be stored: left alone
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle (event loop side) ------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"imap-{self.integration_id}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish the message in hand, log out, and return (within a few seconds)."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, COMMAND_TIMEOUT + 5)
        self._set("stopped", None)

    # -- the session (thread side) -----------------------------------------------------------

    def _set(self, state: str, error: str | None) -> None:
        if (state, error) != (self.status.state, self.status.error):
            self.status = MailboxState(state, error, time.time(), self.status.last_message_at)
            if self.metrics is not None:
                self.metrics.mailbox_state(self.integration_id, state == "connected")

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            client = None
            try:
                client = self._connect()
                uidvalidity = int(client.select_folder(self.settings.folder)[b"UIDVALIDITY"])
                self._set("connected", None)
                log.info("imap connected", extra={"integration": self.integration_id, "mailbox": self.settings.url})
                backoff = 1.0
                idle = client.has_capability("IDLE")
                while not self._stop.is_set():
                    self._drain(client, uidvalidity)
                    self._wait(client, idle)
            except Exception as exc:  # noqa: BLE001 - whatever broke the session, reconnect later
                reason = str(exc) or type(exc).__name__
                if not isinstance(exc, (IMAPClientError, OSError, ssl.SSLError, _Refused)):
                    log.exception("imap session failed", extra={"integration": self.integration_id})
                if self.status.state != "unreachable" or self.status.error != reason:
                    log.warning("imap mailbox unreachable, retrying", extra={
                        "integration": self.integration_id, "mailbox": self.settings.url, "error": reason,
                        "retry_in": backoff})
                self._set("unreachable", reason)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                if client is not None:
                    try:
                        client.logout()
                    except Exception:  # noqa: BLE001 - the connection may be gone already
                        pass

    def _connect(self) -> imapclient.IMAPClient:
        s = self.settings
        context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.tls == "ssl":
            client = imapclient.IMAPClient(s.host, port=s.port, ssl=True, ssl_context=context,
                                           timeout=COMMAND_TIMEOUT)
        else:
            client = imapclient.IMAPClient(s.host, port=s.port, ssl=False, timeout=COMMAND_TIMEOUT)
            if client.has_capability("STARTTLS"):
                client.starttls(context)
            elif not _is_loopback(s.host):
                client.shutdown()
                raise _Refused(f"{s.host} offers no STARTTLS; tocsin sends a password in plain text only to loopback")
        client.login(s.user, s.password)
        return client

    def _wait(self, client: imapclient.IMAPClient, idle: bool) -> None:
        """Until the server says something changed (IDLE), or `poll` seconds pass."""
        deadline = time.monotonic() + self.settings.poll
        if not idle:
            self._stop.wait(self.settings.poll)
            return
        client.idle()
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if client.idle_check(timeout=IDLE_SLICE):
                    break
        finally:
            client.idle_done()

    def _drain(self, client: imapclient.IMAPClient, uidvalidity: int) -> None:
        s = self.settings
        uids = sorted(client.search(["UNSEEN"] if s.after == "seen" else ["ALL"]))
        for start in range(0, len(uids), FETCH_CHUNK):
            if self._stop.is_set():
                return
            chunk = uids[start:start + FETCH_CHUNK]
            keys = {uid: self.receipt(uidvalidity, uid) for uid in chunk}
            stored = self._call(self._stored(list(keys.values())))
            fresh = [uid for uid in chunk if keys[uid] not in stored and keys[uid] not in self._poisoned]
            bodies = client.fetch(fresh, ["BODY.PEEK[]"]) if fresh else {}
            for uid in chunk:
                if keys[uid] in self._poisoned:
                    continue
                if uid in bodies:
                    outcome = self._call(self._ingest(bodies[uid][b"BODY[]"], keys[uid]))
                    if outcome == "later":
                        return  # kept for the next round: rate-limited or storage trouble
                    if outcome == "poisoned":
                        continue
                self._finish(client, uid)

    def receipt(self, uidvalidity: int, uid: int) -> str:
        """The message's id across sessions: a new UIDVALIDITY makes every UID new."""
        s = self.settings
        return f"imap:{self.integration_id}:{s.user}@{s.host}:{s.port}/{s.folder};{uidvalidity};{uid}"

    def _finish(self, client: imapclient.IMAPClient, uid: int) -> None:
        """Apply `after` to a message whose alert is committed."""
        s = self.settings
        if s.after == "seen":
            client.add_flags([uid], [imapclient.SEEN])
        elif s.after == "delete":
            client.delete_messages([uid])
            self._expunge(client, uid)
        else:
            if client.has_capability("MOVE"):
                client.move([uid], s.move_to)
            else:
                client.copy([uid], s.move_to)
                client.delete_messages([uid])
                self._expunge(client, uid)

    @staticmethod
    def _expunge(client: imapclient.IMAPClient, uid: int) -> None:
        if client.has_capability("UIDPLUS"):
            client.uid_expunge([uid])
        else:
            client.expunge()

    def _call(self, coroutine) -> Any:
        """Run a coroutine on the event loop and wait for it (the commit included)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(COMMAND_TIMEOUT * 2)

    # -- on the event loop ------------------------------------------------------------------

    async def _stored(self, keys: list[str]) -> set[str]:
        return await self.get_pipeline().store.receipts_seen(keys)

    async def _ingest(self, raw: bytes, receipt: str) -> str:
        """Store one message as an alert: "stored", "later" (what a sender would retry), or
        "poisoned" (it can never be stored: left unread in the mailbox and logged)."""
        from grouping.pipeline import RateLimited, Unavailable

        pipeline = self.get_pipeline()
        integration = pipeline.by_id(self.integration_id)
        if integration is None:
            self._stop.set()  # the integration was removed by a reload
            return "later"
        if is_cheap(raw):
            payload = parse_message(raw)
        else:
            payload = await asyncio.get_running_loop().run_in_executor(None, parse_message, raw)
        cap = self.max_stored_raw_bytes
        try:
            await pipeline.ingest(integration, payload, source="imap", raw=raw[:cap] if cap > 0 else None,
                                  receipt=receipt)
        except RateLimited as exc:
            log.warning("imap message left for later: rate limited", extra={
                "integration": self.integration_id, "retry_after": exc.retry_after})
            self._record("rate_limited")
            return "later"
        except Unavailable as exc:
            log.warning("imap message left for later: storage unavailable", extra={
                "integration": self.integration_id, "error": str(exc)})
            self._record("unavailable")
            return "later"
        except Exception:  # noqa: BLE001 - one bad message never stops the mailbox
            log.exception("imap message cannot be stored; left unread in the mailbox", extra={
                "integration": self.integration_id, "receipt": receipt})
            self._poisoned.add(receipt)
            self._record("failed")
            return "poisoned"
        self.status.last_message_at = time.time()
        self._record("stored")
        return "stored"

    def _record(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.mailbox_message(self.integration_id, outcome)
