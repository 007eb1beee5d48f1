"""The command line: flags into settings, logging, signals, and ``main()``.

``counter-sync --help`` (or ``python server.py --help`` from a checkout)
prints every flag with its default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from counter_sync.app import start
from counter_sync.config import (
    BURST,
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_MESSAGE_SIZE,
    MAX_USERS,
    PING_INTERVAL,
    PING_TIMEOUT,
    RATE,
    REDIS_EXPIRY,
    Settings,
)
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
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on")
    parser.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help="TCP port; 0 picks a free one"
    )
    parser.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="URL",
        help="also accept WebSocket connections from this origin (repeatable); "
        "the server's own origin, pages from disk and non-browser clients are always accepted",
    )
    parser.add_argument(
        "--max-users", type=positive_int, default=MAX_USERS, help="connections beyond this get 503"
    )
    parser.add_argument(
        "--max-message-size",
        type=positive_int,
        default=MAX_MESSAGE_SIZE,
        help="bytes; a larger message closes its connection with 1009",
    )
    parser.add_argument(
        "--rate",
        type=non_negative(float),
        default=RATE,
        help="messages per second per connection; 0 turns the limit off",
    )
    parser.add_argument(
        "--burst", type=positive_int, default=BURST, help="messages a connection may send at once"
    )
    parser.add_argument(
        "--ping-interval",
        type=non_negative(float),
        default=PING_INTERVAL,
        help="seconds between keepalive pings; 0 turns keepalive off",
    )
    parser.add_argument(
        "--ping-timeout",
        type=non_negative(float),
        default=PING_TIMEOUT,
        help="seconds without a pong before a silent peer is dropped",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="share the counter and user count with other instances through Redis "
        "(redis://host:port/db, rediss://, password in the URL)",
    )
    parser.add_argument(
        "--redis-expiry",
        type=non_negative(float),
        default=REDIS_EXPIRY,
        metavar="SECONDS",
        help="with --redis: the users of an instance that died without closing "
        "stop counting on the others within this time",
    )
    parser.add_argument(
        "--state",
        metavar="PATH",
        help="keep the counter in this SQLite file so it survives restarts",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None, *, prog: str = "counter-sync") -> Settings:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.redis is not None and args.state is not None:
        parser.error("--redis and --state cannot be used together")
    if args.redis_expiry == 0:
        parser.error("argument --redis-expiry: 0 is too short; an instance would never count")
    return Settings(
        host=args.host,
        port=args.port,
        origins=tuple(args.origin),
        max_users=args.max_users,
        max_message_size=args.max_message_size,
        rate=args.rate,
        burst=args.burst,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        redis=args.redis,
        redis_expiry=args.redis_expiry,
        state=args.state,
    )


def raise_open_files_limit() -> None:
    """Each client is a file descriptor; the usual soft limit of 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection with 1001."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = await start(settings)
    await stop.wait()
    log.info("shutting down")
    await app.close()


def event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
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
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # The library logs every connection and handshake too; ours says more.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    raise_open_files_limit()
    try:
        event_loop_runner()(run(settings))
    except (OSError, StoreError) as exc:  # e.g. the port is taken
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
