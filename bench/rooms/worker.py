"""Inside a load process of the rooms bench: connections in named rooms, and their commands.

:class:`RoomWorker` adds room commands to :class:`bench.listeners.Worker`;
it is defined at module level so that the spawned processes can import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from bench.listeners import (
    PLUS,
    Group,
    Listener,
    Reply,
    Worker,
    seen_after,
    summarize_errors,
)
from bench.reporting import spread_ms

# Only the load processes send; LoadGen.start() says what to install without it.
with contextlib.suppress(ImportError):
    from picows import WSMsgType

__all__ = ["RoomWorker", "room_url"]


def room_url(server_url: str, room: str) -> str:
    """The WebSocket URL of room `room` on the server at `server_url` (``ws://h:p/``)."""
    return f"{server_url.rstrip('/')}/c/{room}"


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
        reply = await self.hold_all(urls, concurrency, limit)
        freeze_heap()
        return reply

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
            "late_p99_ms": spread_ms(late)["p99_ms"],
            "late_max_ms": spread_ms(late)["max_ms"],
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
