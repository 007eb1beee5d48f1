"""The command line: flags into settings, logging, signals, and ``main()``.

``counter-sync --help`` (or ``python server.py --help`` from a checkout)
prints every flag with its default and the range it takes.

Exit status: 0 after a signal; 2 for a bad flag, with one line naming it,
before anything starts; 1 for what only trying can tell (the port is taken,
the store cannot be opened or fails), with one line too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from websockets.frames import CloseCode

from counter_sync.admission import fit_to_open_files
from counter_sync.api import KeyFileError, load_keys
from counter_sync.app import App, start
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
from counter_sync.logs import setup_logging
from counter_sync.store import StoreError
from counter_sync.tokens import ANONYMOUS, SecretError, load_secret

__all__ = ["CannotListen", "main", "parse_args", "run"]

log = logging.getLogger("counter-sync")


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default, and beside a number's its range: ``(1 or more; default: 40)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action.type, Number):
            return f"{action.help} ({action.type.range}; default: %(default)s)"
        return super()._get_help_string(action)


# One label of a host name: letters, digits, hyphens inside; underscores too,
# which DNS forbids in host names but /etc/hosts and internal zones do not.
HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_host_name(text: str) -> bool:
    """A name that DNS or /etc/hosts could know.

    A last label of digits only makes it a (bad) IPv4 address, as in 999.1.1.1.
    """
    labels = text.removesuffix(".").split(".")
    return (
        len(text) <= 253
        and all(HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def listen_host(text: str) -> str:
    """An argparse type: an IP address or a host name, as ``--host`` takes.

    Only its form is checked here; whether the name resolves and the address
    belongs to this machine, only listening can tell (exit status 1).
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not is_host_name(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an IP address nor a host name "
                "(0.0.0.0 listens on every IPv4 interface, :: on every IPv6 one)"
            ) from None
    return text


def web_origin(text: str) -> str:
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
            scheme not in DEFAULT_PORTS
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
            if not is_host_name(host):
                raise
        else:
            host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    except (ValueError, UnicodeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an origin: give scheme://host[:port] with http or https "
            "and no path, e.g. http://myhost:6789, or null"
        ) from None
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def network(text: str) -> str:
    """An argparse type: an IP address or network, as ``--trusted-proxy`` takes."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or network") from None
    return text


def build_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(
        prog=prog,
        description="Shared counters, kept in sync across every connected browser.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    count = Number(int, 1)  # the caps and the burst: at 0, nobody would get in or be heard
    add(
        "--host",
        type=listen_host,
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
        type=web_origin,
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
        type=network,
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


# --- Running ------------------------------------------------------------------


class CannotListen(Exception):
    """The server cannot listen where ``--host`` and ``--port`` say; the message is one line."""


def cannot_listen(settings: Settings, exc: OSError) -> CannotListen:
    """Say which flag to change, not only the system's ``[Errno ...]``."""
    if isinstance(exc, socket.gaierror):
        return CannotListen(f"--host {settings.host}: cannot look up this name ({exc.strerror})")
    where = f"cannot listen on --host {settings.host} --port {settings.port}"
    if exc.errno is None:
        return CannotListen(f"{where}: {exc}")
    reason = os.strerror(exc.errno).lower()
    if exc.errno == errno.EADDRINUSE:
        reason += "; another process listens there: pick another --port, or 0 for a free one"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason += "; no interface of this machine has that address (0.0.0.0 is every one)"
    elif exc.errno == errno.EACCES and settings.port < 1024:
        reason += "; ports below 1024 need privileges"
    return CannotListen(f"{where}: {reason}")


async def run(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM, then close every connection (drained, or at once).

    Return the exit status.

    A store that cannot tell whether a change was applied, or a bug in a
    background task, stops the server too, even in the middle of a drain:
    with one line, 1011 to every client, and status 1. Raises
    :exc:`CannotListen` or :exc:`~counter_sync.store.StoreError` if it
    cannot start.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        app = await start(settings)
    except OSError as exc:  # the stores turn their own into StoreError: this is the socket's
        raise cannot_listen(settings, exc) from None
    if await unless_failed(app, stop.wait()):
        if settings.drain_seconds <= 0:
            log.info("shutting down")
            await app.close()
            return 0
        log.info("draining: closing every connection with 1012 over %g s", settings.drain_seconds)
        # Still watching: a store that fails mid-drain must not be answered
        # with silence and exit status 0.
        if await unless_failed(app, app.drain(settings.drain_seconds)):
            return 0
    log.critical("stopping: %s", app.hub.failed.result())
    await app.close(CloseCode.INTERNAL_ERROR, "server failed")
    return 1


async def unless_failed(app: App, work: Coroutine[Any, Any, Any]) -> bool:
    """Run ``work`` until it ends (True) or the server fails first (False: it is cancelled)."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, app.hub.failed}, return_when=asyncio.FIRST_COMPLETED)
    if not app.hub.failed.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop when it is installed (the ``fast`` extra), else asyncio's own loop.

    uvloop's transports are written in C: measured with ``python -m bench``,
    they cut the CPU of each delivered message and the memory per connection.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: Sequence[str] | None = None, *, prog: str = "counter-sync") -> int:
    """Run the server until a signal stops it; return the exit status."""
    settings = parse_args(argv, prog=prog)
    # The library logs every connection and handshake too; ours says more.
    setup_logging(settings.log_format, levels={"websockets": logging.WARNING})
    settings = fit_to_open_files(settings)
    try:
        return event_loop_runner()(run(settings))
    except (CannotListen, StoreError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
