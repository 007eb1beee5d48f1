"""Admission: who may open a WebSocket, how many at once, and how fast they may act.

Two gates, both before the hub spends anything on a client:

* At accept, before a byte is read: a cap on handshakes in progress, overall
  and per client address (:meth:`Gate.admit_handshake`). A peer that opens
  sockets and sends nothing holds at most ``max_pending_per_ip`` of them.
* At the handshake, once the request is read: the origin, the caps on users
  overall and per address (:meth:`Gate.refuse`). The hub adds its own
  reasons (rooms, draining) on top.

Client addresses are per IPv4 address and per IPv6 /64 (one host gets a /64).
Behind a reverse proxy every client has the proxy's address: the proxies
named in ``trusted_proxies`` are believed about ``X-Forwarded-For``, nobody
else is.
"""

from __future__ import annotations

import dataclasses
import http
import ipaddress
import logging
import resource
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlsplit

from counter_sync.config import FD_HEADROOM, Settings

__all__ = [
    "Gate",
    "RateLimit",
    "Refusal",
    "TokenBucket",
    "address_key",
    "fit_to_open_files",
    "origin_allowed",
]

log = logging.getLogger("counter_sync.admission")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: the HTTP status, the reason in words, details for the log."""

    status: http.HTTPStatus
    reason: str
    detail: str
    kind: str  # a short name, the same for every refusal of its sort (for metrics)


class Gate:
    """Counts handshakes in progress and users per client address, and says who may pass."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.trusted = [
            ipaddress.ip_network(proxy, strict=False) for proxy in settings.trusted_proxies
        ]
        self.handshakes = 0
        self.handshakes_by_address: Counter[str] = Counter()
        self.users_by_address: Counter[str] = Counter()

    # Before the handshake: the socket's own address.

    def admit_handshake(self, peer_ip: str) -> bool:
        """Count one more handshake in progress from ``peer_ip``, unless that is one too many."""
        key = address_key(peer_ip)
        if self.handshakes >= self.settings.max_pending:
            return False
        # A trusted proxy brings everyone's handshakes: only the overall cap applies.
        if not self.is_trusted(peer_ip) and (
            self.handshakes_by_address[key] >= self.settings.max_pending_per_ip
        ):
            return False
        self.handshakes += 1
        self.handshakes_by_address[key] += 1
        return True

    def end_handshake(self, peer_ip: str) -> None:
        key = address_key(peer_ip)
        self.handshakes -= 1
        self.handshakes_by_address[key] -= 1
        if not self.handshakes_by_address[key]:
            del self.handshakes_by_address[key]

    # At the handshake: the request is read, so the client's address is known.

    def client_address(self, peer_ip: str, forwarded_for: str | None) -> str:
        """The client's address: the peer's, or what a trusted proxy says it forwarded."""
        if forwarded_for is None or not self.is_trusted(peer_ip):
            return peer_ip
        # Each proxy appends the address it got the request from: read from
        # the right, skipping our own proxies; the first other one is the client.
        hops = [hop.strip() for hop in forwarded_for.split(",")]
        for hop in reversed(hops):
            if not valid_ip(hop):
                break  # forged or garbled beyond here: trust what we have
            if not self.is_trusted(hop):
                return hop
            peer_ip = hop
        return peer_ip

    def refuse(
        self, *, origin: str | None, host: str | None, address: str, users: int
    ) -> Refusal | None:
        """Why this handshake must be refused, or None to let it through."""
        if not origin_allowed(origin, host, self.settings.origins):
            return Refusal(
                http.HTTPStatus.FORBIDDEN,
                "origin not allowed",
                f"origin {origin} not allowed",
                "origin",
            )
        if users >= self.settings.max_users:
            return Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "server full",
                f"{users} users is the cap",
                "full",
            )
        if self.users_by_address[address_key(address)] >= self.settings.max_users_per_ip:
            return Refusal(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too many connections from your address",
                f"{self.settings.max_users_per_ip} users from {address} is the cap",
                "per_address",
            )
        return None

    def user_joined(self, address: str) -> None:
        self.users_by_address[address_key(address)] += 1

    def user_left(self, address: str) -> None:
        key = address_key(address)
        self.users_by_address[key] -= 1
        if not self.users_by_address[key]:
            del self.users_by_address[key]

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


def address_key(ip: str) -> str:
    """What the per-address caps count: an IPv4 address, or an IPv6 address's /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def origin_allowed(origin: str | None, host: str | None, extra: Sequence[str]) -> bool:
    """Allow what a DNS-rebinding page cannot pretend to be.

    Allowed: no Origin (non-browser clients), ``null`` (a page opened from
    disk), the origins given with ``--origin``, and the server's own origin
    (the page was loaded from the ``Host`` the browser connects to) when its
    host is an IP address or ``localhost``. A rebinding page has a domain
    name of the attacker's as its origin and sends it as ``Host`` too: that
    name matches, but only ``--origin`` can vouch for a name.
    """
    if origin is None or origin == "null" or origin in extra:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or host is None or parts.netloc != host:
        return False
    return cannot_be_rebound(parts.hostname or "")


def cannot_be_rebound(hostname: str) -> bool:
    """An IP literal, or a name browsers resolve to loopback without asking DNS."""
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    return valid_ip(hostname)


def fit_to_open_files(settings: Settings) -> Settings:
    """Raise the open-files limit to what the caps need, or lower the caps to fit it.

    Every user and every handshake in progress is an open file, and so is
    every connection the kernel queued for accept: the event loop accepts the
    whole queue at once, so the listen backlog must fit too. Beyond the limit,
    accept() fails and the loop drops or stalls every queued client alike.
    """
    needed = settings.max_users + settings.max_pending + settings.listen_backlog + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft >= needed:
        return settings
    spare = soft - FD_HEADROOM
    backlog = min(settings.listen_backlog, max(16, spare // 8))
    pending = min(settings.max_pending, max(16, spare // 8))
    users = max(1, spare - backlog - pending)
    fitted = dataclasses.replace(
        settings,
        max_users=min(settings.max_users, users),
        max_pending=pending,
        listen_backlog=backlog,
    )
    log.warning(
        "open-files limit %d is below the %d that --max-users %d, --max-pending %d and a "
        "listen backlog of %d need: serving up to %d users, %d pending handshakes, backlog %d "
        "(raise the limit: ulimit -n, or LimitNOFILE in a systemd unit)",
        soft,
        needed,
        settings.max_users,
        settings.max_pending,
        settings.listen_backlog,
        fitted.max_users,
        fitted.max_pending,
        fitted.listen_backlog,
    )
    return fitted


class RateLimit:
    """A connection's rate limit (none at rate 0), and the messages it refused in a row."""

    __slots__ = ("bucket", "patience", "refused_in_a_row")  # one per connection

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.bucket = TokenBucket(rate, burst, now) if rate > 0 else None
        self.patience = burst
        self.refused_in_a_row = 0

    def allows(self, now: float) -> bool:
        """Spend a token for one message; tell whether there was one."""
        if self.bucket is None or self.bucket.take(now):
            self.refused_in_a_row = 0
            return True
        self.refused_in_a_row += 1
        return False

    def exhausted(self) -> bool:
        """Refused more than a whole burst in a row: the sender does not listen."""
        return self.refused_in_a_row > self.patience


class TokenBucket:
    """Per-connection rate limit: ``rate`` messages a second, ``burst`` at once."""

    __slots__ = ("burst", "rate", "tokens", "updated")  # one per connection

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
