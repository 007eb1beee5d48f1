"""Admission: who may open a WebSocket, how many, and how fast they may act.

Pure checks, no sockets: the HTTP side (:mod:`counter_sync.web`) asks them
before a handshake, the handler (:mod:`counter_sync.counter`) asks the rate
limit for every message.
"""

from __future__ import annotations

import dataclasses
import http
from collections.abc import Sequence
from urllib.parse import urlsplit

from counter_sync.config import Settings

__all__ = ["Refusal", "TokenBucket", "origin_allowed", "refuse_upgrade"]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: the HTTP status, the reason in words, and details for the log."""

    status: http.HTTPStatus
    reason: str
    detail: str


def refuse_upgrade(
    settings: Settings, *, origin: str | None, host: str | None, users: int
) -> Refusal | None:
    """Tell why a WebSocket handshake must be refused, or None to let it through."""
    if not origin_allowed(origin, host, settings.origins):
        return Refusal(
            http.HTTPStatus.FORBIDDEN, "origin not allowed", f"origin {origin} not allowed"
        )
    if users >= settings.max_users:
        return Refusal(
            http.HTTPStatus.SERVICE_UNAVAILABLE, "server full", f"{users} users is the cap"
        )
    return None


def origin_allowed(origin: str | None, host: str | None, extra: Sequence[str]) -> bool:
    """Allow non-browser clients, pages from disk, the server's own origin, and ``extra``.

    Non-browser clients send no Origin; a page opened from ``file://`` sends
    ``null``. The server's own origin is whatever host the browser used to
    load the page, which is the ``Host`` header (also behind a proxy that
    forwards it).
    """
    if origin is None or origin == "null" or origin in extra:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host is not None and parts.netloc == host


class TokenBucket:
    """Per-connection rate limit: ``rate`` messages a second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; refill for the time since last call."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
