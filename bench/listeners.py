"""Inside a load generator process: listeners, the driver, and the commands they answer.

Each process is a picows client on a uvloop loop (picows parses frames in C;
one connection costs a few KiB) that answers one command at a time from the
main process (:mod:`bench.loadgen`). A listener only records *when* it first
saw a target (a users count, a value at or above a threshold): servers that
coalesce broadcasts skip intermediate values, so counting messages would
measure nothing useful. Times are ``time.monotonic()``, one clock for every
process on the machine, so a driver's send and a listener's receive subtract.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.proc import raise_fd_limit
from testkit.rawclient import IP_BIND_ADDRESS_NO_PORT

try:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
except ImportError:  # pragma: no cover - reported by LoadGen.start()
    WSListener = object  # type: ignore[misc,assignment]

__all__ = [
    "PLUS",
    "Group",
    "IdleListener",
    "Listener",
    "Reply",
    "Worker",
    "seen_after",
    "summarize_errors",
    "worker_main",
]

PLUS = b'{"action": "plus"}'

Reply = dict[str, Any]


class Group:
    """The listeners of one worker, and what the main process waits for."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.target_users: int | None = None
        self.target_value: int | None = None
        self.users_reached = 0
        self.value_reached = 0
        self.recording = False
        self.frames = 0
        self.payload_bytes = 0  # of the text frames counted in `frames`
        self.errors = 0
        self.gone = 0  # idle connections that closed before they saw the value target
        self.changed = asyncio.Event()

    async def until(self, condition: Callable[[], bool], limit: float) -> bool:
        """Wait until `condition()` holds, re-checked when a listener changes.

        Listeners signal `changed` only on what a waiter can be waiting for
        (a target reached, a first event, a close), not on every frame.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        return condition()

    def expect(self, *, users: int | None, value: int | None, record: bool) -> None:
        """Set new targets; a listener already there counts as reached now."""
        now = time.monotonic()
        self.target_users, self.target_value, self.recording = users, value, record
        self.users_reached = self.value_reached = 0
        self.frames = self.payload_bytes = 0
        for listener in self.listeners:
            listener.users_at = listener.value_at = None
            listener.history = [] if record else None
            if users is not None and listener.users == users:
                listener.users_at = now
                self.users_reached += 1
            if value is not None and listener.value is not None and listener.value >= value:
                listener.value_at = now
                self.value_reached += 1


class Listener(WSListener):
    """One client that only listens: it notes when it first sees each target.

    It also notes when its handshake completed and when its first message
    came, for the join storm.
    """

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.group = group
        self.transport: WSTransport | None = None
        self.users = -1
        self.value: int | None = None
        self.users_at: float | None = None
        self.value_at: float | None = None
        self.opened_at: float | None = None
        self.first_at: float | None = None
        self.history: list[tuple[float, int]] | None = [] if group.recording else None
        self.closed = False
        group.listeners.append(self)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.opened_at = time.monotonic()
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic()
        if frame.msg_type == WSMsgType.TEXT:
            if self.first_at is None:
                self.first_at = now
            group = self.group
            group.frames += 1
            payload = frame.get_payload_as_bytes()
            group.payload_bytes += len(payload)
            try:
                event = json.loads(payload)
                if event["type"] == "state":
                    self.on_value(int(event["value"]), now)
                elif event["type"] == "users":
                    self.on_users(int(event["count"]), now)
                else:  # an error event, or something the protocol lacks
                    group.errors += 1
            except (ValueError, TypeError, KeyError):
                group.errors += 1
        elif frame.msg_type == WSMsgType.CLOSE:
            # Answer the closing handshake, then let the server close TCP.
            if not transport.is_close_frame_sent:
                transport.send_close()
            transport.disconnect()

    def on_users(self, users: int, now: float) -> None:
        group = self.group
        if self.users < 0:
            group.changed.set()
        self.users = users
        if users == group.target_users and self.users_at is None:
            self.users_at = now
            group.users_reached += 1
            group.changed.set()

    def on_value(self, value: int, now: float) -> None:
        group = self.group
        if self.value is None:
            group.changed.set()
        self.value = value
        if self.history is not None:
            self.history.append((now, value))
        target = group.target_value
        if target is not None and value >= target and self.value_at is None:
            self.value_at = now
            group.value_reached += 1
            group.changed.set()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.group.changed.set()


class IdleListener(WSListener):
    """A connection held open for the capacity test: it drops frames until armed.

    Armed (its group has a ``target_value``), it notes when it first sees a
    state at or above it; until then it parses nothing, so that holding
    thousands of connections to a server that tells each of every join costs
    the load generator as little as can be.
    """

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.group = group
        self.transport: WSTransport | None = None
        self.seen_at: float | None = None
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        target = self.group.target_value
        if frame.msg_type == WSMsgType.TEXT and target is not None and self.seen_at is None:
            now = time.monotonic()
            try:
                event = json.loads(frame.get_payload_as_bytes())
                seen = event["type"] == "state" and int(event["value"]) >= target
            except (ValueError, TypeError, KeyError):
                self.group.errors += 1
                return
            if seen:
                self.seen_at = now
                self.group.value_reached += 1
                self.group.changed.set()
        elif frame.msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close()
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if self.seen_at is None:
            self.group.gone += 1
            self.group.changed.set()


def seen_after(
    history: list[tuple[float, int]], sends: list[tuple[int, float]]
) -> list[float | None]:
    """Per (value, sent_at) send, by value: the delay until `history` shows it, or None.

    Values are absolute, so "a value including the action" is any value at or
    above the one the action made, whether or not the server skipped to it.
    """
    out: list[float | None] = []
    i = 0
    for expected, sent_at in sorted(sends):
        while i < len(history) and history[i][1] < expected:
            i += 1
        out.append(history[i][0] - sent_at if i < len(history) else None)
    return out


def summarize_errors(results: list[Any]) -> list[str]:
    """The three most common connection failures, for the report."""
    counts = Counter(
        f"{type(r).__name__}: {r}"[:120] for r in results if isinstance(r, BaseException)
    )
    return [f"{n}x {text}" for text, n in counts.most_common(3)]


class Worker:
    """The commands one worker process answers, one at a time."""

    def __init__(self, source_ip: str | None) -> None:
        self.source_ip = source_ip
        self.group = Group()
        self.idle: list[IdleListener] = []
        self.idle_group = Group()  # armed by the capacity phase's action
        self.armed_open = 0  # idle connections open when armed
        self.driver_group = Group()
        self.driver: Listener | None = None

    def make_socket(self, _url: object) -> socket.socket:
        """A client socket with its own source address and Nagle off.

        Each worker connects from its own 127.x address so that 10,000
        connections, and the TIME_WAIT ones of earlier phases, never run out of
        ephemeral ports towards the one server port.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.source_ip is not None:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source_ip, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def open(self, factory: Callable[[], WSListener], url: str, limit: float) -> Any:
        """Connect and complete the handshake within `limit` seconds."""
        async with asyncio.timeout(limit):
            _transport, listener = await ws_connect(
                factory,
                url,
                websocket_handshake_timeout=limit,
                socket_factory=self.make_socket if self.source_ip else None,
            )
        if listener is None:
            # picows returns no listener when the server hung up mid-handshake.
            raise ConnectionError("closed during the handshake")
        return listener

    # --- listeners ---

    async def connect(
        self, url: str, count: int, start_at: float, expect_users: int, limit: float
    ) -> Reply:
        """Open `count` listeners all at once, at `start_at` on the shared clock."""
        self.group = Group()
        self.group.expect(users=expect_users, value=None, record=False)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()
        group = self.group
        results = await asyncio.gather(
            *(self.open(lambda: Listener(group), url, limit) for _ in range(count)),
            return_exceptions=True,
        )
        failed = sum(isinstance(r, BaseException) for r in results)
        opened = [x.opened_at for x in group.listeners if x.opened_at is not None]
        return {
            "started": started,
            "connected": count - failed,
            "failed": failed,
            "handshakes_last": max(opened, default=None),
            "errors": summarize_errors(results),
        }

    def firsts(self) -> Reply:
        """How many listeners got a first message, and when the last of them got it."""
        firsts = [x.first_at for x in self.group.listeners if x.first_at is not None]
        return {"count": len(firsts), "last": max(firsts, default=None)}

    def expect(
        self, users: int | None = None, value: int | None = None, record: bool = False
    ) -> Reply:
        self.group.expect(users=users, value=value, record=record)
        return {}

    async def wait(self, what: str, limit: float) -> Reply:
        """Wait until every open listener reached the target `what` is about."""
        group = self.group

        def reached() -> int:
            return group.users_reached if what == "users" else group.value_reached

        def expected() -> int:
            return sum(not listener.closed for listener in group.listeners)

        await group.until(lambda: reached() >= expected(), limit)
        attr = "users_at" if what == "users" else "value_at"
        times = [t for t in (getattr(x, attr) for x in group.listeners) if t is not None]
        return {
            "reached": reached(),
            "listeners": len(group.listeners),
            "open": expected(),
            "last": max(times, default=None),
            "frames": group.frames,
            "payload_bytes": group.payload_bytes,
            "errors": group.errors,
        }

    def delays(self, sends: list[tuple[int, float]]) -> Reply:
        """Per listener and action: time from the send to the first value >= it."""
        seen = [d for x in self.group.listeners for d in seen_after(x.history or [], sends)]
        out = [d for d in seen if d is not None]
        return {"delays": out, "missing": len(seen) - len(out)}

    # --- capacity ---

    async def gated(
        self, count: int, concurrency: int, limit: float, open_one: Callable[[int], Any]
    ) -> list[Any]:
        """Run `open_one(i)` for i < count, `concurrency` at a time, all within `limit`.

        Each result is what `open_one` returned or the exception it raised.
        """
        deadline = time.monotonic() + limit
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> Any:
            async with gate:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("not tried: phase time is up")
                async with asyncio.timeout(remaining):
                    return await open_one(index)

        return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)

    async def fill(self, url: str, count: int, concurrency: int, limit: float) -> Reply:
        """Open up to `count` idle connections, `concurrency` handshakes at a time."""
        return await self.hold_all([url] * count, concurrency, limit)

    async def hold_all(self, urls: list[str], concurrency: int, limit: float) -> Reply:
        """An idle connection to each of `urls`, kept (they count in :meth:`count_open`)."""

        group = self.idle_group

        async def hold(index: int) -> IdleListener:
            factory = functools.partial(IdleListener, group)
            listener: IdleListener = await self.open(factory, urls[index], limit)
            self.idle.append(listener)
            return listener

        results = await self.gated(len(urls), concurrency, limit, hold)
        failed = sum(isinstance(r, BaseException) for r in results)
        return {
            "connected": len(urls) - failed,
            "failed": failed,
            "errors": summarize_errors(results),
        }

    def count_open(self) -> Reply:
        return {"open": sum(not x.closed for x in self.idle)}

    def arm(self, value: int) -> Reply:
        """From now on, every idle connection notes when it first sees a value >= `value`."""
        group = self.idle_group
        group.target_value = value
        group.value_reached = group.errors = group.gone = 0
        for listener in self.idle:
            listener.seen_at = None
        self.armed_open = sum(not x.closed for x in self.idle)
        return {}

    async def armed_delays(self, sent_at: float, limit: float) -> Reply:
        """Wait until every open idle connection saw the armed value; each one's delay.

        A delay is the time from `sent_at` (the action's send, on the shared
        clock) until the connection saw it; `missing` counts the open ones
        that had not by `limit`.
        """
        group = self.idle_group
        # Counts, not a scan of thousands of connections at each wake-up:
        # the wait runs while the same process times their frames.
        await group.until(lambda: group.value_reached + group.gone >= self.armed_open, limit)
        delays = [x.seen_at - sent_at for x in self.idle if x.seen_at is not None]
        missing = sum(x.seen_at is None and not x.closed for x in self.idle)
        return {"delays": delays, "missing": missing, "errors": group.errors}

    def driver_status(self) -> Reply:
        """Error events the driver got (a rate limit, say) and whether it is open."""
        closed = self.driver is None or self.driver.closed
        return {"errors": self.driver_group.errors, "closed": closed}

    def driver_view(self) -> Reply:
        """The latest users count and value the driver was told, and whether it is open."""
        driver = self.driver
        if driver is None:
            return {"users": None, "value": None, "closed": True}
        users = driver.users if driver.users >= 0 else None
        return {"users": users, "value": driver.value, "closed": driver.closed}

    def driver_expect(self, value: int) -> Reply:
        """The driver notes when it first sees a value >= `value` (see :meth:`driver_seen`)."""
        self.driver_group.expect(users=None, value=value, record=False)
        return {}

    async def driver_seen(self, limit: float) -> Reply:
        """When the driver saw the value it expects, waiting up to `limit`; None if it did not."""
        driver = self.driver
        if driver is None:
            return {"value_at": None}
        await self.driver_group.until(lambda: driver.value_at is not None or driver.closed, limit)
        return {"value_at": driver.value_at}

    def cpu(self) -> Reply:
        """This process's CPU seconds, to tell whether the generator kept up."""
        return {"cpu": time.process_time()}

    # --- driver ---

    async def driver_connect(self, url: str, limit: float) -> Reply:
        """Open the driver connection and return the value it was given."""
        self.driver_group = group = Group()
        self.driver = driver = await self.open(lambda: Listener(group), url, limit)
        if not await group.until(lambda: driver.value is not None, limit):
            raise TimeoutError("the driver got no state event")
        return {"value": driver.value, "users": driver.users}

    def burst(self, count: int) -> Reply:
        """Write `count` plus actions back to back, without waiting for replies."""
        transport = self.require_driver()
        started = time.monotonic()
        for _ in range(count):
            transport.send(WSMsgType.TEXT, PLUS)
        return {"started": started}

    async def steady(self, start_value: int, rate: float, count: int) -> Reply:
        """Send `count` plus actions at `rate` per second on a fixed schedule."""
        transport = self.require_driver()
        sends: list[tuple[int, float]] = []
        start = time.monotonic() + 0.05
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            sent_at = time.monotonic()
            transport.send(WSMsgType.TEXT, PLUS)
            sends.append((start_value + i + 1, sent_at))
        return {"sends": sends}

    def require_driver(self) -> WSTransport:
        if self.driver is None or self.driver.transport is None or self.driver.closed:
            raise RuntimeError("the driver is not connected")
        return self.driver.transport

    # --- both ---

    async def reset(self) -> Reply:
        """Drop every connection this worker holds (RST: no closing handshake)."""
        listeners: list[Any] = [*self.group.listeners, *self.idle]
        if self.driver is not None:
            listeners.append(self.driver)
        for listener in listeners:
            if listener.transport is not None:
                listener.transport.disconnect(graceful=False)
        self.group = Group()
        self.idle = []
        self.idle_group = Group()
        self.driver = None
        await asyncio.sleep(0.05)
        return {"dropped": len(listeners)}


async def serve_commands(inbox_conn: Connection, outbox: Connection, worker: Worker) -> None:
    """Answer the main process's commands until it says stop or goes away.

    Commands and replies travel on two one-way pipes: the event loop makes the
    fd it watches non-blocking, and a large reply (the steady phase's delays)
    must not fail with EAGAIN halfway through. A command larger than the pipe's
    buffer (a long list of rooms) arrives in pieces, so once its first bytes
    are readable the rest is read blocking: the main process is writing it.
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, str, dict[str, Any]] | None] = asyncio.Queue()
    fd = inbox_conn.fileno()

    def readable() -> None:
        try:
            os.set_blocking(fd, True)
            try:
                message = inbox_conn.recv()
            finally:
                os.set_blocking(fd, False)
            inbox.put_nowait(message)
        except (EOFError, OSError):
            loop.remove_reader(fd)
            inbox.put_nowait(None)

    loop.add_reader(fd, readable)
    while (message := await inbox.get()) is not None:
        number, name, kwargs = message
        if name == "stop":
            break
        try:
            method: Callable[..., Reply | Awaitable[Reply]] = getattr(worker, name)
            reply = method(**kwargs)
            if asyncio.iscoroutine(reply):
                reply = await reply
        except Exception as exc:  # report it: the main process decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            outbox.send((number, reply))
        except OSError:
            break
    with contextlib.suppress(Exception):
        await worker.reset()


def worker_main(
    inbox: Connection, outbox: Connection, source_ip: str | None, kind: type[Worker] = Worker
) -> None:
    """Entry point of a worker process; `kind` is the class whose commands it answers."""
    raise_fd_limit()
    # Failed handshakes are counted and reported; picows' own log is noise here.
    logging.basicConfig(level=logging.CRITICAL)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_commands(inbox, outbox, kind(source_ip)))
    else:
        uvloop.run(serve_commands(inbox, outbox, kind(source_ip)))
