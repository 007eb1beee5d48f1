#!/usr/bin/env python3
"""counter-sync: one shared counter, kept in sync across every connected browser.

Run ``python server.py`` and open http://localhost:6789/ in two windows.

How the server knows that a client disconnected, in the three ways it can:

* The client closes cleanly (it sends a close frame, the browser tab closes):
  the ``async for`` loop over the connection simply ends. It never raises
  ``ConnectionClosedOK``.
* The TCP connection is lost (the process is killed, the cable pulled and the
  kernel says so): ``async for`` raises ``ConnectionClosedError``, code 1006.
* The peer goes silent (half-open TCP: the laptop slept, the network dropped
  without a reset): nothing arrives at all, so only the keepalive ping finds
  it. No pong within ``ping_timeout`` -> the library fails the connection with
  1011 and ``async for`` raises ``ConnectionClosedError``.

Whichever way it ends, the ``finally`` block in :meth:`Hub.handler` unregisters
the user and everyone left gets the new user count.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http
import json
import logging
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

__all__ = [
    "App",
    "BadMessage",
    "Hub",
    "MemoryStore",
    "Settings",
    "SharedStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenBucket",
    "main",
    "parse_action",
    "parse_args",
    "start",
    "state_event",
    "users_event",
]

log = logging.getLogger("counter-sync")

# --- Limits and defaults (each one is a flag or documented in README) ---------

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 6789  # the classic example's port, so its page works unchanged
MAX_MESSAGE_SIZE = 4 * 1024  # bytes; a valid action is ~20 bytes
MAX_USERS = 10_000
RATE = 20.0  # actions per second per connection; no human clicks faster
BURST = 40  # actions a connection may send at once before RATE applies
PING_INTERVAL = 20.0  # seconds between keepalive pings
PING_TIMEOUT = 20.0  # seconds to wait for the pong before dropping the peer
CLOSE_TIMEOUT = 1.0  # seconds to wait for the peer's close frame
# Bytes queued in user space for one connection before broadcasts skip it. It
# is also the library's write_limit, so send() waits for exactly this drain.
WRITE_BUFFER_LIMIT = 16 * 1024
# Kernel send buffer per connection. Without a cap Linux autotunes it to
# hundreds of KiB, where a stalled reader would hoard thousands of stale
# updates that the user-space limit above cannot see.
SOCKET_SEND_BUFFER = 16 * 1024
# Under load, the pause after a broadcast is this many times its CPU time, so
# broadcasting takes at most a third of the time and the rest goes to reading
# clients and handshakes. Measured with the bench (join storm, N=1000): no
# pause 5-7 s, 1x 1.1-1.2 s, 2x 0.92-0.95 s, 3x 0.89-0.97 s but slower bursts.
FLUSH_PAUSE_RATIO = 2
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# Flush pacing skips shorter waits: the event loop's timer resolution is a
# millisecond, so a 20 µs sleep would cost a whole one.
MIN_PACING_DELAY = 0.001
# With --redis: seconds after which the users of an instance that died without
# closing stop counting on the others (a live one refreshes well inside it).
REDIS_EXPIRY = 15.0
PAGE_PATH = Path(__file__).with_name("client.html")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the command line can change, with the documented defaults."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    origins: tuple[str, ...] = ()
    max_users: int = MAX_USERS
    max_message_size: int = MAX_MESSAGE_SIZE
    rate: float = RATE
    burst: int = BURST
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    redis: str | None = None  # URL: share the counter with other instances
    redis_expiry: float = REDIS_EXPIRY
    state: str | None = None  # SQLite file: keep the counter across restarts


# --- The store: where the counter lives ---------------------------------------


class StoreUnavailable(Exception):
    """The store could not apply a change; nothing of it was counted."""


class StoreError(Exception):
    """The store cannot be opened at start-up; the text is one line for the operator."""


class Store(Protocol):
    """Where the counter is kept. The hub calls it once per flush, never per action.

    The in-memory store below is the default and the model; durable or shared
    stores implement the same four calls.
    """

    async def load(self) -> int:
        """Return the counter's current value (called once, at start-up)."""

    async def add(self, delta: int) -> int:
        """Apply the net change of one flush atomically; return the new value.

        Raise :exc:`StoreUnavailable` if the change was not applied.
        """

    def healthy(self) -> bool:
        """Tell whether changes can be applied right now (for ``/healthz``)."""

    async def close(self) -> None:
        """Release the store; pending changes were already applied by ``add``."""


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store that other instances change too (``--redis``).

    It reports what they did through :meth:`Hub.observe`. Its ``add`` returns
    the newest value it knows, and it never observes a value while ``add``
    runs: so an observed value is never older than one the hub committed.
    """

    def watch(self, hub: Hub) -> None:
        """Report the other instances' changes to ``hub`` from now on."""

    def share_users(self, here: int) -> None:
        """Count the ``here`` users of this instance on every instance."""


class MemoryStore:
    """The default store: the value lives in this process and dies with it."""

    def __init__(self) -> None:
        self.value = 0

    async def load(self) -> int:
        return self.value

    async def add(self, delta: int) -> int:
        self.value += delta
        return self.value

    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


# --- Event builders: the server -> client half of the protocol ----------------


def users_event(count: int) -> str:
    """Tell clients how many connections are open."""
    return json.dumps({"type": "users", "count": count})


def state_event(value: int) -> str:
    """Tell clients the counter's absolute value, so only the latest one matters."""
    return json.dumps({"type": "state", "value": value})


def text_frame(message: str) -> bytes:
    """Serialize a text frame once, to write the same bytes to every connection.

    These are the bytes ``protocol.send_text()`` produces for each connection
    inside ``broadcast()``: server frames are not masked and compression is
    off, so nothing differs between connections (``tests/test_server.py``
    checks it). Building the frame once saves its per-connection cost.
    """
    return Frame(Opcode.TEXT, message.encode()).serialize(mask=False)


def error_event(reason: str) -> str:
    """Tell one client why its message was rejected."""
    return json.dumps({"type": "error", "error": reason})


# --- Message parsing: the client -> server half, pure and socket-free ---------

ACTIONS = {"plus": +1, "minus": -1}


class BadMessage(ValueError):
    """A client message that is not a valid action; the text is the reply."""


def parse_action(message: str | bytes) -> int:
    """Turn one client message into the change it asks for (+1 or -1).

    Raises :exc:`BadMessage` with a short reason for anything else, so the
    caller can reply and carry on instead of letting the handler crash.
    """
    if not isinstance(message, str):
        raise BadMessage("binary frames are not supported; send JSON text")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        # RecursionError: deeply nested arrays fit in a few KiB.
        raise BadMessage("message is not valid JSON") from None
    if not isinstance(event, dict):
        raise BadMessage("message must be a JSON object")
    if "action" not in event:
        raise BadMessage('missing "action"')
    action = event["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        raise BadMessage('unknown action; use "plus" or "minus"')
    return ACTIONS[action]


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


# --- The hub: users, value, and the one coalesced flush -----------------------


class Hub:
    """The shared state of one server: who is connected and the counter.

    Actions and joins only mark the state dirty; one flush task, scheduled on
    the event loop, commits the net change to the store and broadcasts the
    latest value once. A burst of K actions or J joins costs one broadcast.
    """

    def __init__(self, settings: Settings, store: Store, value: int) -> None:
        self.settings = settings
        self.store = store
        self.users: set[ServerConnection] = set()
        self.value = value
        # Accepted actions not yet committed, and who sent them (for errors).
        self.pending = 0
        self.senders: dict[ServerConnection, int] = {}
        self.newcomers: list[ServerConnection] = []
        self.users_dirty = False
        self.state_dirty = False
        self.flush_task: asyncio.Task[None] | None = None
        # Adaptive pacing: after a broadcast, the next flush waits twice as
        # long as it took (FLUSH_PAUSE_RATIO); at low load that is microseconds.
        self.next_flush_at = 0.0
        # Connections skipped for a full buffer, each with a catch-up task.
        self.lagging: set[ServerConnection] = set()
        self.background: set[asyncio.Task[None]] = set()
        # Shared mode (--redis): what the other instances did, as the store
        # reports it through observe().
        self.shared = store if isinstance(store, SharedStore) else None
        self.observed: int | None = None  # the newest value one of them committed
        self.elsewhere = 0  # users connected to them
        if self.shared is not None:
            self.shared.watch(self)

    # Changes: each marks what is dirty and makes sure a flush will run.

    def register(self, websocket: ServerConnection) -> None:
        self.users.add(websocket)
        self.newcomers.append(websocket)
        self.users_dirty = True
        self.schedule_flush()

    def unregister(self, websocket: ServerConnection) -> None:
        self.users.discard(websocket)
        self.users_dirty = True
        self.schedule_flush()

    def act(self, websocket: ServerConnection, delta: int) -> None:
        """Count one accepted action; it is committed by the next flush."""
        self.pending += delta
        self.senders[websocket] = self.senders.get(websocket, 0) + 1
        self.schedule_flush()

    def observe(self, *, value: int | None = None, elsewhere: int | None = None) -> None:
        """Learn what other instances changed (a shared store calls this).

        An observed value waits for the next commit(), like every value.
        """
        if value is not None:
            self.observed = value
            self.state_dirty = True
        if elsewhere is not None:
            self.elsewhere = elsewhere
            self.users_dirty = True
        self.schedule_flush()

    def schedule_flush(self) -> None:
        # Creating the task defers the flush to the next loop turn, after every
        # message already read in this one: that is the whole coalescing.
        if self.flush_task is None:
            self.flush_task = asyncio.create_task(self.flush())

    def has_work(self) -> bool:
        return bool(self.senders or self.users_dirty or self.state_dirty)

    async def flush(self) -> None:
        """Commit and broadcast until nothing is dirty, pacing under load."""
        loop = asyncio.get_running_loop()
        try:
            while self.has_work():
                delay = self.next_flush_at - loop.time()
                if delay > MIN_PACING_DELAY:
                    await asyncio.sleep(delay)
                newcomers, self.newcomers = self.newcomers, []
                users_changed, self.users_dirty = self.users_dirty, False
                if users_changed and self.shared is not None:
                    self.shared.share_users(len(self.users))
                state_changed = await self.commit()
                # CPU time, not wall time: a broadcast preempted by another
                # process must not stretch the pause. And only the broadcast
                # counts: a store's commit waits off the loop.
                started = time.thread_time()
                self.publish(users_changed, state_changed, newcomers)
                busy = time.thread_time() - started
                self.next_flush_at = loop.time() + FLUSH_PAUSE_RATIO * busy
        finally:
            self.flush_task = None

    async def commit(self) -> bool:
        """The one place where the value changes. Tell whether it did."""
        delta, self.pending = self.pending, 0
        senders, self.senders = self.senders, {}
        changed, self.state_dirty = self.state_dirty, False
        # Shared mode: another instance's value, unless add() returns a newer one.
        value = self.value if self.observed is None else self.observed
        self.observed = None
        if senders:
            healthy = self.store.healthy()
            try:
                value = await self.store.add(delta)
            except Exception as exc:
                # Not applied, so not counted: tell every sender instead of
                # dropping their actions silently.
                if not isinstance(exc, StoreUnavailable):
                    log.exception("store failed")
                if healthy:  # one warning per outage, not one per flush
                    log.warning(
                        "store unavailable, actions from %d users rejected: %s", len(senders), exc
                    )
                for websocket, count in senders.items():
                    reason = f"store unavailable: {count} action(s) not applied"
                    broadcast([websocket], error_event(reason))
        changed = changed or value != self.value
        self.value = value
        return changed

    def count_users(self) -> int:
        """Users here, plus in shared mode those of the other live instances."""
        return len(self.users) + self.elsewhere

    def publish(
        self, users_changed: bool, state_changed: bool, newcomers: list[ServerConnection]
    ) -> None:
        """Broadcast what changed; newcomers get users, then state, in this flush."""
        if users_changed:
            self.fan_out(users_event(self.count_users()), self.users)
        if state_changed:
            self.fan_out(state_event(self.value), self.users)
        else:
            joined = [websocket for websocket in newcomers if websocket in self.users]
            self.fan_out(state_event(self.value), joined)

    def fan_out(self, message: str, websockets: Iterable[ServerConnection]) -> None:
        """Send to every connection that keeps up; the others catch up when drained.

        ``broadcast()`` has no backpressure: a stalled reader's buffer would
        grow by one message per update forever. Skipping it keeps its memory
        bounded, and since state messages are absolute, it loses nothing.
        """
        frame = text_frame(message)
        for websocket in websockets:
            # Like broadcast(): only open connections, and one failure never
            # stops the others.
            if websocket in self.lagging or websocket.protocol.state is not State.OPEN:
                continue
            transport = websocket.transport
            if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                self.start_catch_up(websocket)
                continue
            try:
                transport.write(frame)
            except Exception as exc:
                log.warning("%s skipped: %s", format_peer(websocket), exc)

    def start_catch_up(self, websocket: ServerConnection) -> None:
        self.lagging.add(websocket)
        task = asyncio.create_task(self.catch_up(websocket))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def catch_up(self, websocket: ServerConnection) -> None:
        """Once the buffer drains, send the latest users and state (latest wins)."""
        sent_users: int | None = None
        sent_value: int | None = None
        try:
            # send() returns once the buffer is below the low-water mark; by
            # then newer values may exist, so loop until the client has them.
            while (self.count_users(), self.value) != (sent_users, sent_value):
                if self.count_users() != sent_users:
                    sent_users = self.count_users()
                    await websocket.send(users_event(sent_users))
                else:
                    sent_value = self.value
                    await websocket.send(state_event(sent_value))
        except ConnectionClosed:
            pass  # the handler logs and unregisters it
        finally:
            self.lagging.discard(websocket)

    # The connection handler: one per client, from connect to disconnect.

    async def handler(self, websocket: ServerConnection) -> None:
        """Serve one client; whatever ends the connection, unregister it."""
        peer = format_peer(websocket)
        if len(self.users) >= self.settings.max_users:
            # process_request answers 503 first; this closes the few that
            # passed it together during a storm of concurrent handshakes.
            await websocket.close(CloseCode.TRY_AGAIN_LATER, "server full")
            return
        cap_send_buffer(websocket)
        self.register(websocket)
        log.info("%s connected (%d here)", peer, len(self.users))
        try:
            await self.receive(websocket, peer)
        except ConnectionClosedError as exc:
            # The TCP connection was lost (1006) or the library failed it:
            # keepalive timeout (1011), oversized message (1009).
            log.info("%s lost: code %d, %s", peer, close_code(exc), exc)
        else:
            # A close handshake (1000 or 1001) ends `async for` without raising.
            log.info(
                "%s disconnected: code %s, reason %r",
                peer,
                websocket.close_code,
                websocket.close_reason,
            )
        finally:
            # Runs however the connection ends, even on a bug in receive().
            self.unregister(websocket)

    async def receive(self, websocket: ServerConnection, peer: str) -> None:
        """Read messages until the connection ends; reject bad ones, count good ones."""
        loop = asyncio.get_running_loop()
        bucket = None
        if self.settings.rate > 0:
            bucket = TokenBucket(self.settings.rate, self.settings.burst, loop.time())
        limited = False
        async for message in websocket:
            if bucket is not None and not bucket.take(loop.time()):
                if not limited:  # one log line per episode, not per message
                    log.warning("%s is over the rate limit", peer)
                limited = True
                await websocket.send(error_event("rate limit exceeded; action not counted"))
                continue
            limited = False
            try:
                delta = parse_action(message)
            except BadMessage as exc:
                log.warning("%s sent a bad message: %s", peer, exc)
                await websocket.send(error_event(str(exc)))
                continue
            self.act(websocket, delta)

    # The HTTP side: the page, the health check, and the gate for upgrades.

    def process_request(self, websocket: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP requests; let allowed WebSocket upgrades on ``/`` through."""
        path = urlsplit(request.path).path
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if path == "/" and upgrade:
            return self.check_upgrade(websocket, request)
        if path == "/":
            return html_response(websocket, PAGE_PATH.read_text(encoding="utf-8"))
        if path == "/healthz":
            return self.health(websocket)
        return websocket.respond(http.HTTPStatus.NOT_FOUND, "Not found\n")

    def check_upgrade(self, websocket: ServerConnection, request: Request) -> Response | None:
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.headers.get("Host"), self.settings.origins):
            log.warning("%s rejected: origin %s not allowed", format_peer(websocket), origin)
            return websocket.respond(http.HTTPStatus.FORBIDDEN, "Origin not allowed\n")
        if len(self.users) >= self.settings.max_users:
            log.warning("%s rejected: %d users is the cap", format_peer(websocket), len(self.users))
            return websocket.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "Server full\n")
        return None

    def health(self, websocket: ServerConnection) -> Response:
        healthy = self.store.healthy()
        body = {
            "status": "ok" if healthy else "store unavailable",
            "users": len(self.users),
            "value": self.value,
        }
        status = http.HTTPStatus.OK if healthy else http.HTTPStatus.SERVICE_UNAVAILABLE
        response = websocket.respond(status, json.dumps(body) + "\n")
        set_content_type(response.headers, "application/json")
        return response


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


def html_response(websocket: ServerConnection, page: str) -> Response:
    response = websocket.respond(http.HTTPStatus.OK, page)
    set_content_type(response.headers, "text/html; charset=utf-8")
    return response


def set_content_type(headers: Headers, value: str) -> None:
    # Headers is a multi-dict: assigning would add a second Content-Type.
    del headers["Content-Type"]
    headers["Content-Type"] = value


def format_peer(websocket: ServerConnection) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown peer"


def close_code(exc: ConnectionClosed) -> int:
    """The code that explains the close: the peer's, else ours, else 1006."""
    if exc.rcvd is not None:
        return exc.rcvd.code
    if exc.sent is not None:
        return exc.sent.code
    return CloseCode.ABNORMAL_CLOSURE


def cap_send_buffer(websocket: ServerConnection) -> None:
    sock = websocket.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)


# --- Running the server -------------------------------------------------------


@dataclasses.dataclass
class App:
    """A running server: its hub, the library's server, and the bound port."""

    hub: Hub
    server: Server

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001, release the store."""
        self.server.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self.server.wait_closed()
        except TimeoutError:
            # close() waits for the close frame to drain, and a stalled
            # reader never drains: without this, shutdown would wait for the
            # keepalive timeout.
            for websocket in self.server.connections | self.hub.users:
                websocket.transport.abort()
            await self.server.wait_closed()
        if self.hub.flush_task is not None:
            await self.hub.flush_task
        await self.hub.store.close()


def open_store(settings: Settings) -> Store:
    """Pick the store the flags ask for; import Redis or SQLite support only then."""
    if settings.redis is not None:
        from redis_store import RedisStore

        return RedisStore(settings.redis, expiry=settings.redis_expiry)
    if settings.state is not None:
        from sqlite_store import SqliteStore

        return SqliteStore(settings.state)
    return MemoryStore()


async def start(settings: Settings) -> App:
    """Start a server (port 0 picks a free port) and return it running."""
    store = open_store(settings)
    hub = Hub(settings, store, await store.load())
    server = await serve(
        hub.handler,
        settings.host,
        settings.port,
        process_request=hub.process_request,
        # Messages are ~30 bytes: compression saves nothing and would cost
        # ~64 KiB of zlib state per connection.
        compression=None,
        max_size=settings.max_message_size,
        ping_interval=settings.ping_interval or None,
        ping_timeout=settings.ping_timeout or None,
        close_timeout=CLOSE_TIMEOUT,
        write_limit=WRITE_BUFFER_LIMIT,
        # asyncio's default of 100 pending connections drops SYNs when many
        # clients reconnect at once (after a restart), costing each a 1 s retry.
        backlog=LISTEN_BACKLOG,
    )
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        log.info("listening on ws://%s:%d/ (page at http://%s:%d/)", host, port, host, port)
    return App(hub, server)


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


# --- The command line ---------------------------------------------------------


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


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = OneLineParser(
        prog="server.py",
        description="One shared counter, kept in sync across every connected browser.",
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


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # The library logs every connection and handshake too; ours says more.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    raise_open_files_limit()
    try:
        event_loop_runner()(run(settings))
    except (OSError, StoreError) as exc:  # e.g. the port is taken
        print(f"server.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Store modules do `from server import StoreError`: let that be this module,
    # not a second copy whose exceptions main() would not catch.
    sys.modules.setdefault("server", sys.modules[__name__])
    sys.exit(main())
