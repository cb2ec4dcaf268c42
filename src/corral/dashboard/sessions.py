"""Dashboard sign-in sessions: a random token in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS),
looked up in a table held by the server process, which maps it to the API key's *id* (never the key) and
to the session's CSRF token.

The key is looked up again on every request (`ApiKeys.active`), so revoking or expiring it ends its
sessions at their next request. Sessions live in memory: a restarted server signs everyone out, which is
safe and, for one process that owns an instance, enough."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "corral_session"
SIGNIN_COOKIE = "corral_signin"  # the sign-in form's own CSRF token (double submit: no session yet)
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
IDLE_S = 8 * 3600
LIFETIME_S = 24 * 3600


@dataclass
class Session:
    key_id: str
    csrf: str
    created_at: float
    seen_at: float = field(default=0.0)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Sessions by the SHA-256 of their cookie's token (a memory dump shows no usable cookie)."""

    def __init__(self, *, idle_s: float = IDLE_S, lifetime_s: float = LIFETIME_S, clock=time.time) -> None:
        self._by_digest: dict[str, Session] = {}
        self.idle_s, self.lifetime_s, self.clock = idle_s, lifetime_s, clock

    def open(self, key_id: str) -> tuple[str, Session]:
        """A new session for the key: (the cookie's token, the session)."""
        self._prune()
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(key_id, secrets.token_urlsafe(32), now, now)
        self._by_digest[_digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._by_digest.get(_digest(token))
        if session is None:
            return None
        now = self.clock()
        if now - session.seen_at > self.idle_s or now - session.created_at > self.lifetime_s:
            self.close(token)
            return None
        session.seen_at = now
        return session

    def close(self, token: str | None) -> None:
        if token:
            self._by_digest.pop(_digest(token), None)

    def close_key(self, key_id: str) -> None:
        """Ends every session of a key (when it is revoked from the dashboard)."""
        for digest in [d for d, s in self._by_digest.items() if s.key_id == key_id]:
            del self._by_digest[digest]

    def _prune(self) -> None:
        now = self.clock()
        for digest in [d for d, s in self._by_digest.items()
                       if now - s.seen_at > self.idle_s or now - s.created_at > self.lifetime_s]:
            del self._by_digest[digest]


def same_token(presented: str | None, expected: str) -> bool:
    return bool(presented) and hmac.compare_digest(presented.encode(), expected.encode())
