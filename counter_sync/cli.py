"""The command line: flags into settings, logging, signals, and ``main()``.

``counter-sync --help`` (or ``python server.py --help`` from a checkout)
prints every flag with its default.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from websockets.frames import CloseCode

from counter_sync.admission import fit_to_open_files
from counter_sync.app import start
from counter_sync.config import (
    BURST,
    DEFAULT_HOST,
    DEFAULT_PORT,
    HANDSHAKE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    MAX_PENDING,
    MAX_PENDING_PER_IP,
    MAX_ROOMS,
    MAX_USERS,
    MAX_USERS_PER_IP,
    PING_INTERVAL,
    PING_TIMEOUT,
    RATE,
    REDIS_EXPIRY,
    Settings,
)
from counter_sync.logs import setup_logging
from counter_sync.store import StoreError

__all__ = ["main", "parse_args", "run"]

log = logging.getLogger("counter-sync")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def non_negative(kind: type[int | float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` that is zero or more."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} must not be negative")
        return value

    return convert


def port_number(text: str) -> int:
    value = non_negative(int)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return int(value)


def positive_float(text: str) -> float:
    value = non_negative(float)(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def positive_int(text: str) -> int:
    value = non_negative(int)(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return int(value)


def build_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(
        prog=prog,
        description="Shared counters, kept in sync across every connected browser.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default=DEFAULT_HOST, help="interface to listen on")
    add("--port", type=port_number, default=DEFAULT_PORT, help="TCP port; 0 picks a free one")
    add(
        "--origin",
        action="append",
        default=[],
        metavar="URL",
        help="also accept WebSocket connections from pages of this origin (repeatable); "
        "pages from disk, non-browser clients and pages the server itself served at an "
        "IP address or localhost are always accepted",
    )
    add("--max-users", type=positive_int, default=MAX_USERS, help="connections beyond this get 503")
    add(
        "--max-users-per-ip",
        type=positive_int,
        default=MAX_USERS_PER_IP,
        help="connections from one client address (IPv6: one /64) beyond this get 429",
    )
    add(
        "--max-pending",
        type=positive_int,
        default=MAX_PENDING,
        help="connections whose handshake is not done yet; beyond this, new ones are reset",
    )
    add(
        "--max-pending-per-ip",
        type=positive_int,
        default=MAX_PENDING_PER_IP,
        help="the same, per client address (trusted proxies are exempt)",
    )
    add(
        "--handshake-timeout",
        type=positive_float,
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="a connection that has not finished its handshake by then is closed",
    )
    add(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a reverse proxy (address or network, e.g. 10.0.0.0/8; repeatable) whose "
        "X-Forwarded-For names the client; the header is ignored from anyone else",
    )
    add(
        "--max-rooms",
        type=positive_int,
        default=MAX_ROOMS,
        help="rooms with users at once (in memory mode also counters kept); a new room "
        "beyond this gets 503",
    )
    add(
        "--max-message-size",
        type=positive_int,
        default=MAX_MESSAGE_SIZE,
        help="bytes; a larger message closes its connection with 1009",
    )
    add(
        "--rate",
        type=non_negative(float),
        default=RATE,
        help="messages per second per connection; 0 turns the limit off",
    )
    add("--burst", type=positive_int, default=BURST, help="messages a connection may send at once")
    add(
        "--ping-interval",
        type=non_negative(float),
        default=PING_INTERVAL,
        help="seconds between keepalive pings; 0 turns keepalive off",
    )
    add(
        "--ping-timeout",
        type=non_negative(float),
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
        type=non_negative(float),
        default=REDIS_EXPIRY,
        metavar="SECONDS",
        help="with --redis: the users of an instance that died without closing "
        "stop counting on the others within this time",
    )
    add("--state", metavar="PATH", help="keep the counters in this SQLite file across restarts")
    add(
        "--drain-seconds",
        type=non_negative(float),
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
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.redis is not None and args.state is not None:
        parser.error("--redis and --state cannot be used together")
    if args.redis_expiry == 0:
        parser.error("argument --redis-expiry: 0 is too short; an instance would never count")
    for proxy in args.trusted_proxy:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            parser.error(f"argument --trusted-proxy: {proxy!r} is not an address or network")
    # Every flag is a field of Settings under its own name, but for the two
    # repeatable ones, whose lists become tuples under a plural name.
    values = vars(args)
    values["origins"] = tuple(values.pop("origin"))
    values["trusted_proxies"] = tuple(values.pop("trusted_proxy"))
    return Settings(**values)


async def run(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM, then close every connection (drained, or at once).

    Return the exit status.

    A store that cannot tell whether a change was applied stops the server
    too: with one line, 1011 to every client, and status 1.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = await start(settings)
    stopping = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[Any]] = {stopping, app.hub.failed}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if app.hub.failed.done():
        log.critical(
            "stopping: the store cannot tell whether a change was applied (%s); "
            "restart the server so that every client sees what was kept",
            app.hub.failed.result(),
        )
        await app.close(CloseCode.INTERNAL_ERROR, "store failed")
        return 1
    if settings.drain_seconds > 0:
        log.info("draining: closing every connection with 1012 over %g s", settings.drain_seconds)
        await app.drain(settings.drain_seconds)
    else:
        log.info("shutting down")
        await app.close()
    return 0


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
    except (OSError, StoreError) as exc:  # e.g. the port is taken
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
