"""The flags: what each one takes, the parser, and the settings they make.

``counter-sync --help`` (or ``python server.py --help`` from a checkout)
prints every flag with its default and the range it takes. A bad flag is
refused here, before anything starts: one line naming it, status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import re
from collections.abc import Sequence
from typing import NoReturn
from urllib.parse import urlsplit

from counter_sync.api import KeyFileError, load_keys
from counter_sync.config import (
    BURST,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FORGET_AFTER,
    HANDSHAKE_TIMEOUT,
    HTTP_BURST,
    HTTP_RATE,
    MAX_CONNECTIONS_PER_USER,
    MAX_DRAIN_SECONDS,
    MAX_FLAG_SECONDS,
    MAX_FORGET_AFTER,
    MAX_MESSAGE_SIZE,
    MAX_PENDING,
    MAX_PENDING_PER_IP,
    MAX_ROOMS,
    MAX_SESSIONS,
    MAX_USERS,
    MAX_USERS_PER_IP,
    MIN_FORGET_AFTER,
    MIN_MESSAGE_SIZE,
    MIN_REDIS_EXPIRY,
    MIN_SESSION_TTL,
    NEW_ROOMS_PER_IP,
    PING_INTERVAL,
    PING_TIMEOUT,
    RATE,
    REDIS_EXPIRY,
    SESSION_TTL,
    Settings,
)
from counter_sync.tokens import ANONYMOUS, SecretError, load_secret

__all__ = ["Number", "OneLineParser", "build_parser", "parse_args"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- What each flag takes -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Number:
    """An argparse type: a finite number of ``kind`` within a range that ``--help`` states.

    ``nan`` and ``inf`` parse as floats but are never a setting: ``nan``
    compares false with everything, so it would slip past any bound (a rate
    limit of ``nan`` is no limit at all).
    """

    kind: type[int | float]
    low: float
    high: float = math.inf
    above_low: bool = False  # ``low`` itself is out of range

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except ValueError:
            noun = "whole number" if self.kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number ({self.range})")
        below = value <= self.low if self.above_low else value < self.low
        if below or value > self.high:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({self.range})")
        return value

    @property
    def range(self) -> str:
        """The range in words, for ``--help`` and for the error."""
        low = f"{self.low:g}"
        if self.high == math.inf:
            return f"more than {low}" if self.above_low else f"{low} or more"
        if self.above_low:
            return f"more than {low}, at most {self.high:g}"
        return f"{low} to {self.high:g}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default, and beside a number's its range: ``(1 or more; default: 40)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action.type, Number):
            return f"{action.help} ({action.type.range}; default: %(default)s)"
        return super()._get_help_string(action)


# One label of a host name: letters, digits, hyphens inside; underscores too,
# which DNS forbids in host names but /etc/hosts and internal zones do not.
_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _is_host_name(text: str) -> bool:
    """A name that DNS or /etc/hosts could know.

    A last label of digits only makes it a (bad) IPv4 address, as in 999.1.1.1.
    """
    labels = text.removesuffix(".").split(".")
    return (
        len(text) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _listen_host(text: str) -> str:
    """An argparse type: an IP address or a host name, as ``--host`` takes.

    Only its form is checked here; whether the name resolves and the address
    belongs to this machine, only listening can tell (exit status 1).
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _is_host_name(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an IP address nor a host name "
                "(0.0.0.0 listens on every IPv4 interface, :: on every IPv6 one)"
            ) from None
    return text


def _web_origin(text: str) -> str:
    """An argparse type: an origin, ``scheme://host[:port]``, or ``null``.

    Browsers send the ``Origin`` header in one form (lower case, no default
    port, no path) and the server compares it with these strings exactly, so
    each is brought to that form here: ``HTTP://MyHost:80/`` becomes
    ``http://myhost``. A path, query or user name is refused rather than
    never matching.
    """
    if text == "null":  # the origin of a page opened from disk
        return text
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a port that is not one
        scheme, host = parts.scheme.lower(), parts.hostname
        if (
            scheme not in _DEFAULT_PORTS
            or host is None
            or parts.username is not None
            or parts.path not in ("", "/")
            or "?" in text
            or "#" in text
        ):
            raise ValueError
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            host = host.encode("idna").decode("ascii")  # as browsers send a non-ASCII name
            if not _is_host_name(host):
                raise
        else:
            host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    except (ValueError, UnicodeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an origin: give scheme://host[:port] with http or https "
            "and no path, e.g. http://myhost:6789, or null"
        ) from None
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _network(text: str) -> str:
    """An argparse type: an IP address or network, as ``--trusted-proxy`` takes."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or network") from None
    return text


def build_parser(prog: str) -> OneLineParser:
    """The parser of every flag, with its type, default and help; see :func:`parse_args`."""
    parser = OneLineParser(
        prog=prog,
        description="Shared counters, kept in sync across every connected browser.",
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    count = Number(int, 1)  # the caps and the burst: at 0, nobody would get in or be heard
    add(
        "--host",
        type=_listen_host,
        default=DEFAULT_HOST,
        help="interface to listen on, an IP address or a host name; 0.0.0.0 for every IPv4 "
        "interface (pages opened there by a name then need --origin)",
    )
    add(
        "--port",
        type=Number(int, 0, 65535),
        default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one",
    )
    add(
        "--origin",
        type=_web_origin,
        action="append",
        default=[],
        metavar="URL",
        help="also accept WebSocket connections from pages of this origin, scheme://host[:port] "
        "(repeatable); pages from disk, non-browser clients and pages the server itself "
        "served at an IP address or localhost are always accepted",
    )
    add("--max-users", type=count, default=MAX_USERS, help="connections beyond this get 503")
    add(
        "--max-users-per-ip",
        type=count,
        default=MAX_USERS_PER_IP,
        help="connections from one client address (IPv6: one /64) beyond this get 429",
    )
    add(
        "--max-pending",
        type=count,
        default=MAX_PENDING,
        help="connections whose handshake is not done yet; beyond this, new ones are reset",
    )
    add(
        "--max-pending-per-ip",
        type=count,
        default=MAX_PENDING_PER_IP,
        help="the same, per client address (trusted proxies are exempt)",
    )
    add(
        "--handshake-timeout",
        type=Number(float, 0, MAX_FLAG_SECONDS, above_low=True),
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="seconds; a connection that has not finished its handshake by then is closed",
    )
    add(
        "--trusted-proxy",
        type=_network,
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a reverse proxy (address or network, e.g. 10.0.0.0/8; repeatable) whose "
        "X-Forwarded-For names the client; the header is ignored from anyone else",
    )
    add(
        "--max-rooms",
        type=count,
        default=MAX_ROOMS,
        help="rooms with users at once (in memory mode also counters kept); a new room "
        "beyond this gets 503",
    )
    add(
        "--max-message-size",
        type=Number(int, MIN_MESSAGE_SIZE),
        default=MAX_MESSAGE_SIZE,
        help="bytes; a larger message closes its connection with 1009",
    )
    add(
        "--rate",
        type=Number(float, 0),
        default=RATE,
        help="messages per second per connection; 0 turns the limit off",
    )
    add("--burst", type=count, default=BURST, help="messages a connection may send at once")
    add(
        "--http-rate",
        type=Number(float, 0),
        default=HTTP_RATE,
        help="plain HTTP requests (the page, /healthz, /metrics...) per second per client "
        "address; beyond, 429 with Retry-After (WebSocket handshakes have their own caps); "
        "0 turns the limit off",
    )
    add(
        "--http-burst",
        type=count,
        default=HTTP_BURST,
        help="plain HTTP requests a client address may send at once",
    )
    add(
        "--token-secret-file",
        metavar="PATH",
        help="a file holding the HS256 secret (at least 32 bytes) that signs the tokens "
        "connections may carry (Authorization: Bearer, or ?token=): sub, exp, rooms, can",
    )
    add(
        "--anonymous",
        choices=ANONYMOUS,
        help="what a connection without a token may do: write (the default without "
        "--token-secret-file), read (the default with it: users and state only) or none "
        "(401)",
    )
    add(
        "--max-connections-per-user",
        type=count,
        default=MAX_CONNECTIONS_PER_USER,
        help="connections one token's user may hold on this instance; beyond, 429",
    )
    add(
        "--new-rooms-per-ip",
        type=count,
        default=NEW_ROOMS_PER_IP,
        help="counters nobody is in on this instance one client address may open per minute; "
        "beyond, 429",
    )
    add(
        "--api-key-file",
        metavar="PATH",
        help="a file of API keys, one per line: turns on the HTTP API for backends at "
        "/api/counters (without it, /api/ is 404)",
    )
    keepalive = Number(float, 0, MAX_FLAG_SECONDS)
    add(
        "--ping-interval",
        type=keepalive,
        default=PING_INTERVAL,
        help="seconds between keepalive pings; 0 turns keepalive off",
    )
    add(
        "--ping-timeout",
        type=keepalive,
        default=PING_TIMEOUT,
        help="seconds without a pong before a silent peer is dropped; a peer whose writes "
        "stay stuck for --ping-interval plus this is dropped too",
    )
    add(
        "--redis",
        metavar="URL",
        help="share the counters and user counts with other instances through Redis "
        "(redis://host:port/db, rediss://, password in the URL; needs counter-sync[redis])",
    )
    add(
        "--redis-expiry",
        type=Number(float, MIN_REDIS_EXPIRY, MAX_FLAG_SECONDS),
        default=REDIS_EXPIRY,
        metavar="SECONDS",
        help="with --redis: the users of an instance that died without closing "
        "stop counting on the others within this many seconds",
    )
    add("--state", metavar="PATH", help="keep the counters in this SQLite file across restarts")
    add(
        "--forget-after",
        type=Number(float, MIN_FORGET_AFTER, MAX_FORGET_AFTER),
        default=FORGET_AFTER,
        metavar="SECONDS",
        help="a counter nobody changed or joined for this long is forgotten, in every store "
        "(memory: dropped; --state: its row deleted; --redis: its keys expire)",
    )
    add(
        "--session-ttl",
        type=Number(float, MIN_SESSION_TTL, MAX_FLAG_SECONDS),
        default=SESSION_TTL,
        metavar="SECONDS",
        help="a session's last done action is remembered at least this long after its last "
        "action: a retry within it counts once (exactly-once clicks)",
    )
    add(
        "--max-sessions",
        type=count,
        default=MAX_SESSIONS,
        help="sessions a memory store remembers at most; beyond, the longest idle go first",
    )
    add(
        "--drain-seconds",
        type=Number(float, 0, MAX_DRAIN_SECONDS),
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, refuse new connections and answer /readyz with 503 at once, then "
        "close the open ones with 1012 (service restart) spread over this time; 0 closes "
        "them all at once with 1001",
    )
    add(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line "
        "(time, level, event, peer, room, code, reason)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None, *, prog: str = "counter-sync") -> Settings:
    """The settings the flags ask for; a bad flag exits with status 2 and one line."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.redis is not None and args.state is not None:
        parser.error("--redis and --state cannot be used together")
    # Every flag is a field of Settings under its own name, but for the two
    # repeatable ones, whose lists become tuples under a plural name.
    values = vars(args)
    values["origins"] = tuple(values.pop("origin"))
    values["trusted_proxies"] = tuple(values.pop("trusted_proxy"))
    # Files are read here, so that a bad one is a bad flag: one line, status 2.
    secret_file, key_file = values.pop("token_secret_file"), values.pop("api_key_file")
    try:
        values["token_secret"] = None if secret_file is None else load_secret(secret_file)
        values["api_keys"] = () if key_file is None else tuple(load_keys(key_file))
    except (SecretError, KeyFileError) as exc:
        parser.error(str(exc))
    return Settings(**values)
