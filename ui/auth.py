"""UI sessions: HMAC-signed cookies with an expiry, and the CSRF token tied to each session.

The key is made at start, so a restart logs everyone out. A session also carries a
fingerprint of the API token it was opened with: remove that token from the config
(and reload) and its sessions end at their next request.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
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
