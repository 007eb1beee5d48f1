"""Rooms: does the cost of a change follow its room, and only its room?

`python -m bench.rooms` runs four phases against counter-sync, each on a
fresh server process, with the load in separate worker processes (the same
picows-on-uvloop generator as `python -m bench`), and prints one table with
each figure, its target and a verdict (JSON in bench/results/rooms.json):

1. fan-out: many small rooms (1,000 x 10 connections), one action per second
   in every room, spread over the second. Every connection must end on its
   room's exact value; the server's CPU per delivery is compared with the
   socket.send floor measured in the same run over as many sockets at the same
   rate (and, to tell the kernel's share, with the same loop in the phase's
   pattern: one room's sockets per round); the delivery delay is reported.
2. cost: the server's CPU per action in one 10-user room, first alone, then
   with 10,000 other users in idle rooms, several times each.
3. memory: with --state, 10,000 room names joined and left once each; the
   server's RSS before, half-way, at its peak and after.
4. isolation: a burst of pipelined actions in one big room while a client in a
   small room acts every 50 ms and times how long it takes to see its change.

Keepalive pings are off (`--ping-interval 0`) in phases 1, 2 and 4: 10,000
connections opened over several seconds would each be pinged once, 20 s
later, at a moment that depends on how long the joins took; that cost is the
keepalive's, not a delivery's, and it would land in one condition and not the
other. Every wait has a timeout, so the bench always finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import multiprocessing
import shlex
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.__main__ import environment, fmt, loadavg
from bench.floor import drain, measure_floor, state_frame
from bench.loadgen import (
    PLUS,
    Group,
    IdleListener,
    Listener,
    LoadGen,
    LoadGenError,
    Reply,
    Worker,
    raise_fd_limit,
    seen_after,
    summarize_errors,
)
from bench.measure import Usage, percentile, say
from bench.servers import (
    REPO_ROOT,
    SERVERS,
    RunningServer,
    ServerSpec,
    cpu_seconds,
    rss_bytes,
    start_server,
    wait_idle,
)

# Only the load processes send; LoadGen.start() says what to install without it.
with contextlib.suppress(ImportError):
    from picows import WSMsgType

__all__ = ["PHASES", "RoomWorker", "main", "room_url"]

RESULTS = REPO_ROOT / "bench" / "results" / "rooms.json"
PHASES = ("fanout", "cost", "memory", "isolation")
# See the module docstring: pings would land in one phase's window and not another's.
NO_PINGS = ("--ping-interval", "0")
MIB = 1024 * 1024

# Values used when a flag is not given: a full run, or --quick for a smoke run.
FULL: dict[str, float] = {
    "rooms": 1000,
    "per_room": 10,
    "rate": 1.0,
    "duration": 10.0,
    "cost_users": 10,
    "cost_actions": 200,
    "cost_rate": 100.0,
    "others": 10_000,
    "other_rooms": 1000,
    "reps": 5,
    "memory_rooms": 10_000,
    "plus_every": 10,
    "memory_concurrency": 5,
    "big_room": 2000,
    "burst": 5000,
    "bursts": 30,
    "small_room": 10,
    "probe_interval": 0.05,
    "baseline": 3.0,
    "concurrency": 100,
    "timeout": 60.0,
}
QUICK: dict[str, float] = {
    **FULL,
    "rooms": 6,
    "per_room": 3,
    "rate": 4.0,
    "duration": 1.0,
    "cost_users": 3,
    "cost_actions": 10,
    "cost_rate": 50.0,
    "others": 20,
    "other_rooms": 4,
    "reps": 2,
    "memory_rooms": 40,
    "big_room": 10,
    "burst": 50,
    "bursts": 2,
    "small_room": 3,
    "baseline": 0.3,
    "concurrency": 20,
    "timeout": 20.0,
}
INTEGERS = {
    "rooms",
    "per_room",
    "cost_users",
    "cost_actions",
    "others",
    "other_rooms",
    "reps",
    "memory_rooms",
    "plus_every",
    "memory_concurrency",
    "big_room",
    "burst",
    "bursts",
    "small_room",
    "concurrency",
}
HELP = {
    "rooms": "fan-out: rooms",
    "per_room": "fan-out: connections per room, its driver included",
    "rate": "fan-out: actions per second in each room",
    "duration": "fan-out: seconds of actions",
    "cost_users": "cost: users in the measured room, its driver included",
    "cost_actions": "cost: actions per measurement",
    "cost_rate": "cost: actions per second",
    "others": "cost: idle users in other rooms for the second condition",
    "other_rooms": "cost: idle rooms they are spread over",
    "reps": "cost: measurements per condition",
    "memory_rooms": "memory: room names joined and left once each",
    "plus_every": "memory: one room in this many gets a plus before it is left",
    "memory_concurrency": "memory: rooms visited at once per load process",
    "big_room": "isolation: listeners in the big room",
    "burst": "isolation: pipelined plus actions per burst",
    "bursts": "isolation: bursts, back to back",
    "small_room": "isolation: users in the small room, the prober included",
    "probe_interval": "isolation: seconds between the prober's actions",
    "baseline": "isolation: seconds of probing before the bursts",
    "concurrency": "handshakes in flight per load process",
    "timeout": "seconds any wait may take",
}

# Targets: (key, label, op, bound). The measured values are filled in by targets().
TARGETS = (
    ("fanout_exact", "fan-out: connections on their room's exact value", "==", "all"),
    ("fanout_floor", "fan-out: server CPU per delivery (x socket.send floor)", "<=", 1.5),
    ("cost_ratio", "cost per action: with the others / alone (median)", "<=", 1.2),
    ("memory_growth", "memory: RSS after the rooms - before (MiB)", "<=", 4.0),
    ("isolation_p99", "isolation: small room p99 during the bursts (ms)", "<", 100.0),
)


def room_url(server_url: str, room: str) -> str:
    """The WebSocket URL of room `room` on the server at `server_url` (``ws://h:p/``)."""
    return f"{server_url.rstrip('/')}/c/{room}"


# --------------------------------------------------------------------------
# Inside a worker process
# --------------------------------------------------------------------------


def freeze_heap() -> None:
    """Keep the cyclic GC off the connections just opened, for the measurements.

    A load process holding 5,000 connections has a few hundred thousand
    long-lived objects; the full collection their growth triggers paused it
    for 0.2-0.5 s, and every listener's receive time with it, which showed up
    as a stall of the server. Frozen, they are never scanned again; what the
    measurement itself allocates is still collected.
    """
    gc.collect()
    gc.freeze()


@dataclass
class RoomClients:
    """The connections one worker holds in one room, and the actions it sent there."""

    group: Group
    driver: Listener | None = None
    start: int = 0  # the room's value when the actions began
    sends: list[tuple[int, float]] = field(default_factory=list)  # (value it makes, sent_at)

    def current(self) -> int | None:
        """The room's value as these clients see it (the highest, if they differ)."""
        values = [x.value for x in self.group.listeners if x.value is not None]
        return max(values, default=None)

    def open_listeners(self) -> list[Listener]:
        return [x for x in self.group.listeners if not x.closed]

    def all_have_values(self) -> bool:
        return all(x.value is not None or x.closed for x in self.group.listeners)

    def all_reached(self) -> bool:
        """Every open listener here has seen the room's target value."""
        return self.group.value_reached >= len(self.open_listeners())


class RoomWorker(Worker):
    """A load process that also holds connections in named rooms.

    Each room's connections share one Group, whose value target is the room's
    own; a room's driver is one of its connections, so it is checked like the
    others. Commands take the rooms they act on, so several processes can
    share one room (the isolation phase's big room).
    """

    def __init__(self, source_ip: str | None) -> None:
        super().__init__(source_ip)
        self.rooms: dict[str, RoomClients] = {}
        self.prober: asyncio.Task[None] | None = None

    def selected(self, rooms: list[str] | None) -> list[RoomClients]:
        names = self.rooms if rooms is None else rooms
        return [self.rooms[name] for name in names if name in self.rooms]

    async def gated(
        self, count: int, concurrency: int, limit: float, open_one: Callable[[int], Any]
    ) -> list[Any]:
        """Run `open_one(i)` for i < count, `concurrency` at a time, all within `limit`."""
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

    async def join(
        self,
        base_url: str,
        rooms: dict[str, int],
        drivers: list[str],
        concurrency: int,
        limit: float,
    ) -> Reply:
        """Open `rooms[name]` listeners in each room; the first in each of `drivers` drives it.

        Returns once every listener has its room's value, so the caller can
        wait for an idle server and start from a known state.
        """
        deadline = time.monotonic() + limit
        plan = [(name, i) for name, count in rooms.items() for i in range(count)]
        for name in rooms:
            self.rooms.setdefault(name, RoomClients(Group()))

        def open_one(index: int) -> Any:
            name = plan[index][0]
            group = self.rooms[name].group
            return self.open(lambda: Listener(group), room_url(base_url, name), limit)

        results = await self.gated(len(plan), concurrency, limit, open_one)
        for (name, _), result in zip(plan, results, strict=True):
            clients = self.rooms[name]
            if name in drivers and clients.driver is None and isinstance(result, Listener):
                clients.driver = result
        for clients in self.rooms.values():
            # A handshake that failed may have left its listener behind.
            clients.group.listeners = [x for x in clients.group.listeners if x.transport]
        for clients in self.selected(list(rooms)):
            await clients.group.until(clients.all_have_values, deadline - time.monotonic())
        freeze_heap()
        failed = sum(isinstance(r, BaseException) for r in results)
        without_value = sum(
            x.value is None for c in self.selected(list(rooms)) for x in c.group.listeners
        )
        return {
            "connected": len(plan) - failed,
            "failed": failed,
            "without_value": without_value,
            "drivers": sum(self.rooms[name].driver is not None for name in drivers),
            "errors": summarize_errors(results),
        }

    async def fill_rooms(
        self, base_url: str, rooms: dict[str, int], concurrency: int, limit: float
    ) -> Reply:
        """Open idle connections in rooms: users that are there and do nothing."""
        urls = [room_url(base_url, name) for name, count in rooms.items() for _ in range(count)]

        async def open_one(index: int) -> IdleListener:
            listener: IdleListener = await self.open(IdleListener, urls[index], limit)
            self.idle.append(listener)
            return listener

        results = await self.gated(len(urls), concurrency, limit, open_one)
        freeze_heap()
        failed = sum(isinstance(r, BaseException) for r in results)
        return {
            "connected": len(urls) - failed,
            "failed": failed,
            "errors": summarize_errors(results),
        }

    def expect_added(
        self, added: int, rooms: list[str] | None = None, record: bool = False
    ) -> Reply:
        """Each room's target becomes its current value plus `added`; sends start afresh."""
        for clients in self.selected(rooms):
            clients.start = clients.current() or 0
            clients.sends = []
            clients.group.expect(users=None, value=clients.start + added, record=record)
        return {}

    def expect_final(self, values: dict[str, int]) -> Reply:
        """Set each room's target to the value another process knows it must end on."""
        for name, value in values.items():
            if name in self.rooms:
                self.rooms[name].group.expect(users=None, value=value, record=False)
        return {}

    async def drive(
        self, start_at: float, rate: float, actions: int, offsets: dict[str, float]
    ) -> Reply:
        """Send `actions` plus in each room, at `rate`/s from `start_at` + its offset.

        One schedule for all rooms of this process, so that a thousand rooms
        cost one timer at a time, not a thousand tasks.
        """
        schedule = sorted(
            (start_at + offset + i / rate, name)
            for name, offset in offsets.items()
            for i in range(actions)
        )
        late: list[float] = []
        unsent = 0
        for due, name in schedule:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            clients = self.rooms[name]
            driver = clients.driver
            if driver is None or driver.transport is None or driver.closed:
                unsent += 1
                continue
            sent_at = time.monotonic()
            driver.transport.send(WSMsgType.TEXT, PLUS)
            clients.sends.append((clients.start + len(clients.sends) + 1, sent_at))
            late.append(sent_at - due)
        return {
            "sent": len(late),
            "unsent": unsent,
            "late_p99_ms": percentile(late, 0.99) * 1e3 if late else None,
            "late_max_ms": max(late) * 1e3 if late else None,
        }

    def burst_room(self, room: str, count: int) -> Reply:
        """Write `count` plus actions back to back on `room`'s driver."""
        driver = self.rooms[room].driver
        if driver is None or driver.transport is None or driver.closed:
            raise RuntimeError(f"the driver of {room} is not connected")
        started = time.monotonic()
        for _ in range(count):
            driver.transport.send(WSMsgType.TEXT, PLUS)
        return {"started": started}

    async def wait_rooms(self, limit: float, rooms: list[str] | None = None) -> Reply:
        """Wait until every open listener of every expecting room reached its target."""
        deadline = time.monotonic() + limit
        expecting = [c for c in self.selected(rooms) if c.group.target_value is not None]
        for clients in expecting:
            await clients.group.until(clients.all_reached, deadline - time.monotonic())
        groups = [c.group for c in expecting]
        times = [x.value_at for g in groups for x in g.listeners if x.value_at is not None]
        return {
            "reached": sum(g.value_reached for g in groups),
            "open": sum(len(c.open_listeners()) for c in expecting),
            "last": max(times, default=None),
            "frames": sum(g.frames for g in groups),
            "errors": sum(g.errors for g in groups),
        }

    def check_rooms(self, rooms: list[str] | None = None) -> Reply:
        """Who ended on the room's exact value, and each delivery's delay where we sent."""
        listeners = exact = closed = missing = 0
        wrong: list[str] = []
        delays: list[float] = []
        for name, clients in self.rooms.items():
            if rooms is not None and name not in rooms:
                continue
            expected = clients.group.target_value
            for listener in clients.group.listeners:
                listeners += 1
                closed += listener.closed
                if not listener.closed and listener.value == expected:
                    exact += 1
                elif len(wrong) < 5:
                    state = "closed" if listener.closed else f"shows {listener.value}"
                    wrong.append(f"{name}: {state}, expected {expected}")
                if clients.sends:
                    seen = seen_after(listener.history or [], clients.sends)
                    delays.extend(d for d in seen if d is not None)
                    missing += sum(d is None for d in seen)
        return {
            "listeners": listeners,
            "exact": exact,
            "closed": closed,
            "wrong": wrong,
            "delays": delays,
            "missing": missing,
        }

    async def cycle_rooms(
        self, base_url: str, rooms: list[tuple[str, bool]], concurrency: int, limit: float
    ) -> Reply:
        """Join each room once, maybe add one, and leave with a close handshake."""

        async def visit(index: int) -> bool:
            name, plus = rooms[index]
            group = Group()
            listener: Listener = await self.open(
                lambda: Listener(group), room_url(base_url, name), limit
            )
            assert listener.transport is not None
            try:
                if not await group.until(lambda: listener.value is not None, limit):
                    raise TimeoutError("no state event")
                if plus:
                    group.expect(users=None, value=(listener.value or 0) + 1, record=False)
                    listener.transport.send(WSMsgType.TEXT, PLUS)
                    if not await group.until(lambda: group.value_reached > 0, limit):
                        raise TimeoutError("the plus was not seen")
                listener.transport.send_close()
                if not await group.until(lambda: listener.closed, limit):
                    raise TimeoutError("no close from the server")
            finally:
                if not listener.closed:
                    listener.transport.disconnect(graceful=False)
            return plus

        results = await self.gated(len(rooms), concurrency, limit, visit)
        failed = sum(isinstance(r, BaseException) for r in results)
        return {
            "visited": len(rooms) - failed,
            "pluses": sum(r is True for r in results),
            "failed": failed,
            "errors": summarize_errors(results),
        }

    def probe_start(self, room: str, interval: float) -> Reply:
        """Start acting in `room` every `interval` seconds, from its driver (the prober)."""
        clients = self.rooms[room]
        if clients.driver is None:
            raise RuntimeError(f"no prober in {room}")
        clients.group.expect(users=None, value=None, record=True)
        clients.start = clients.current() or 0
        clients.sends = []
        self.prober = asyncio.create_task(self.probe_loop(clients, clients.driver, interval))
        return {"value": clients.start}

    async def probe_loop(self, clients: RoomClients, prober: Listener, interval: float) -> None:
        """Send on a fixed schedule; a late answer never delays the next action."""
        first = time.monotonic()
        for i in itertools.count():
            await asyncio.sleep(max(0.0, first + i * interval - time.monotonic()))
            if prober.transport is None or prober.closed:
                return
            sent_at = time.monotonic()
            prober.transport.send(WSMsgType.TEXT, PLUS)
            clients.sends.append((clients.start + len(clients.sends) + 1, sent_at))

    async def probe_stop(self, room: str, limit: float) -> Reply:
        """Stop probing; wait for the last answer; each probe's send time and delay."""
        if self.prober is not None:
            self.prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.prober
            self.prober = None
        clients = self.rooms[room]
        prober = clients.driver
        assert prober is not None
        final = clients.start + len(clients.sends)
        await clients.group.until(lambda: (prober.value or 0) >= final or prober.closed, limit)
        clients.group.target_value = final  # for check_rooms
        seen = seen_after(prober.history or [], clients.sends)
        sent_at = [at for _, at in sorted(clients.sends)]
        return {"probes": list(zip(sent_at, seen, strict=True)), "value": final}

    async def reset(self) -> Reply:
        """Drop the rooms' connections too (RST), stop a prober, and thaw the heap."""
        if self.prober is not None:
            self.prober.cancel()
            self.prober = None
        for clients in self.rooms.values():
            for listener in clients.group.listeners:
                if listener.transport is not None and not listener.closed:
                    listener.transport.disconnect(graceful=False)
        self.rooms = {}
        reply = await super().reset()
        gc.unfreeze()  # the dropped connections may be collected again
        return reply


# --------------------------------------------------------------------------
# In the main process
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Every knob of one run; filled from the command line."""

    rooms: int
    per_room: int
    rate: float
    duration: float
    cost_users: int
    cost_actions: int
    cost_rate: float
    others: int
    other_rooms: int
    reps: int
    memory_rooms: int
    plus_every: int
    memory_concurrency: int
    big_room: int
    burst: int
    bursts: int
    small_room: int
    probe_interval: float
    baseline: float
    concurrency: int
    timeout: float
    workers: int
    host: str
    phases: tuple[str, ...]
    floor: bool
    log_dir: Path
    tag: str  # in every room name, so no two runs share a counter

    @property
    def actions_per_room(self) -> int:
        return max(1, round(self.rate * self.duration))


Result = dict[str, Any]
# floor.py's figure and the room-pattern floor's, each None when not measured.
Floors = tuple[Result | None, Result | None]


def deal(items: Sequence[Any], hands: int) -> list[list[Any]]:
    """Round-robin `items` into `hands` lists, so each gets a share of every stretch."""
    return [list(items[i::hands]) for i in range(hands)]


def ask_all(
    load: LoadGen, calls: dict[int, tuple[str, dict[str, Any]]], limit: float
) -> list[Reply]:
    """`load.ask` with replies in process order."""
    replies = load.ask(calls, limit)
    return [replies[i] for i in sorted(replies)]


def total(replies: list[Reply], key: str) -> int:
    return sum(r[key] for r in replies)


def server_command(spec: ServerSpec, host: str) -> str:
    """The server's command line as a person would type it (the port is picked per run)."""
    argv = ["python3", *spec.argv[1:]] if spec.argv[0] == sys.executable else list(spec.argv)
    return shlex.join([*argv, "--host", host, "--port", "0"])


def counter_sync(name: str, extra: tuple[str, ...]) -> ServerSpec:
    """The bench's counter-sync command (bench/servers.py) with `extra` flags."""
    base = SERVERS["counter-sync"]
    return ServerSpec(f"rooms-{name}", base.description, (*base.argv, *extra))


@contextlib.contextmanager
def running(spec: ServerSpec, load: LoadGen, o: Options) -> Iterator[RunningServer]:
    """A fresh server for one phase; afterwards it is stopped and the load dropped."""
    server = start_server(spec, o.host, o.log_dir / f"{spec.name}.log", timeout=20)
    try:
        yield server
    finally:
        server.stop()
        try:
            load.reset()
        except LoadGenError:
            # A worker that cannot even drop its connections is restarted.
            load.close()
            load.start()


def healthz(server: RunningServer) -> dict[str, Any]:
    """The server's own view: users connected, rooms in use."""
    url = server.url.replace("ws://", "http://") + "healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def join(
    load: LoadGen,
    url: str,
    plan: dict[int, dict[str, int]],
    drivers: dict[int, list[str]],
    o: Options,
) -> Result:
    """Open every planned connection (process -> room -> count); sum up the replies."""
    started = time.monotonic()
    calls = {
        w: (
            "join",
            {
                "base_url": url,
                "rooms": rooms,
                "drivers": drivers.get(w, []),
                "concurrency": o.concurrency,
                "limit": o.timeout,
            },
        )
        for w, rooms in plan.items()
    }
    replies = ask_all(load, calls, o.timeout)
    return {
        "planned": sum(sum(rooms.values()) for rooms in plan.values()),
        "connected": total(replies, "connected"),
        "failed": total(replies, "failed"),
        "without_value": total(replies, "without_value"),
        "drivers": total(replies, "drivers"),
        "seconds": time.monotonic() - started,
        "connect_errors": [e for r in replies for e in r["errors"]],
    }


def delay_summary(delays: list[float]) -> Result:
    ms = [d * 1e3 for d in delays]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 0.50) if ms else None,
        "p99_ms": percentile(ms, 0.99) if ms else None,
        "max_ms": max(ms) if ms else None,
    }


def checked(replies: list[Reply]) -> Result:
    """check_rooms replies summed: exact, closed, examples of wrong values, delays."""
    return {
        "listeners": total(replies, "listeners"),
        "exact": total(replies, "exact"),
        "closed": total(replies, "closed"),
        "wrong": [w for r in replies for w in r["wrong"]][:5],
        "missing": total(replies, "missing"),
        "delays": delay_summary([d for r in replies for d in r["delays"]]),
    }


# --- phase 1: fan-out over many small rooms -----------------------------------


class DrainedSockets:
    """floor.py's setup: loopback sockets whose bytes floor.py's drain process reads.

    Used as a context manager; `socks` are non-blocking and TCP_NODELAY, like
    the floor's, and `received()` waits for the drain's count of bytes.
    """

    def __init__(self, connections: int, expected: int, timeout: float) -> None:
        self.connections, self.expected, self.timeout = connections, expected, timeout
        self.socks: list[socket.socket] = []
        context = multiprocessing.get_context("spawn")
        self.parent, self.child = context.Pipe()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
        args = (self.listener.getsockname()[1], connections, expected, self.child, timeout)
        self.receiver = context.Process(target=drain, args=args, daemon=True)

    def __enter__(self) -> Self:
        self.receiver.start()
        self.socks.extend(self.listener.accept()[0] for _ in range(self.connections))
        if not self.parent.poll(self.timeout) or self.parent.recv() != "connected":
            raise RuntimeError("the floor's receiver did not connect")
        for sock in self.socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        return self

    def received(self) -> int:
        return int(self.parent.recv()) if self.parent.poll(self.timeout) else 0

    def __exit__(self, *exc: object) -> None:
        self.receiver.join(self.timeout)
        if self.receiver.is_alive():
            self.receiver.kill()
        for sock in [*self.socks, self.listener]:
            sock.close()


def measure_room_floor(
    *, rooms: int, per_room: int, rate: float, duration: float, timeout: float
) -> Result:
    """floor.py's socket.send loop in the fan-out phase's pattern: one room at a time.

    floor.py sends one frame to every socket per round, a loop that keeps the
    kernel's code and sockets hot in the caches and its reader awake. The
    server in the fan-out phase wakes once per action and writes to one
    room's few sockets, a different room each time. The same loop in that
    pattern (room i's sockets at i/rooms of each period) shows what the
    kernel alone costs for it: the gap between it and floor.py is not the
    server's doing, the gap above it is.
    """
    raise_fd_limit()
    actions = max(1, round(rate * duration)) * rooms
    frame_size = len(state_frame(10_000))  # five-digit values: every frame 32 bytes
    connections = rooms * per_room
    would_block = 0
    with DrainedSockets(connections, actions * per_room * frame_size, timeout) as floor:
        cpu_start, start = time.process_time(), time.monotonic()
        for i in range(actions):
            time.sleep(max(0.0, start + i / rooms / rate - time.monotonic()))
            frame = state_frame(10_000 + i // rooms % 90_000)
            room = i % rooms
            for sock in floor.socks[room * per_room : (room + 1) * per_room]:
                try:
                    sock.send(frame)
                except BlockingIOError:
                    would_block += 1
        cpu = time.process_time() - cpu_start
        delivered = floor.received() // frame_size
    messages = actions * per_room
    return {
        "rooms": rooms,
        "per_room": per_room,
        "messages": messages,
        "delivered": delivered,
        "would_block": would_block,
        "cpu_seconds": cpu,
        "cpu_us_per_message": cpu / messages * 1e6,
    }


def phase_fanout(load: LoadGen, o: Options, floors: Floors) -> Result:
    """Rooms x connections, one action per room per 1/rate s; exact values, CPU, delays.

    `floors` are floor.py's figure and the room-pattern one (None when skipped).
    """
    spec = counter_sync("fanout", NO_PINGS)
    names = [f"fan-{o.tag}-{i}" for i in range(o.rooms)]
    hands = deal(names, o.workers)
    result: Result = {
        "server": server_command(spec, o.host),
        "rooms": o.rooms,
        "per_room": o.per_room,
    }
    with running(spec, load, o) as server:
        say(f"fan-out: joining {o.rooms} rooms x {o.per_room}")
        plan = {w: dict.fromkeys(hand, o.per_room) for w, hand in enumerate(hands)}
        result["join"] = join(load, server.url, plan, dict(enumerate(hands)), o)
        result["server_users"] = healthz(server)["users"]
        wait_idle(server.pid, timeout=o.timeout)
        actions = o.actions_per_room
        each = {w: ("expect_added", {"added": actions, "record": True}) for w in range(o.workers)}
        ask_all(load, each, 5)
        say(f"fan-out: {actions} actions per room at {o.rate:g}/s")
        usage = Usage(server, load)
        start_at = time.monotonic() + 0.5
        index = {name: i for i, name in enumerate(names)}
        drive = {
            w: (
                "drive",
                {
                    "start_at": start_at,
                    "rate": o.rate,
                    "actions": actions,
                    # Room i acts i/rooms of a period after room 0: spread over the second.
                    "offsets": {name: index[name] / o.rooms / o.rate for name in hand},
                },
            )
            for w, hand in enumerate(hands)
        }
        drove = ask_all(load, drive, 1 + o.duration + o.timeout)
        waited = ask_all(load, {w: ("wait_rooms", {"limit": o.timeout}) for w in drive}, o.timeout)
        result["server_idle_after"] = wait_idle(server.pid, timeout=o.timeout)
        used = usage.stop()
        check = checked(ask_all(load, {w: ("check_rooms", {}) for w in drive}, o.timeout))
    sent = total(drove, "sent")
    deliveries = sent * o.per_room
    per_delivery = used["server_cpu_seconds"] / deliveries * 1e6 if deliveries else None
    floor_us, room_floor_us = (f["cpu_us_per_message"] if f else None for f in floors)
    result.update(
        {
            "actions": sent,
            "unsent": total(drove, "unsent"),
            "late_send_max_ms": max((r["late_max_ms"] or 0) for r in drove),
            "reached": total(waited, "reached"),
            "error_events": total(waited, "errors"),
            "check": check,
            "converged": check["exact"] == o.rooms * o.per_room and check["missing"] == 0,
            **used,
            "deliveries": deliveries,
            "cpu_us_per_delivery": per_delivery,
            "floor_us_per_delivery": floor_us,
            "x_floor": per_delivery / floor_us if per_delivery and floor_us else None,
            "room_floor_us_per_delivery": room_floor_us,
            "x_room_floor": (
                per_delivery / room_floor_us if per_delivery and room_floor_us else None
            ),
        }
    )
    return result


# --- phase 2: the cost of an action, with and without others ------------------


def cost_measurement(load: LoadGen, server: RunningServer, room: str, o: Options) -> Result:
    """One run of `cost_actions` actions in the measured room; server CPU per action."""
    driver = load.driver_id
    ask_all(load, {driver: ("expect_added", {"added": o.cost_actions, "rooms": [room]})}, 5)
    before = cpu_seconds(server.pid)
    drive = {
        "start_at": time.monotonic() + 0.1,
        "rate": o.cost_rate,
        "actions": o.cost_actions,
        "offsets": {room: 0.0},
    }
    limit = o.cost_actions / o.cost_rate + o.timeout
    sent = ask_all(load, {driver: ("drive", drive)}, limit)[0]["sent"]
    ask_all(load, {driver: ("wait_rooms", {"limit": o.timeout, "rooms": [room]})}, o.timeout)
    idle = wait_idle(server.pid, timeout=o.timeout)
    cpu = cpu_seconds(server.pid) - before
    check = ask_all(load, {driver: ("check_rooms", {"rooms": [room]})}, o.timeout)[0]
    return {
        "actions": sent,
        "server_cpu_seconds": cpu,
        "cpu_us_per_action": cpu / sent * 1e6 if sent else None,
        "converged": check["exact"] == o.cost_users and sent == o.cost_actions,
        "server_idle_after": idle,
    }


def cost_condition(load: LoadGen, server: RunningServer, room: str, o: Options) -> Result:
    """A warm-up run, then `reps` measured ones; plus the server's idle CPU rate."""
    cost_measurement(load, server, room, o)  # warm-up: first-use costs are not per action
    runs = [cost_measurement(load, server, room, o) for _ in range(o.reps)]
    before, started = cpu_seconds(server.pid), time.monotonic()
    time.sleep(1.0)
    idle_rate = (cpu_seconds(server.pid) - before) / (time.monotonic() - started)
    per_action = [r["cpu_us_per_action"] for r in runs if r["cpu_us_per_action"] is not None]
    return {
        "runs": runs,
        "cpu_us_per_action": per_action,
        "median_us": statistics.median(per_action) if per_action else None,
        "converged": all(r["converged"] for r in runs),
        "idle_cpu_ms_per_s": idle_rate * 1e3,
    }


def phase_cost(load: LoadGen, o: Options) -> Result:
    """Server CPU per action in one room, alone and among `others` idle users."""
    spec = counter_sync("cost", NO_PINGS)
    room = f"cost-{o.tag}"
    result: Result = {"server": server_command(spec, o.host), "users": o.cost_users}
    with running(spec, load, o) as server:
        say(f"cost: one room of {o.cost_users}, {o.cost_actions} actions x {o.reps}, alone")
        plan = {load.driver_id: {room: o.cost_users}}
        result["join"] = join(load, server.url, plan, {load.driver_id: [room]}, o)
        wait_idle(server.pid, timeout=o.timeout)
        result["alone"] = cost_condition(load, server, room, o)
        say(f"cost: {o.others} idle users in {o.other_rooms} other rooms")
        sizes = {
            f"idle-{o.tag}-{i}": o.others // o.other_rooms + (i < o.others % o.other_rooms)
            for i in range(o.other_rooms)
        }
        fill = {
            w: (
                "fill_rooms",
                {
                    "base_url": server.url,
                    "rooms": {name: sizes[name] for name in hand},
                    "concurrency": o.concurrency,
                    "limit": o.timeout,
                },
            )
            for w, hand in enumerate(deal(list(sizes), o.workers))
        }
        filled = ask_all(load, fill, o.timeout)
        result["fill"] = {
            "connected": total(filled, "connected"),
            "failed": total(filled, "failed"),
            "connect_errors": [e for r in filled for e in r["errors"]],
        }
        wait_idle(server.pid, timeout=o.timeout)
        result["server_users"] = healthz(server)["users"]
        say("cost: the same room again, among them")
        result["crowded"] = cost_condition(load, server, room, o)
    alone, crowded = result["alone"]["median_us"], result["crowded"]["median_us"]
    result["ratio"] = crowded / alone if alone and crowded else None
    result["converged"] = (
        result["alone"]["converged"]
        and result["crowded"]["converged"]
        and result["server_users"] == o.cost_users + o.others
    )
    return result


# --- phase 3: memory after many rooms come and go ------------------------------


class PeakRss:
    """Samples a process's RSS in a thread while the main thread waits on workers."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid, self.period = pid, period
        self.peak = rss_bytes(pid)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.wait(self.period):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def counted_rows(path: Path, prefix: str) -> dict[str, int]:
    """Rows the SQLite file holds for the phase's rooms: all of them, and those at 1."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows, ones = db.execute(
            "SELECT count(*), coalesce(sum(value = 1), 0) FROM counter WHERE name LIKE ?",
            (f"{prefix}%",),
        ).fetchone()
    return {"rows": int(rows), "at_one": int(ones)}


def cycle(load: LoadGen, url: str, rooms: list[tuple[str, bool]], o: Options) -> Result:
    """Visit `rooms` (name, plus?) from every listener process; the replies summed."""
    calls = {
        w: (
            "cycle_rooms",
            {
                "base_url": url,
                "rooms": hand,
                "concurrency": o.memory_concurrency,
                "limit": o.timeout,
            },
        )
        for w, hand in enumerate(deal(rooms, o.workers))
    }
    replies = ask_all(load, calls, o.timeout)
    return {
        "visited": total(replies, "visited"),
        "failed": total(replies, "failed"),
        "pluses": total(replies, "pluses"),
        "connect_errors": [e for r in replies for e in r["errors"]],
    }


def phase_memory(load: LoadGen, o: Options) -> Result:
    """Join and leave `memory_rooms` names once each with --state; RSS before, peak, after.

    The rooms go in two halves, with the RSS read between them: growth that
    goes on in the second half is per room (a leak), growth that does not is
    the first connections' one-time cost or the allocator keeping a peak.
    """
    prefix = f"mem-{o.tag}-"
    rooms = [(f"{prefix}{i}", i % o.plus_every == 0) for i in range(o.memory_rooms)]
    halves = (rooms[: len(rooms) // 2], rooms[len(rooms) // 2 :])
    with tempfile.TemporaryDirectory(prefix="rooms-bench-") as directory:
        state = Path(directory) / "rooms.sqlite"
        spec = counter_sync("memory", ("--state", str(state)))
        result: Result = {
            "server": server_command(spec, o.host).replace(str(state), "TMP/rooms.sqlite")
        }
        with running(spec, load, o) as server:
            wait_idle(server.pid, timeout=o.timeout)
            rss = [rss_bytes(server.pid)]
            say(f"memory: {o.memory_rooms} rooms joined and left, --state")
            with PeakRss(server.pid) as peak:
                for half in halves:
                    visits = cycle(load, server.url, half, o)
                    result.setdefault("halves", []).append(visits)
                    result["server_idle_after"] = wait_idle(server.pid, timeout=o.timeout)
                    rss.append(rss_bytes(server.pid))
            health = healthz(server)
        stored = counted_rows(state, prefix)
    pluses = sum(plus for _, plus in rooms)
    visited = sum(h["visited"] for h in result["halves"])
    result.update(
        {
            "rooms": o.memory_rooms,
            "concurrency": o.memory_concurrency * o.workers,
            "visited": visited,
            "failed": sum(h["failed"] for h in result["halves"]),
            "pluses": sum(h["pluses"] for h in result["halves"]),
            "connect_errors": [e for h in result["halves"] for e in h["connect_errors"]],
            "users_after": health["users"],
            "rooms_in_use_after": health.get("rooms"),
            "stored": stored,
            "rss_start_mib": rss[0] / MIB,
            "rss_half_mib": rss[1] / MIB,
            "rss_peak_mib": peak.peak / MIB,
            "rss_end_mib": rss[2] / MIB,
            "growth_mib": (rss[2] - rss[0]) / MIB,
            "converged": visited == o.memory_rooms
            and stored == {"rows": pluses, "at_one": pluses}
            and health["users"] == 0,
        }
    )
    return result


# --- phase 4: a burst in a big room, a small room's round trips ----------------


def isolation_plan(load: LoadGen, big: str, small: str, o: Options) -> dict[int, dict[str, int]]:
    """Big room over the listener processes (+1 for its driver in the first), the
    prober alone in the driver process, the small room's other users with the listeners."""
    plan: dict[int, dict[str, int]] = {}
    small_shares = [len(x) for x in deal(range(o.small_room - 1), o.workers)]
    for w, (n, m) in enumerate(zip(load.split(o.big_room), small_shares, strict=True)):
        plan[w] = {big: n + (w == 0), **({small: m} if m else {})}
    plan[load.driver_id] = {small: 1}
    return plan


def burst_once(load: LoadGen, big: str, o: Options) -> tuple[float, float | None]:
    """One pipelined burst in the big room; (its start, when the last listener had it)."""
    listeners = range(o.workers)
    ask_all(load, {w: ("expect_added", {"added": o.burst, "rooms": [big]}) for w in listeners}, 5)
    started = ask_all(load, {0: ("burst_room", {"room": big, "count": o.burst})}, o.timeout)[0]
    waited = ask_all(
        load,
        {w: ("wait_rooms", {"limit": o.timeout, "rooms": [big]}) for w in listeners},
        o.timeout,
    )
    done = total(waited, "reached") == total(waited, "open") and total(waited, "open") > 0
    last = max((r["last"] for r in waited if r["last"] is not None), default=None)
    return started["started"], last if done else None


def phase_isolation(load: LoadGen, o: Options) -> Result:
    """Probe a small room's round trip, first quiet, then during back-to-back bursts."""
    spec = counter_sync("isolation", NO_PINGS)
    big, small = f"big-{o.tag}", f"small-{o.tag}"
    prober = load.driver_id
    result: Result = {
        "server": server_command(spec, o.host),
        "big_room": o.big_room,
        "burst": o.burst,
    }
    with running(spec, load, o) as server:
        say(f"isolation: {o.big_room} listeners in one room, {o.small_room} in another")
        drivers = {0: [big], prober: [small]}
        result["join"] = join(load, server.url, isolation_plan(load, big, small, o), drivers, o)
        wait_idle(server.pid, timeout=o.timeout)
        ask_all(load, {prober: ("probe_start", {"room": small, "interval": o.probe_interval})}, 5)
        quiet = (time.monotonic(), time.monotonic() + o.baseline)
        time.sleep(o.baseline)
        say(f"isolation: {o.bursts} bursts of {o.burst} while the small room probes")
        windows: list[tuple[float, float]] = []
        for _ in range(o.bursts):
            started, last = burst_once(load, big, o)
            if last is None:
                break
            windows.append((started, last))
        stopped = ask_all(
            load, {prober: ("probe_stop", {"room": small, "limit": o.timeout})}, o.timeout
        )[0]
        everyone = list(range(o.workers))
        ask_all(
            load, {w: ("expect_final", {"values": {small: stopped["value"]}}) for w in everyone}, 5
        )
        ask_all(
            load,
            {w: ("wait_rooms", {"limit": o.timeout, "rooms": [small]}) for w in everyone},
            o.timeout,
        )
        check = checked(
            ask_all(load, {w: ("check_rooms", {}) for w in [*everyone, prober]}, o.timeout)
        )
    probes: list[tuple[float, float | None]] = [(at, d) for at, d in stopped["probes"]]

    def during(windows: list[tuple[float, float]]) -> Result:
        inside = [d for at, d in probes if any(a <= at <= b for a, b in windows)]
        summary = delay_summary([d for d in inside if d is not None])
        return {**summary, "unanswered": sum(d is None for d in inside)}

    result.update(
        {
            "bursts_done": len(windows),
            "burst_seconds": [b - a for a, b in windows],
            "probes": len(probes),
            "quiet": during([quiet]),
            "bursting": during(windows),
            "check": check,
            "converged": len(windows) == o.bursts
            and check["exact"] == check["listeners"] == o.big_room + 1 + o.small_room
            and all(d is not None for _, d in probes),
        }
    )
    return result


# --------------------------------------------------------------------------
# Targets, table, JSON
# --------------------------------------------------------------------------


def verdict(value: Any, op: str, bound: Any) -> str:
    if value is None:
        return "n/a"
    if op == "==":
        return "PASS" if value else "FAIL"
    if op == "<=":
        return "PASS" if value <= bound else "FAIL"
    return "PASS" if value < bound else "FAIL"


def targets(phases: dict[str, Result], o: Options) -> list[Result]:
    """Each target's measured value and verdict; n/a for a phase not run or failed."""
    fan, cost = phases.get("fanout", {}), phases.get("cost", {})
    memory, isolation = phases.get("memory", {}), phases.get("isolation", {})
    fan_check = fan.get("check")
    measured: dict[str, Any] = {
        "fanout_exact": fan.get("converged") if fan_check else None,
        "fanout_floor": fan.get("x_floor"),
        "cost_ratio": cost.get("ratio"),
        "memory_growth": memory.get("growth_mib"),
        "isolation_p99": (isolation.get("bursting") or {}).get("p99_ms"),
    }
    shown: dict[str, str] = {
        "fanout_exact": f"{fmt(fan_check['exact'])}/{fmt(o.rooms * o.per_room)}"
        if fan_check
        else "-",
    }
    out = []
    for key, label, op, bound in TARGETS:
        value = measured[key]
        out.append(
            {
                "target": label,
                "measured": value,
                "shown": shown.get(key, fmt(value)),
                "op": op,
                "bound": bound,
                "verdict": verdict(value, op, bound),
            }
        )
    return out


def lines_fanout(r: Result) -> list[str]:
    check, delays, joined = r["check"], r["check"]["delays"], r["join"]
    wrong = f"  ({'; '.join(check['wrong'])})" if check["wrong"] else ""
    missing = f", {fmt(check['missing'])} never seen" if check["missing"] else ""
    return [
        f"   joined {fmt(joined['connected'])} of {fmt(joined['planned'])}"
        f" in {joined['seconds']:.1f} s (server counts {fmt(r['server_users'])} users);"
        f" {fmt(r['actions'])} actions sent, latest {fmt(r['late_send_max_ms'])} ms late",
        f"   on the room's exact value: {fmt(check['exact'])} of {fmt(check['listeners'])}{wrong}",
        f"   delivery delay p50/p99/max (ms): {fmt(delays['p50_ms'])} / {fmt(delays['p99_ms'])}"
        f" / {fmt(delays['max_ms'])} over {fmt(delays['count'])} deliveries{missing}",
        f"   server CPU: {fmt(r['server_cpu_seconds'])} s for {fmt(r['deliveries'])} deliveries"
        f" = {fmt(r['cpu_us_per_delivery'])} us each; floor {fmt(r['floor_us_per_delivery'])} us"
        f" -> x{fmt(r['x_floor'])}",
        f"   (the floor in this phase's pattern, {r['per_room']} sockets per round:"
        f" {fmt(r['room_floor_us_per_delivery'])} us -> x{fmt(r['x_room_floor'])})",
        f"   CPU busy: server {r['server_busy']:.0%}, busiest load process {r['loadgen_busy']:.0%}",
    ]


def lines_cost(r: Result) -> list[str]:
    def row(name: str, c: Result) -> str:
        values = ", ".join(fmt(v) for v in c["cpu_us_per_action"])
        return (
            f"   {name}: CPU per action (us) {values}; median {fmt(c['median_us'])}"
            f" (idle server: {fmt(c['idle_cpu_ms_per_s'])} ms CPU/s)"
        )

    return [
        row("alone         ", r["alone"]),
        row("among others  ", r["crowded"]),
        f"   others connected: {fmt(r['fill']['connected'])} (server counts"
        f" {fmt(r['server_users'])} users in all); ratio of medians {fmt(r['ratio'])}",
    ]


def lines_memory(r: Result) -> list[str]:
    stored = r["stored"]
    return [
        f"   visited {fmt(r['visited'])} of {fmt(r['rooms'])} rooms, {fmt(r['pluses'])} with a"
        f" plus; the file holds {fmt(stored['rows'])} rows for them, {fmt(stored['at_one'])} at 1;"
        f" users after: {fmt(r['users_after'])}",
        f"   server RSS (MiB): start {r['rss_start_mib']:.1f}, after half the rooms"
        f" {r['rss_half_mib']:.1f}, peak {r['rss_peak_mib']:.1f}, end {r['rss_end_mib']:.1f}"
        f" (end - start {r['growth_mib']:+.2f}); {r['concurrency']} rooms at a time",
    ]


def lines_isolation(r: Result) -> list[str]:
    def row(name: str, s: Result) -> str:
        unanswered = f", {s['unanswered']} unanswered" if s["unanswered"] else ""
        return (
            f"   {name}: small room sees its own action p50/p99/max (ms) {fmt(s['p50_ms'])} /"
            f" {fmt(s['p99_ms'])} / {fmt(s['max_ms'])} over {fmt(s['count'])} probes{unanswered}"
        )

    seconds = r["burst_seconds"]
    return [
        row("quiet   ", r["quiet"]),
        row("bursting", r["bursting"]),
        f"   bursts done: {r['bursts_done']}, each {fmt(min(seconds, default=None))}-"
        f"{fmt(max(seconds, default=None))} s until all {fmt(r['big_room'])} listeners had it;"
        f" exact values: {fmt(r['check']['exact'])} of {fmt(r['check']['listeners'])}",
    ]


TITLES: dict[str, Callable[[Options], str]] = {
    "fanout": lambda o: (
        f"1. fan-out: {fmt(o.rooms)} rooms x {o.per_room} connections, "
        f"{o.rate:g} action/s per room for {o.duration:g} s"
    ),
    "cost": lambda o: (
        f"2. cost follows the room: {o.cost_users}-user room, {o.cost_actions} actions at "
        f"{o.cost_rate:g}/s, alone vs {fmt(o.others)} others in {fmt(o.other_rooms)} rooms"
    ),
    "memory": lambda o: f"3. memory: {fmt(o.memory_rooms)} rooms joined and left once, --state",
    "isolation": lambda o: (
        f"4. isolation: {o.bursts} bursts of {fmt(o.burst)} in a "
        f"{fmt(o.big_room)}-listener room, a {o.small_room}-user room acting every "
        f"{o.probe_interval * 1e3:g} ms"
    ),
}
LINES: dict[str, Callable[[Result], list[str]]] = {
    "fanout": lines_fanout,
    "cost": lines_cost,
    "memory": lines_memory,
    "isolation": lines_isolation,
}


def connect_errors(result: Result) -> list[str]:
    """The commonest connection failures of a phase, wherever they happened in it."""
    steps = [result, *(result.get(step) or {} for step in ("join", "fill"))]
    return [e for step in steps for e in step.get("connect_errors", [])]


def render(report: Result, o: Options) -> str:
    env = report["environment"]
    lines = [
        f"command: {report['command']}",
        f"commit {env['commit']}, Python {env['python']}, websockets {env['websockets']}, "
        f"uvloop {env['uvloop']}, {env['cpus']} CPUs, load average before "
        f"{env['loadavg'][0]:.2f}, after {env['loadavg_after'][0]:.2f}",
    ]
    floor = report["floor"]
    if floor:
        lines.append(
            f"socket.send floor: {floor['cpu_us_per_message']:.2f} us CPU per delivered "
            f"{floor['frame_bytes']}-byte frame ({fmt(floor['delivered'])} of "
            f"{fmt(floor['messages'])} over {fmt(floor['connections'])} sockets, "
            f"{floor['rate']:g} rounds/s)"
        )
    room_floor = report["room_floor"]
    if room_floor:
        lines.append(
            f"the same, one room's {room_floor['per_room']} sockets per round, rooms in turn: "
            f"{room_floor['cpu_us_per_message']:.2f} us ({fmt(room_floor['delivered'])} of "
            f"{fmt(room_floor['messages'])} delivered)"
        )
    for name in o.phases:
        result = report["phases"].get(name, {})
        lines.append("")
        lines.append(TITLES[name](o))
        if "server" in result:
            lines.append(f"   server: {result['server']}")
        for error in [*result.get("errors", []), *connect_errors(result)]:
            lines.append(f"   error: {error}")
        if "converged" in result:
            lines.extend(LINES[name](result))
            if not result["converged"]:
                lines.append("   NOT CONVERGED: see the JSON")
    lines.append("")
    lines.append("Targets (measured in this run):")
    for t in report["targets"]:
        lines.append(
            f"  {t['verdict']:4}  {t['target']:58} {t['shown']:>13}  target {t['op']} {t['bound']}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rooms",
        description="Measure counter-sync's rooms: fan-out over many small rooms, "
        "cost per action among idle rooms, memory after many rooms, isolation from a burst.",
        epilog="Numbers in [brackets] are the full run's defaults; --quick uses "
        + ", ".join(f"{k}={v:g}" for k, v in QUICK.items() if v != FULL[k])
        + ".",
    )
    for name, default in FULL.items():
        kind = int if name in INTEGERS else float
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, help=f"{HELP[name]} [{default:g}]"
        )
    add = parser.add_argument
    add(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated phases to run (default: %(default)s)",
    )
    add("--workers", type=int, default=2, help="listener load processes (default: %(default)s)")
    add("--host", default="127.0.0.1", help="loopback address (default: %(default)s)")
    add(
        "--output",
        type=Path,
        default=RESULTS,
        help="JSON results (default: bench/results/rooms.json)",
    )
    add(
        "--no-floor",
        action="store_true",
        help="skip the socket.send floor (fan-out shows no ratio)",
    )
    add("--quick", action="store_true", help="a small smoke run (seconds, not minutes)")
    args = parser.parse_args(argv)
    for name in FULL:
        if getattr(args, name) is None:
            value = (QUICK if args.quick else FULL)[name]
            setattr(args, name, int(value) if name in INTEGERS else value)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {list(PHASES)}")
    for name in (*FULL, "workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not args.host.startswith("127."):
        parser.error("--host must be a 127.x loopback address: the bench sends nothing elsewhere")
    return args


def options(args: argparse.Namespace) -> Options:
    values = {name: getattr(args, name) for name in FULL}
    return Options(
        **values,
        workers=args.workers,
        host=args.host,
        phases=tuple(p for p in PHASES if p in args.phases.split(",")),
        floor=not args.no_floor,
        log_dir=args.output.parent / "logs",
        tag=uuid.uuid4().hex[:8],
    )


def run_phase(name: str, load: LoadGen, o: Options, floors: Floors) -> Result:
    """One phase; a failure is recorded in its result, and the next phase still runs."""
    if not load.healthy():
        load.close()
        load.start()
    try:
        if name == "fanout":
            return phase_fanout(load, o, floors)
        if name == "cost":
            return phase_cost(load, o)
        if name == "memory":
            return phase_memory(load, o)
        return phase_isolation(load, o)
    except (LoadGenError, RuntimeError, OSError, KeyError) as exc:
        return {"errors": [f"{type(exc).__name__}: {exc}"]}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    o = options(args)
    limit = raise_fd_limit()
    needed = max(o.rooms * o.per_room, o.others, o.big_room) // o.workers + 64
    if needed > limit:
        print(
            f"warning: {needed} descriptors per load process needed, limit is {limit}",
            file=sys.stderr,
        )
    command = shlex.join(
        ["python3", "-m", "bench.rooms", *(sys.argv[1:] if argv is None else argv)]
    )
    report: Result = {
        "command": command,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
        "environment": environment(),
        "floor": None,
        "room_floor": None,
        "phases": {},
    }
    started = time.monotonic()
    if "fanout" in o.phases and o.floor:
        say(f"floor: socket.send over {o.rooms * o.per_room} sockets at {o.rate:g} rounds/s")
        report["floor"] = measure_floor(
            connections=o.rooms * o.per_room, rate=o.rate, duration=o.duration, timeout=o.timeout
        )
        say(f"floor: the same sockets, {o.per_room} at a time, {o.rooms * o.rate:g} rounds/s")
        report["room_floor"] = measure_room_floor(
            rooms=o.rooms, per_room=o.per_room, rate=o.rate, duration=o.duration, timeout=o.timeout
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    load = LoadGen(workers=o.workers, host=o.host, kind=RoomWorker)
    try:
        load.start()
        for name in o.phases:
            floors = (report["floor"], report["room_floor"])
            report["phases"][name] = run_phase(name, load, o, floors)
            # Saved after every phase, so an interrupted run keeps what it measured.
            args.output.write_text(json.dumps(report, indent=2) + "\n")
    except LoadGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        load.close()
    report["seconds"] = time.monotonic() - started
    report["environment"]["loadavg_after"] = loadavg()
    report["targets"] = targets(report["phases"], o)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report, o))
    print(f"\nresults written to {args.output} ({report['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
