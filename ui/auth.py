"""UI sessions: HMAC-signed cookies with an expiry, and the CSRF token tied to each session.

The key is made at start, so a restart logs everyone out. A session also carries a
fingerprint of the API token it was opened with: remove that token from the config
(and reload) and its sessions end at their next request.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

SESSION_COOKIE = "tocsin_session"
LOGIN_COOKIE = "tocsin_login"  # double-submit value that guards the login form itself
CSRF_FIELD = "_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Session:
    """A valid, signed session: its id (for CSRF and logout) and when it ends."""

    sid: str
    expires: int
    csrf: str


class Sessions:
    """Issue and check session cookie values; every check is constant-time."""

    def __init__(self, key: bytes | None = None, lifetime: float = SESSION_SECONDS):
        self._key = key or secrets.token_bytes(32)
        self.lifetime = lifetime
        self._ended: dict[str, int] = {}  # logged-out sid -> its expiry (kept until then)

    def _mac(self, purpose: str, text: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}\0{text}".encode(), hashlib.sha256).digest())

    def fingerprint(self, api_token: str) -> str:
        """Names the API token a session came from without carrying the token."""
        return self._mac("token", api_token)[:16]

    def issue(self, api_token: str, now: float | None = None) -> str:
        """A new cookie value for someone who just proved they hold `api_token`."""
        expires = int((now if now is not None else time.time()) + self.lifetime)
        body = f"{secrets.token_urlsafe(18)}.{expires}.{self.fingerprint(api_token)}"
        return f"{body}.{self._mac('session', body)}"

    def check(self, value: str | None, api_tokens: Iterable[str], now: float | None = None) -> Session | None:
        """The session a cookie value proves, or None (forged, expired, logged out, token revoked)."""
        if not value or value.count(".") != 3:
            return None
        body, _, mac = value.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", body).encode()):
            return None
        sid, expires_text, fp = body.split(".")
        try:
            expires = int(expires_text)
        except ValueError:
            return None
        if expires <= (now if now is not None else time.time()) or sid in self._ended:
            return None
        if not any(hmac.compare_digest(fp.encode(), self.fingerprint(t).encode()) for t in api_tokens):
            return None
        return Session(sid, expires, self._mac("csrf", sid))

    def end(self, session: Session, now: float | None = None) -> None:
        """Log a session out: its cookie stops working even if someone kept a copy."""
        now = now if now is not None else time.time()
        for sid in [s for s, exp in self._ended.items() if exp <= now]:
            del self._ended[sid]
        self._ended[session.sid] = session.expires

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), session.csrf.encode())


def token_matches(given: str, api_tokens: Iterable[str]) -> str | None:
    """The configured API token equal to `given` (compared in constant time), or None."""
    given_b = given.strip().encode()
    found = None
    for t in api_tokens:
        if given_b and hmac.compare_digest(given_b, t.encode()):
            found = t
    return found


def same(a: str, b: str) -> bool:
    """Constant-time equality of two texts."""
    return hmac.compare_digest(a.encode(), b.encode())


class LoginThrottle:
    """Slows wrong logins per source address: each failure from an address adds `step`
    seconds to that address's queue, so one address guessing waits longer and longer
    while everyone else's typo costs one step. Bounded: at most `max_sources` addresses
    are remembered (the quietest go first), and an address whose queue is past `max_wait`
    is refused at once instead of being kept waiting."""

    def __init__(self, step: float = 0.25, max_wait: float = 10.0, max_sources: int = 4096):
        self.step = step
        self.max_wait = max_wait
        self.max_sources = max_sources
        self._busy_until: OrderedDict[str, float] = OrderedDict()  # address -> its queue ends

    def __len__(self) -> int:
        return len(self._busy_until)

    def failed(self, source: str, now: float | None = None) -> float | None:
        """Record a wrong login from `source`: how long to hold its answer, or None when its
        queue is full (answer 429 at once)."""
        now = now if now is not None else time.monotonic()
        start = max(now, self._busy_until.get(source, now))
        wait = start + self.step - now
        if wait > self.max_wait:
            return None
        self._busy_until[source] = start + self.step
        self._busy_until.move_to_end(source)
        while len(self._busy_until) > self.max_sources:
            self._busy_until.popitem(last=False)
        return wait


def source_address(peer: str | None, forwarded_for: str | None) -> str:
    """Who a login comes from: the peer, or, when the peer is this machine (a reverse proxy
    in front of tocsin), the last address the proxy appended to X-Forwarded-For. An IPv6
    address counts as its /64, which one host usually holds whole."""
    source = peer or "?"
    if forwarded_for and (source.startswith("127.") or source == "::1"):
        last = forwarded_for.split(",")[-1].strip()
        if last:
            source = last[:64]
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
