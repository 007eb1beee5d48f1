"""``--redis URL``: instances share every room's exact counter and user count through Redis.

Each test gets its own ``redis-server`` on a free port, without persistence.
Instances run in-process, except those killed with a signal or stopped with
SIGTERM; start-up errors run ``python server.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from counter_sync.app import App
from counter_sync.config import MAX_VALUE
from counter_sync.redis_store import STOP_TIMEOUT, Flush, RedisStore, room_keys
from counter_sync.store import DEFAULT_ROOM, OutOfRange
from testkit.processes import ROOT, TIMEOUT, RedisServer, ServerProcess, free_port
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    join,
    require_binary,
    room,
    url,
    wait_for_event,
    wait_for_users,
    wait_for_value,
    wait_until,
)

PLUS = json.dumps({"action": "plus"})
MINUS = json.dumps({"action": "minus"})
MARK = {"type": "error", "error": 'missing "action"'}  # the reply to "{}"
# Short, so that a killed instance drops out quickly; the default is 15 s.
EXPIRY = 2.0
# Long: no renewal of an instance's entry runs a script during the test.
NO_RENEWAL = 60.0
# Scheduling slack on a busy machine, on top of the promised EXPIRY.
SLACK = 0.5
# A SIGTERM'd server exits within this, whatever Redis does.
STOP_BOUND = 3.0

StartShared = Callable[..., Awaitable[App]]


# --- A throwaway Redis ----------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    redis = RedisServer(require_binary("redis-server"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def start_shared(redis_server: RedisServer, start_server: StartServer) -> StartShared:
    """Start in-process instances that share ``redis_server``."""

    async def start(**overrides: Any) -> App:
        options: dict[str, Any] = {"redis": redis_server.url, "redis_expiry": EXPIRY}
        return await start_server(**(options | overrides))

    return start


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """The test's own connection to ``redis_server``, to look and to break things."""
    async with Redis.from_url(redis_server.url, decode_responses=True) as redis:
        yield redis


@pytest.fixture
def shared_process(redis_server: RedisServer, server_process: StartProcess) -> StartProcess:
    """Start ``python server.py --redis`` instances that share ``redis_server``."""

    def start(*args: str) -> ServerProcess:
        return server_process("--redis", redis_server.url, "--redis-expiry", str(EXPIRY), *args)

    return start


# --- Helpers --------------------------------------------------------------------


async def events_until_now(websocket: ClientConnection) -> list[dict[str, Any]]:
    """Every event sent to this client before now.

    A bad message's error reply comes after every broadcast already sent on
    the connection, so it marks the end of what to read.
    """
    await websocket.send("{}")
    events = []
    async with asyncio.timeout(TIMEOUT):
        while (event := json.loads(await websocket.recv())) != MARK:
            events.append(event)
    return events


def last_value(events: list[dict[str, Any]]) -> int | None:
    values = [event["value"] for event in events if event["type"] == "state"]
    return values[-1] if values else None


def rejected(events: list[dict[str, Any]]) -> int:
    """How many of its actions a client was told were not applied."""
    return sum(int(event["error"].split()[2]) for event in events if store_error(event))


def store_error(event: dict[str, Any]) -> bool:
    return event["type"] == "error" and str(event["error"]).startswith("store unavailable")


async def health(app: App, path: str = "/readyz") -> int:
    """The status code of ``GET /readyz`` (or ``path``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    status_line = await asyncio.wait_for(reader.readline(), TIMEOUT)
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


def idle(*apps: App) -> Callable[[], bool]:
    """True once every instance is connected to Redis and has flushed everything."""
    return lambda: all(room(app).store.healthy() and room(app).flush_task is None for app in apps)


def settled(*apps: App, value: int, name: str = DEFAULT_ROOM) -> Callable[[], bool]:
    """True once every instance holds ``value`` in room ``name`` and has broadcast it."""

    def check() -> bool:
        rooms = [room(app, name) for app in apps]
        return all(each.value == value and each.flush_task is None for each in rooms)

    return check


def store_of(app: App) -> RedisStore:
    store = app.hub.store
    assert isinstance(store, RedisStore)
    return store


async def join_process(process: ServerProcess, path: str = "/") -> ClientConnection:
    """Join a room of a ``server.py`` subprocess; read its connect sequence."""
    websocket = await connect(f"ws://127.0.0.1:{process.port}{path}")
    for kind in ("users", "state"):
        event = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
        assert event["type"] == kind
    return websocket


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Ask Redis (or anyone slow) until the answer is yes; fail after TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while not await condition():  # noqa: ASYNC110 - Redis has no event for these
            await asyncio.sleep(0.01)


async def subscribers(redis: Redis, name: str) -> int:
    """How many connections are subscribed to room ``name``'s channel (PUBSUB NUMSUB)."""
    [(_, count)] = await redis.pubsub_numsub(room_keys(name, 0).channel)
    return int(count)


async def held_flushes(redis: Redis) -> set[str]:
    """The instances (client names) with a script that paused Redis holds unexecuted."""
    clients = await redis.client_list()
    return {
        client["name"]
        for client in clients
        if "b" in client["flags"] and client["cmd"] == "evalsha" and client["name"]
    }


async def stop_in_thread(process: ServerProcess) -> tuple[int, float]:
    """SIGTERM and wait up to STOP_BOUND, the test's loop running on; the code and seconds."""
    started = time.monotonic()
    returncode, _ = await asyncio.to_thread(process.stop, STOP_BOUND)
    return returncode, time.monotonic() - started


# --- Sharing ----------------------------------------------------------------------


async def test_a_click_on_one_instance_shows_on_both(start_shared: StartShared) -> None:
    a, b = await start_shared(), await start_shared()
    alice, bob = await join(a), await join(b)
    await alice.send(PLUS)
    await wait_for_value(alice, 1)
    await wait_for_value(bob, 1)
    await bob.send(MINUS)
    await wait_for_value(alice, 0)
    await wait_for_value(bob, 0)


async def test_the_user_count_is_the_total_over_instances(start_shared: StartShared) -> None:
    a, b = await start_shared(), await start_shared()
    alice = await join(a)
    bob = await connect(url(b))  # its first count may be 2 already
    await wait_for_users(bob, 2)
    await wait_for_users(alice, 2)
    carol = await join(b)
    await wait_for_users(alice, 3)
    await carol.close()
    await wait_for_users(alice, 2)
    await wait_for_users(bob, 2)


async def test_concurrent_actions_on_both_instances_end_every_client_on_the_exact_sum(
    start_shared: StartShared,
) -> None:
    a, b = await start_shared(), await start_shared()
    clients = [await join(app) for app in (a, b) for _ in range(10)]
    rng = random.Random(4)
    plans = [[rng.choice([PLUS, MINUS]) for _ in range(30)] for _ in clients]
    expected = sum(+1 if action == PLUS else -1 for plan in plans for action in plan)

    async def play(websocket: ClientConnection, plan: list[str]) -> None:
        for action in plan:
            await websocket.send(action)
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # let the other clients and both hubs run

    await asyncio.gather(*(play(client, plan) for client, plan in zip(clients, plans, strict=True)))
    await wait_until(settled(a, b, value=expected))
    for client in clients:
        assert last_value(await events_until_now(client)) == expected


async def test_concurrent_actions_in_several_rooms_end_every_client_on_its_rooms_exact_sum(
    start_shared: StartShared,
) -> None:
    a, b = await start_shared(), await start_shared()
    paths = ["/", "/c/red", "/c/Red", "/c/blue-2"]  # names are case-sensitive
    clients = [(path, await join(app, path)) for path in paths for app in (a, b, a)]
    rng = random.Random(7)
    plans = [[rng.choice([PLUS, MINUS]) for _ in range(25)] for _ in clients]
    expected = dict.fromkeys(paths, 0)
    for (path, _), plan in zip(clients, plans, strict=True):
        expected[path] += sum(+1 if action == PLUS else -1 for action in plan)

    async def play(websocket: ClientConnection, plan: list[str]) -> None:
        for action in plan:
            await websocket.send(action)
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    await asyncio.gather(
        *(play(client, plan) for (_, client), plan in zip(clients, plans, strict=True))
    )
    for path in paths:
        name = DEFAULT_ROOM if path == "/" else path.removeprefix("/c/")
        await wait_until(settled(a, b, value=expected[path], name=name))
    for path, client in clients:
        assert last_value(await events_until_now(client)) == expected[path]


async def test_each_room_counts_its_own_users_on_every_instance(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(), await start_shared()
    home = await join(a)
    red_a = [await join(a, "/c/red") for _ in range(2)]
    blue = [await join(b, "/c/blue") for _ in range(3)]
    # Once A's count in red is in Redis, a newcomer on B is shown it at once.
    await until(lambda: has_users(redis_client, "red", 2))
    red_b = await connect(f"{url(b)}c/red")
    first = json.loads(await asyncio.wait_for(red_b.recv(), TIMEOUT))
    assert first == {"type": "users", "count": 3}
    for client in red_a:
        await wait_for_users(client, 3)
    for client in blue[:2]:  # the last one's connect sequence said 3
        await wait_for_users(client, 3)
    await blue[0].close()
    await wait_for_users(blue[1], 2)
    await red_a[0].close()
    await wait_for_users(red_b, 2)
    # Nothing crossed rooms: / only ever counted its one user.
    counts = [e["count"] for e in await events_until_now(home) if e["type"] == "users"]
    assert set(counts) <= {1}


async def has_users(redis: Redis, name: str, count: int) -> bool:
    """True once the instances' counts in room ``name`` add up to ``count`` in Redis."""
    counts = await redis.hvals(room_keys(name, 0).users)
    return sum(int(each) for each in counts) == count


async def test_an_instance_that_stops_leaves_the_count_at_once(start_shared: StartShared) -> None:
    a, b = await start_shared(), await start_shared()
    alice = await join(a)
    await join(b)
    await wait_for_users(alice, 2)
    await b.close()
    async with asyncio.timeout(EXPIRY / 2):  # not waiting for the expiry
        await wait_for_users(alice, 1)


async def test_an_instance_that_stops_leaves_every_room_at_once(start_shared: StartShared) -> None:
    a, b = await start_shared(), await start_shared()
    paths = ["/", "/c/red", "/c/blue"]
    here = [await join(a, path) for path in paths]
    for path in paths:
        await join(b, path)
    for client in here:
        await wait_for_users(client, 2)
    await b.close()
    async with asyncio.timeout(EXPIRY / 2):  # not waiting for the expiry
        for client in here:
            await wait_for_users(client, 1)


async def test_a_killed_instance_drops_out_of_the_count_within_the_expiry(
    start_shared: StartShared,
    redis_server: RedisServer,
    server_process: StartProcess,
) -> None:
    a = await start_shared()
    b = server_process("--port", "0", "--redis", redis_server.url, "--redis-expiry", str(EXPIRY))
    alice = await join(a)
    async with connect(b.url):
        await wait_for_users(alice, 2)
        loop = asyncio.get_running_loop()
        b.process.kill()
        killed_at = loop.time()
        await wait_for_users(alice, 1)
        assert loop.time() - killed_at <= EXPIRY + SLACK


async def test_a_killed_instance_drops_out_of_every_room_within_the_expiry(
    start_shared: StartShared, shared_process: StartProcess
) -> None:
    a = await start_shared()
    b = shared_process()
    paths = ["/", "/c/red", "/c/blue"]
    here = [await join(a, path) for path in paths]
    for path in paths:
        for _ in range(2):
            await join_process(b, path)
    for client in here:
        await wait_for_users(client, 3)
    loop = asyncio.get_running_loop()
    b.process.kill()
    killed_at = loop.time()
    for client in here:
        await wait_for_users(client, 1)
    assert loop.time() - killed_at <= EXPIRY + SLACK


# --- No work for rooms without users here -------------------------------------


async def test_an_instance_subscribes_only_to_the_rooms_it_has_users_in(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(), await start_shared()
    alice = await join(a, "/c/red")
    bob = await join(b, "/c/blue")
    # Each instance holds / (it is always open) and the one room it has users in.
    assert await subscribers(redis_client, DEFAULT_ROOM) == 2
    assert await subscribers(redis_client, "red") == 1
    assert await subscribers(redis_client, "blue") == 1
    # B is not told of red's changes: it has no users there.
    await alice.send(PLUS)
    await wait_for_value(alice, 1)
    assert "red" not in store_of(b).rooms
    await alice.close()
    await until(lambda: no_subscribers(redis_client, "red"))
    channels = await redis_client.pubsub_channels()
    assert room_keys("red", 0).channel not in channels
    assert room_keys("blue", 0).channel in channels
    await bob.close()
    await until(lambda: no_subscribers(redis_client, "blue"))


async def no_subscribers(redis: Redis, name: str) -> bool:
    return await subscribers(redis, name) == 0


async def test_leaving_and_rejoining_a_room_at_once_keeps_it_subscribed(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(), await start_shared()
    bob = await join(b, "/c/red")
    # Each leave releases the room and the next join opens it again: the
    # unsubscription and the subscription must reach Redis in that order.
    for _ in range(5):
        alice = await join(a, "/c/red")
        await alice.close()
    alice = await join(a, "/c/red")
    await wait_for_users(bob, 2)
    await until(lambda: subscribed_by(redis_client, "red", 2))
    await bob.send(PLUS)
    await wait_for_value(alice, 1)


async def subscribed_by(redis: Redis, name: str, count: int) -> bool:
    return await subscribers(redis, name) == count


# --- The single-counter version's keys --------------------------------------------


async def test_the_default_room_keeps_the_keys_and_channel_of_the_single_counter_version(
    start_shared: StartShared, redis_client: Redis
) -> None:
    app = await start_shared()
    alice = await join(app)
    await alice.send(PLUS)
    await wait_for_value(alice, 1)
    assert await redis_client.hget("counter-sync:state", "value") == "1"
    # What an instance of the previous version does on a flush and a join:
    value = await redis_client.hincrby("counter-sync:state", "value", 2)
    seq = await redis_client.hincrby("counter-sync:state", "seq", 1)
    state = {"type": "state", "value": value, "seq": seq}
    await redis_client.publish("counter-sync:0:changes", json.dumps(state))
    await wait_for_value(alice, 3)
    await redis_client.zadd("counter-sync:alive", {"old": time.time() * 1000 + 60_000})
    await redis_client.hset("counter-sync:users", "old", 4)
    users = await redis_client.hgetall("counter-sync:users")
    seq = await redis_client.incr("counter-sync:users:seq")
    message = {"type": "users", "seq": seq, "users": {k: int(v) for k, v in users.items()}}
    await redis_client.publish("counter-sync:0:changes", json.dumps(message))
    await wait_for_users(alice, 5)


# --- Range ------------------------------------------------------------------------


async def test_redis_refuses_a_change_beyond_the_range_and_applies_none_of_it(
    start_shared: StartShared, redis_client: Redis
) -> None:
    big = room_keys("big", 0).state
    await redis_client.hset(big, mapping={"value": MAX_VALUE - 1, "seq": 1})
    a = await start_shared(redis_expiry=NO_RENEWAL)
    b = await start_shared(redis_expiry=NO_RENEWAL)
    alice, bob = await join(a, "/c/big"), await join(b, "/c/big")
    await until(lambda: has_users(redis_client, "big", 2))  # no users script is due
    # Both instances think one more fits; Redis holds both flushes, then
    # applies the first it runs and refuses the second.
    await redis_client.client_pause(60_000, all=False)  # writes only
    try:
        await alice.send(PLUS)
        await bob.send(PLUS)
        await until(lambda: held_by(redis_client, 2))
    finally:
        await redis_client.client_unpause()
    events = [await events_until_now(client) for client in (alice, bob)]
    await wait_until(settled(a, b, value=MAX_VALUE, name="big"))
    for client, seen in zip((alice, bob), events, strict=True):
        seen += await events_until_now(client)
    refusals = [e for seen in events for e in seen if e["type"] == "error"]
    assert refusals == [{"type": "error", "error": "value out of range: 1 action(s) not applied"}]
    assert [last_value(seen) for seen in events] == [MAX_VALUE, MAX_VALUE]
    assert await redis_client.hgetall(big) == {"value": str(MAX_VALUE), "seq": "2"}


async def held_by(redis: Redis, count: int) -> bool:
    return len(await held_flushes(redis)) == count


async def test_the_store_raises_out_of_range_below_the_range_too(
    start_shared: StartShared, redis_client: Redis
) -> None:
    low = room_keys("low", 0).state
    await redis_client.hset(low, mapping={"value": -MAX_VALUE + 1, "seq": 7})
    app = await start_shared()
    await join(app, "/c/low")
    with pytest.raises(OutOfRange):
        await store_of(app).add("low", -2)
    assert await redis_client.hgetall(low) == {"value": str(-MAX_VALUE + 1), "seq": "7"}
    assert await store_of(app).add("low", -1) == -MAX_VALUE


# --- Outages --------------------------------------------------------------------


async def test_while_redis_is_down_actions_get_errors_and_afterwards_clients_converge(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    a, b = await start_shared(), await start_shared()
    alice, bob = await join(a), await join(b)
    await alice.send(PLUS)
    await wait_for_value(bob, 1)

    redis_server.stop()
    await alice.send(PLUS)
    await bob.send(MINUS)
    await wait_for_event(alice, store_error)
    await wait_for_event(bob, store_error)

    redis_server.start()  # persistence is off: Redis now holds 0
    await wait_for_value(alice, 0)
    await wait_for_value(bob, 0)
    await bob.send(PLUS)
    await wait_for_value(alice, 1)
    await wait_for_value(bob, 1)


async def test_after_an_outage_every_room_resyncs(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    a, b = await start_shared(), await start_shared()
    paths = ["/", "/c/red", "/c/blue"]
    pairs = [(await join(a, path), await join(b, path)) for path in paths]
    for count, (alice, bob) in enumerate(pairs, start=1):
        for _ in range(count):
            await alice.send(PLUS)
        await wait_for_value(bob, count)

    redis_server.stop()
    for alice, _ in pairs:
        await alice.send(PLUS)
        await wait_for_event(alice, store_error)

    redis_server.start()  # persistence is off: every room is back at 0
    for alice, bob in pairs:
        await wait_for_value(alice, 0)
        await wait_for_value(bob, 0)
    for count, (_, bob) in enumerate(pairs, start=1):
        for _ in range(count):
            await bob.send(MINUS)
    for count, (alice, bob) in enumerate(pairs, start=1):
        await wait_for_value(alice, -count)
        await wait_for_value(bob, -count)
    # Each instance counted itself again in each room it has users in.
    for name in (DEFAULT_ROOM, "red", "blue"):
        await wait_until(lambda: all(room(app, name).count_users() == 2 for app in (a, b)))  # noqa: B023


async def test_dropped_connections_to_redis_neither_lose_nor_double_an_action(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(redis_expiry=NO_RENEWAL), await start_shared(redis_expiry=NO_RENEWAL)
    clients = [await join(app) for app in (a, b) for _ in range(5)]
    await until(lambda: has_users(redis_client, DEFAULT_ROOM, len(clients)))  # none is due
    before, during, after = 15, 20, 5
    sent = before + during + after

    async def play(count: int) -> None:
        async def one(websocket: ClientConnection) -> None:
            # Only "plus": a client's error replies say how many did not count.
            for _ in range(count):
                await websocket.send(PLUS)
                await asyncio.sleep(0)  # spread the actions over many flushes

        await asyncio.gather(*(one(client) for client in clients))

    await play(before)
    await wait_until(settled(a, b, value=before * len(clients)))
    # Redis holds every script from now on, unexecuted. Once both instances
    # have a flush held there, each has actions in flight when the blip
    # comes: those cannot be counted, and their senders are told so.
    await redis_client.client_pause(60_000, all=False)  # writes only
    try:
        playing = asyncio.ensure_future(play(during))
        await until(lambda: held_by(redis_client, 2))
        # As a network blip would: every connection drops, Redis keeps its data.
        await redis_client.client_kill_filter(_type="normal", skipme=True)
        await redis_client.client_kill_filter(_type="pubsub")
    finally:
        await redis_client.client_unpause()
    await playing
    await wait_until(idle(a, b))
    await play(after)
    # Once a client's mark comes back, its hub has all of its actions.
    events = [await events_until_now(client) for client in clients]
    await wait_until(idle(a, b))
    stored = int(await redis_client.hget(room_keys(DEFAULT_ROOM, 0).state, "value") or 0)
    await wait_until(settled(a, b, value=stored))
    for client, seen in zip(clients, events, strict=True):
        seen += await events_until_now(client)

    not_counted = sum(rejected(seen) for seen in events)
    assert not_counted > 0  # the blip did hit some actions
    assert stored == sent * len(clients) - not_counted
    assert [last_value(seen) for seen in events] == [stored] * len(clients)


async def test_readyz_answers_503_while_redis_is_down_and_200_once_it_is_back(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    app = await start_shared()
    store = room(app).store
    assert await health(app) == 200
    redis_server.stop()
    await wait_until(lambda: not store.healthy())
    assert await health(app) == 503
    assert await health(app, "/healthz") == 200  # alive all the same
    redis_server.start()
    await wait_until(store.healthy)
    assert await health(app) == 200


async def test_an_outage_is_logged_once_not_once_per_action(
    start_shared: StartShared, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter-sync")
    app = await start_shared()
    alice = await join(app)

    def log_lines(level: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == level]

    redis_server.stop()
    await alice.send(PLUS)
    await wait_for_event(alice, store_error)
    warnings = log_lines("WARNING")
    assert any("unreachable" in line for line in warnings)
    for _ in range(5):
        await alice.send(PLUS)
        await wait_for_event(alice, store_error)
    assert log_lines("WARNING") == warnings
    redis_server.start()
    await wait_until(room(app).store.healthy)
    assert len([line for line in log_lines("INFO") if "is back" in line]) == 1


@pytest.mark.parametrize("path", ["/", "/c/red"])
async def test_a_flush_whose_reply_was_lost_never_counts(
    start_shared: StartShared, path: str
) -> None:
    app = await start_shared()
    alice = await join(app, path)
    store = store_of(app)
    name = DEFAULT_ROOM if path == "/" else path.removeprefix("/c/")
    # A flush that Redis applied but whose reply never came back: to the
    # store it failed, so its senders were told "not applied".
    store.flushes += 1
    flush = Flush(name, store.flushes, 5)
    await add_behind_the_stores_back(store, flush)
    await wait_for_value(alice, 5)
    store.in_doubt.append(flush)
    store.lost(ConnectionError("reply lost"))
    # On reconnection the store makes that true...
    await wait_for_value(alice, 0)
    # ...and neither a delayed copy of the flush nor settling it again changes that.
    assert await add_behind_the_stores_back(store, flush) == 0
    assert await store.run_cancel(flush) == 0
    await alice.send(PLUS)
    await wait_for_value(alice, 1)


async def add_behind_the_stores_back(store: RedisStore, flush: Flush) -> int:
    """Run the store's own script for ``flush``; return the value it reports."""
    reply = await store.run_add(flush)
    assert reply is not None
    return int(json.loads(reply)["value"])


# --- Stopping, whatever Redis does -------------------------------------------------


async def test_sigterm_while_redis_is_stopped_exits_within_the_bound(
    start_shared: StartShared, shared_process: StartProcess, redis_server: RedisServer
) -> None:
    a = await start_shared()
    b = shared_process()
    here = [await join(a, path) for path in ("/", "/c/red")]
    for path in ("/", "/c/red"):
        await join_process(b, path)
    for client in here:
        await wait_for_users(client, 2)
    assert redis_server.child is not None
    redis_pid = redis_server.child.pid
    # Stopped, Redis accepts connections (the kernel does) and answers nothing.
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        returncode, seconds = await stop_in_thread(b)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert returncode == 0
    assert seconds <= STOP_BOUND
    # B's users stop counting: its leave ran once Redis went on, or its entry lapsed.
    for client in here:
        await wait_for_users(client, 1)


async def test_sigterm_after_redis_was_killed_exits_within_the_bound(
    shared_process: StartProcess, redis_server: RedisServer
) -> None:
    b = shared_process()
    for path in ("/", "/c/red"):
        await join_process(b, path)
    assert redis_server.child is not None
    redis_server.child.kill()
    returncode, seconds = await stop_in_thread(b)
    assert returncode == 0
    assert seconds <= STOP_BOUND


async def test_close_does_not_wait_for_a_task_that_swallows_its_cancellation(
    start_shared: StartShared,
) -> None:
    a, b = await start_shared(), await start_shared()
    alice = await join(a, "/c/red")
    await join(b, "/c/red")
    await wait_for_users(alice, 2)
    store = store_of(b)
    swallowed = asyncio.Event()
    released = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(TIMEOUT)
        except asyncio.CancelledError:
            swallowed.set()
            await released.wait()  # goes on as if nothing happened

    task = asyncio.create_task(stubborn())
    store.tasks.append(task)
    await asyncio.sleep(0)  # let it start
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.close()
    assert loop.time() - started <= STOP_TIMEOUT + SLACK
    assert swallowed.is_set() and not task.done()
    # Redis answers: the stop still takes B's users out of every room at once.
    async with asyncio.timeout(EXPIRY / 2):
        await wait_for_users(alice, 1)
    released.set()
    await task


# --- Start-up -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("localhost:6379", "not a usable Redis URL"),
        ("redis://localhost:6379/zero", "the database must be a number"),
        ("redis://127.0.0.1:{port}/0", "cannot use Redis at 127.0.0.1:{port}/0"),
    ],
    ids=["no scheme", "bad database", "nothing listening"],
)
def test_a_bad_or_unreachable_redis_stops_start_up_with_one_line(url: str, reason: str) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "server.py", "--port", "0", "--redis", url.format(port=port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("server.py: error: ")
    assert reason.format(port=port) in line


def test_without_redis_the_redis_client_is_not_even_imported() -> None:
    code = (
        "import asyncio, sys\n"
        "from counter_sync.app import start\n"
        "from counter_sync.config import Settings\n"
        "async def main():\n"
        "    app = await start(Settings(host='127.0.0.1', port=0))\n"
        "    await app.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'redis'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.stdout == "[]\n", result.stderr
