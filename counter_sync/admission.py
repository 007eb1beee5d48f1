"""Admission: who may open a WebSocket, how many at once, and how fast they may act.

Two gates, both before the hub spends anything on a client:

* At accept, before a byte is read: a cap on handshakes in progress, overall
  and per client address (:meth:`Gate.admit_handshake`). A peer that opens
  sockets and sends nothing holds at most ``max_pending_per_ip`` of them; at
  the overall cap, the socket silent longest makes room for the newcomer, so
  silent sockets from many addresses cannot lock everyone out.
* At the handshake, once the request is read: the origin, the caps on users
  overall and per address (:meth:`Gate.refuse`). The hub adds its own
  reasons (rooms, draining) on top.

Plain HTTP requests (the page, ``/healthz``...) have a rate per client
address of their own (:class:`RequestRate`); an address told 429 that
knocks again before its next token is reset at accept (:meth:`Gate.shut_out`).

Client addresses are per IPv4 address and per IPv6 /64 (one host gets a /64).
Behind a reverse proxy every client has the proxy's address: the proxies
named in ``trusted_proxies`` are believed about ``X-Forwarded-For``, nobody
else is.
"""

from __future__ import annotations

import dataclasses
import functools
import http
import ipaddress
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

from counter_sync.config import (
    HANDSHAKE_TIMEOUT_UNDER_PRESSURE,
    MAX_LOG_KEYS,
    MAX_RATED_ADDRESSES,
    PENDING_PRESSURE,
    Settings,
)
from counter_sync.deadlines import Deadlines

__all__ = [
    "Evictable",
    "Gate",
    "MalformedRequest",
    "RateLimit",
    "Refusal",
    "RequestRate",
    "TokenBucket",
    "UserLimits",
    "address_key",
    "origin_allowed",
    "split_origin",
]

log = logging.getLogger("counter_sync.admission")


class MalformedRequest(ValueError):
    """A request that cannot be read one way: a single-valued header repeated, a value that
    does not parse. Its message is the reason, one line, for the 400 it gets."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: the HTTP status, the reason in words, details for the log."""

    status: http.HTTPStatus
    reason: str
    detail: str
    kind: str  # a short name, the same for every refusal of its sort (for metrics)


class Evictable(Protocol):
    """A connection whose handshake is in progress: the gate may reset it to make room."""

    def evict(self) -> None:
        """Reset the connection now; the gate has already counted it out."""

    def expire(self) -> None:
        """Reset the connection, whose handshake's deadline passed, and end its handshake."""


class Gate:
    """Counts handshakes in progress and users per client address, and says who may pass."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.trusted = tuple(
            ipaddress.ip_network(proxy, strict=False) for proxy in settings.trusted_proxies
        )
        # Every handshake in progress, with the address key it counts under.
        self.pending: dict[Evictable, str] = {}
        # Those not heard from yet, oldest first: the next to go at the cap is
        # the first, found without a scan (an OrderedDict pops either end in O(1)).
        self.silent: OrderedDict[Evictable, None] = OrderedDict()
        self.handshakes_by_address: Counter[str] = Counter()
        # Each handshake's deadline: one timer for them all, not one each.
        self.deadlines: Deadlines[Evictable] = Deadlines(self._expired)
        self.users_by_address: Counter[str] = Counter()
        self.requests = RequestRate(settings.http_rate, settings.http_burst)
        # Rooms nobody is in here, opened per address: a budget a minute.
        self.new_rooms = RequestRate(settings.new_rooms_per_ip / 60, settings.new_rooms_per_ip)
        self.users = UserLimits(settings)

    @property
    def handshakes(self) -> int:
        """Handshakes in progress: accepted connections whose handshake is not over."""
        return len(self.pending)

    # Before the handshake: the socket's own address.

    def admit_handshake(self, connection: Evictable, peer_ip: str) -> bool:
        """Count ``connection``, just accepted from ``peer_ip``, among the handshakes in progress.

        False: it must be reset, as one too many from its address. At the
        overall cap the connection silent longest (accepted, not a byte
        received) is evicted to make room, and counted out before this
        returns; with none silent, False too. Silent sockets from many
        addresses then cycle among themselves while clients that talk get in.
        """
        key = address_key(peer_ip)
        # A trusted proxy brings everyone's handshakes: only the overall cap applies.
        if not self.is_trusted(peer_ip) and (
            self.handshakes_by_address[key] >= self.settings.max_pending_per_ip
        ):
            return False
        if self.handshakes >= self.settings.max_pending:
            if not self.silent:
                return False
            oldest = next(iter(self.silent))
            self.end_handshake(oldest)
            oldest.evict()
        self.pending[connection] = key
        self.silent[connection] = None
        self.handshakes_by_address[key] += 1
        self.deadlines.set(connection, self.handshake_timeout())
        return True

    def _expired(self, connection: Evictable) -> None:
        """A handshake's deadline passed: count it out, and reset it."""
        self.end_handshake(connection)
        connection.expire()

    def shut_out(self, peer_ip: str, now: float) -> bool:
        """Whether a connection from ``peer_ip`` is to be reset as soon as it is accepted.

        So it is while the address, told 429, knocks again before it has a
        token: a flood of plain requests then costs an accept and a reset
        each, not a request read and answered. Never a trusted proxy's: it
        brings everyone's requests.
        """
        return self.requests.knocks_too_soon(peer_ip, now) and not self.is_trusted(peer_ip)

    def heard_from(self, connection: Evictable) -> None:
        """``connection`` sent bytes of its request: it is no longer evicted to make room."""
        self.silent.pop(connection, None)

    def end_handshake(self, connection: Evictable) -> None:
        """Count ``connection`` out of the handshakes in progress. Idempotent."""
        key = self.pending.pop(connection, None)
        if key is None:
            return
        self.silent.pop(connection, None)
        self.deadlines.discard(connection)
        self.handshakes_by_address[key] -= 1
        if not self.handshakes_by_address[key]:
            del self.handshakes_by_address[key]

    def handshake_timeout(self) -> float:
        """Seconds a handshake starting now gets: less once the pending ones crowd the cap."""
        if self.handshakes > PENDING_PRESSURE * self.settings.max_pending:
            return min(self.settings.handshake_timeout, HANDSHAKE_TIMEOUT_UNDER_PRESSURE)
        return self.settings.handshake_timeout

    # At the handshake: the request is read, so the client's address is known.

    def client_address(self, peer_ip: str, forwarded_for: str | None) -> str:
        """The client's address: the peer's, or what a trusted proxy says it forwarded.

        Raises :exc:`MalformedRequest` when a hop our own proxies appended is
        no address: falling back to the proxy's address would charge the
        request to every client behind it.
        """
        if forwarded_for is None or not self.is_trusted(peer_ip):
            return peer_ip
        # Each proxy appends the address it got the request from: read from
        # the right, skipping our own proxies; the first other one is the
        # client. What lies left of it, the client wrote: never read.
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if not _valid_ip(hop):
                raise MalformedRequest("garbled X-Forwarded-For header")
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
        return self.over_a_cap(address=address, users=users)

    def over_a_cap(self, *, address: str, users: int) -> Refusal | None:
        """Which cap on users (overall, from ``address``) one more would pass, or None."""
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
        """Count one more user from ``address`` (see :meth:`over_a_cap`)."""
        self.users_by_address[address_key(address)] += 1

    def user_left(self, address: str) -> None:
        """Count out a user :meth:`user_joined` counted from ``address``."""
        key = address_key(address)
        self.users_by_address[key] -= 1
        if not self.users_by_address[key]:
            del self.users_by_address[key]

    def is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` is a trusted proxy's, believed about ``X-Forwarded-For``."""
        return bool(self.trusted) and _trusted(ip, self.trusted)


@functools.lru_cache(maxsize=MAX_LOG_KEYS)
def address_key(ip: str) -> str:
    """What the per-address caps count: an IPv4 address, or an IPv6 address's /64.

    Cached: every handshake asks it several times, and parsing an address
    costs more than the rest of the look-up.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@functools.lru_cache(maxsize=MAX_LOG_KEYS)
def _trusted(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether ``ip`` is in one of ``networks`` (cached, as address_key is)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _valid_ip(text: str) -> bool:
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
    name matches, but only ``--origin`` can vouch for a name. Raises
    :exc:`MalformedRequest` for an Origin that does not parse.
    """
    if origin is None or origin == "null" or origin in extra:
        return True
    parts = split_origin(origin)
    if parts.scheme not in ("http", "https") or host is None or parts.netloc != host:
        return False
    return _cannot_be_rebound(parts.hostname or "")


def split_origin(origin: str) -> SplitResult:
    """``origin`` as a URL's parts; :exc:`MalformedRequest` if it is none (``http://[``)."""
    try:
        return urlsplit(origin)
    except ValueError:
        raise MalformedRequest("malformed Origin header") from None


def _cannot_be_rebound(hostname: str) -> bool:
    """An IP literal, or a name browsers resolve to loopback without asking DNS."""
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    return _valid_ip(hostname)


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

    def ready(self, now: float) -> bool:
        """Whether there is a token now; nothing is spent."""
        return self.tokens + max(0.0, now - self.updated) * self.rate >= 1

    def take(self, now: float) -> bool:
        """Spend one token if there is one; refill for the time since last call."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class UserLimits:
    """Per token user on this instance: the connections held, and one rate limit for them all.

    A user's actions share one token bucket however many connections carry
    them, so opening more connections buys no more clicks. Connections
    without a token have a rate limit each (their address has its own caps).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.held: dict[str, tuple[RateLimit, int]] = {}  # user -> (its limit, connections)

    def full(self, user: str) -> bool:
        """Whether ``user`` holds as many connections as it may."""
        held = self.held.get(user)
        return held is not None and held[1] >= self.settings.max_connections_per_user

    def join(self, user: str | None, now: float) -> RateLimit:
        """Count one more connection of ``user``; return the rate limit it acts under."""
        settings = self.settings
        if user is None:
            return RateLimit(settings.rate, settings.burst, now)
        limit, count = self.held.get(user) or (RateLimit(settings.rate, settings.burst, now), 0)
        self.held[user] = (limit, count + 1)
        return limit

    def leave(self, user: str | None) -> None:
        """Count one connection of ``user`` out. Idempotent for the user's last one."""
        if user is None or (held := self.held.get(user)) is None:
            return
        limit, count = held
        if count <= 1:
            del self.held[user]
        else:
            self.held[user] = (limit, count - 1)


class RequestRate:
    """Plain HTTP requests per client address: a rate limit each, in a bounded table.

    The table keeps the ``MAX_RATED_ADDRESSES`` addresses heard from last:
    an attacker with more addresses than that pushes out the longest quiet
    ones, whose buckets have refilled the most anyway, so forgetting them
    costs at most one burst each. A rate of 0 turns the limit off.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.limits: OrderedDict[str, RateLimit] = OrderedDict()

    def retry_after(self, address: str, now: float) -> int | None:
        """Spend a token for one request from ``address``: None if there was one, else the
        whole seconds until there is (the ``Retry-After`` to send)."""
        if self.rate <= 0:
            return None
        key = address_key(address)
        limit = self.limits.get(key)
        if limit is None:
            if len(self.limits) >= MAX_RATED_ADDRESSES:
                self.limits.popitem(last=False)
            limit = self.limits[key] = RateLimit(self.rate, self.burst, now)
        else:
            self.limits.move_to_end(key)
        if limit.allows(now) or limit.bucket is None:
            return None
        return max(1, math.ceil((1 - limit.bucket.tokens) / self.rate))

    def would_allow(self, address: str, now: float) -> bool:
        """Whether ``address`` has a token now, without spending it (for the page's probe)."""
        limit = self.limits.get(address_key(address))
        return limit is None or limit.bucket is None or limit.bucket.ready(now)

    def knocks_too_soon(self, address: str, now: float) -> bool:
        """Whether ``address``, refused its last request, comes back before its next token."""
        limit = self.limits.get(address_key(address))
        return (
            limit is not None
            and limit.refused_in_a_row > 0
            and limit.bucket is not None
            and not limit.bucket.ready(now)
        )
