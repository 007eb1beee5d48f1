"""``--redis URL``: instances share every room's exact counter and user count through Redis.

Each test gets its own ``redis-server`` on a free port, without persistence.
Instances run in-process, except those killed with a signal or stopped with
SIGTERM; start-up errors run ``python server.py``. Sessions (exactly-once
actions) go through :class:`counter_sync.client.Client` or the raw protocol.
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
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from fnmatch import fnmatch
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import CloseCode

from counter_sync.app import App
from counter_sync.client import Client
from counter_sync.config import (
    MAX_VALUE,
    REDIS_COMMAND_TIMEOUT,
    REDIS_RECONNECT_LAST,
    REDIS_RENEWALS_PER_EXPIRY,
    REDIS_STOP_TIMEOUT,
)
from counter_sync.redis_store import HISTORY, Commit, RedisStore, room_keys
from counter_sync.store import DEFAULT_ROOM, Change, OpBatch
from testkit.processes import ROOT, TIMEOUT, RedisServer, ServerProcess, free_port
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    is_state,
    join,
    room,
    settled,
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
# Each instance checks that Redis still holds its history and rooms this often.
PROBE_INTERVAL = EXPIRY / REDIS_RENEWALS_PER_EXPIRY
SESSION = "session-0123456789abcdef"
LOST_DATA = "lost its data (FLUSHALL"
LOST_ROOM = "lost the counter of"
# --forget-after at its smallest. A room nobody uses is gone within it and
# the expiry (KEPT), counted from the last renewal before its last use.
FORGET = 1.0
KEPT = FORGET + EXPIRY
# Rooms the churn test opens in turn, and how recently a room may have been
# used for any of its keys to be in Redis still: KEPT after the renewal
# before its last use, and scheduling slack on a busy machine.
CHURN_ROOMS = 2_000
CHURN_WINDOW = KEPT + PROBE_INTERVAL + 1.0
# Rooms the churn opens from one loopback address before it takes the next:
# as many clients would, each below the cap on new rooms per address (the
# admission's business, not the store's).
CHURN_PER_ADDRESS = 20

StartShared = Callable[..., Awaitable[App]]


# --- Instances sharing a throwaway Redis (conftest's redis_server) ---------------


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
    return lambda: all(app.hub.store.healthy() and settled(app) for app in apps)


def showing(*apps: App, value: int, name: str = DEFAULT_ROOM) -> Callable[[], bool]:
    """True once every instance holds ``value`` in room ``name`` and has broadcast it."""
    return lambda: all(room(app, name).state.value == value and settled(app) for app in apps)


def store_of(app: App) -> RedisStore:
    store = app.hub.store
    assert isinstance(store, RedisStore)
    return store


def op(action: str, number: int) -> str:
    return json.dumps({"action": action, "op": number})


async def join_session(
    app: App, path: str = "/", session: str = SESSION
) -> tuple[ClientConnection, list[dict[str, Any]]]:
    """Connect with a session; return the client and its first three messages."""
    websocket = await connect(f"ws://127.0.0.1:{app.port}{path}?session={session}")
    async with asyncio.timeout(TIMEOUT):
        first = [json.loads(await websocket.recv()) for _ in range(3)]
    assert [event["type"] for event in first] == ["users", "state", "ack"]
    return websocket, first


async def wait_for_ack(websocket: ClientConnection, number: int) -> dict[str, Any]:
    return await wait_for_event(websocket, lambda e: e == {"type": "ack", "op": number})


def new_state(value: int, epoch: str) -> Callable[[dict[str, Any]], bool]:
    """A state message with ``value`` in another history than ``epoch``."""
    return lambda event: is_state(event, value) and event["epoch"] != epoch


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelname == "WARNING" and text in record.getMessage()
    ]


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


async def keys_of(redis: Redis, name: str) -> list[str]:
    """Every key Redis holds for named room ``name`` (SCAN)."""
    pattern = f"counter-sync:room:{name}:*"
    return [key async for key in redis.scan_iter(match=pattern, count=1000)]


async def rooms_in_redis(redis: Redis) -> set[str]:
    """The named rooms of which Redis holds any key (SCAN)."""
    prefix = "counter-sync:room:"
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    return {key.removeprefix(prefix).split(":")[0] for key in keys}


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
    await wait_until(showing(a, b, value=expected))
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
        await wait_until(showing(a, b, value=expected[path], name=name))
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
    await wait_until(showing(a, b, value=MAX_VALUE, name="big"))
    for client, seen in zip((alice, bob), events, strict=True):
        seen += await events_until_now(client)
    refusals = [e for seen in events for e in seen if e["type"] == "error"]
    assert refusals == [{"type": "error", "error": "value out of range: 1 action(s) not applied"}]
    assert [last_value(seen) for seen in events] == [MAX_VALUE, MAX_VALUE]
    stored = await redis_client.hgetall(big)
    assert stored["value"] == str(MAX_VALUE)
    assert int(stored["seq"]) > 1  # one change applied, one refused


async def held_by(redis: Redis, count: int) -> bool:
    return len(await held_flushes(redis)) == count


async def test_a_change_below_the_range_counts_nothing_but_its_ops_are_done(
    start_shared: StartShared, redis_client: Redis
) -> None:
    low = room_keys("low", 0).state
    await redis_client.hset(low, mapping={"value": -MAX_VALUE + 1, "seq": 7})
    app = await start_shared()
    await join(app, "/c/low")
    store = store_of(app)
    [outcome] = await store.commit([Change("low", -1, (OpBatch(SESSION, 1, (-1, 0)),))])
    assert not outcome.applied
    assert outcome.done == {SESSION: (0, 2)}
    assert outcome.state.value == -MAX_VALUE + 1
    assert await redis_client.hgetall(low) == {"value": str(-MAX_VALUE + 1), "seq": "7"}
    [outcome] = await store.commit([Change("low", 0, (OpBatch(SESSION, 3, (-1,)),))])
    assert outcome.applied
    assert outcome.done == {SESSION: (2, 3)}
    assert outcome.state.value == -MAX_VALUE


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
    await wait_until(showing(a, b, value=before * len(clients)))
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
    await wait_until(showing(a, b, value=stored))
    for client, seen in zip(clients, events, strict=True):
        seen += await events_until_now(client)

    not_counted = sum(rejected(seen) for seen in events)
    assert not_counted > 0  # the blip did hit some actions
    assert stored == sent * len(clients) - not_counted
    assert [last_value(seen) for seen in events] == [stored] * len(clients)


async def test_a_room_whose_store_does_not_answer_ends_the_handshake_at_once_then_closes(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    a = await start_shared()
    assert redis_server.child is not None
    redis_pid = redis_server.child.pid
    os.kill(redis_pid, signal.SIGSTOP)  # Redis accepts connections and answers nothing
    try:
        # The 101 goes before the room is opened, not with its first messages.
        url = f"ws://127.0.0.1:{a.port}/c/unopened"
        async with connect(url, open_timeout=REDIS_COMMAND_TIMEOUT / 2) as client:
            await client.wait_closed()  # once opening the room timed out
        assert client.close_code == CloseCode.TRY_AGAIN_LATER
    finally:
        os.kill(redis_pid, signal.SIGCONT)


async def test_readyz_answers_503_while_redis_is_down_and_200_once_it_is_back(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    app = await start_shared()
    store = app.hub.store
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
    caplog.set_level(logging.INFO, "counter_sync")
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
    await wait_until(app.hub.store.healthy)
    assert len([line for line in log_lines("INFO") if "is back" in line]) == 1


def a_commit(store: RedisStore, name: str) -> Commit:
    """A commit of 5 actions without a session and 2 ops of SESSION, numbered as the store would."""
    store.commits += 1
    change = Change(name, 5, (OpBatch(SESSION, 1, (1, 1)),))
    return Commit(store.commits, store.epoch, (change,))


async def commit_behind_the_stores_back(store: RedisStore, commit: Commit) -> list[Any]:
    """Run the store's own commit script for ``commit``; its raw reply."""
    return await store.run_commit(commit, store.encode(commit.changes, commit.epoch))


async def session_key(redis: Redis, store: RedisStore, name: str) -> str | None:
    value = await redis.get(room_keys(name, 0).session(store.epoch, SESSION))
    return None if value is None else str(value)


@pytest.mark.parametrize("path", ["/", "/c/red"])
async def test_a_commit_whose_reply_was_lost_never_counts_and_its_ops_are_done(
    start_shared: StartShared, redis_client: Redis, path: str
) -> None:
    app = await start_shared()
    alice = await join(app, path)
    store = store_of(app)
    name = DEFAULT_ROOM if path == "/" else path.removeprefix("/c/")
    # A commit that Redis applied but whose reply never came back: to the
    # store it failed, so its senders were told "not applied".
    commit = a_commit(store, name)
    assert (await commit_behind_the_stores_back(store, commit))[0] == "ok"
    await wait_for_value(alice, 7)
    store.in_doubt = commit
    store.lost(ConnectionError("reply lost"))
    # On reconnection the store makes that true...
    await wait_for_value(alice, 0)
    # ...and neither a delayed copy of the commit nor settling it again changes that.
    assert await commit_behind_the_stores_back(store, commit) == ["stale"]
    assert (await store.run_settle(commit))[0] == ["settled"]
    # Its session's ops were told "not applied", and are done: the next follows on.
    assert await session_key(redis_client, store, name) == "2"
    bob, first = await join_session(app, path)
    assert first[2] == {"type": "ack", "op": 2}
    await bob.send(op("plus", 3))
    await wait_for_ack(bob, 3)
    await wait_for_value(alice, 1)


async def test_a_lost_commit_that_was_not_applied_still_uses_up_its_session_ops(
    start_shared: StartShared, redis_client: Redis
) -> None:
    app = await start_shared()
    alice = await join(app, "/c/red")
    store = store_of(app)
    commit = a_commit(store, "red")  # sent, and lost on its way: never run
    store.in_doubt = commit
    store.lost(ConnectionError("reply lost"))
    await wait_until(lambda: store.healthy() and store.in_doubt is None)
    assert await session_key(redis_client, store, "red") == "2"
    # A delayed copy arriving now is refused.
    assert await commit_behind_the_stores_back(store, commit) == ["stale"]
    await alice.send(PLUS)
    await wait_for_value(alice, 1)


# --- Versions: one counter for every room, one epoch per history -------------------


async def test_every_state_carries_a_version_from_one_counter_and_the_same_epoch_everywhere(
    start_shared: StartShared,
) -> None:
    a, b = await start_shared(), await start_shared()
    red, blue = await join(a, "/c/red"), await join(b, "/c/blue")
    seen = []
    for client, expected in ((red, 1), (blue, 1), (red, 2), (blue, 2)):
        await client.send(PLUS)
        seen.append(await wait_for_value(client, expected))
    seqs = [event["seq"] for event in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # across rooms and instances
    assert {event["epoch"] for event in seen} == {store_of(a).epoch} == {store_of(b).epoch}


async def test_a_room_whose_key_was_deleted_never_goes_back_in_version(
    start_shared: StartShared, redis_client: Redis
) -> None:
    app = await start_shared()
    alice = await join(app, "/c/red")
    await alice.send(PLUS)
    before = await wait_for_value(alice, 1)
    await alice.close()
    await wait_until(lambda: "red" not in app.hub.rooms)
    await redis_client.delete(room_keys("red", 0).state)
    _, after = await join_with_state(app, "/c/red")
    assert after["value"] == 0
    assert after["seq"] > before["seq"]
    assert after["epoch"] == before["epoch"]


async def join_with_state(app: App, path: str) -> tuple[ClientConnection, dict[str, Any]]:
    websocket = await connect(f"ws://127.0.0.1:{app.port}{path}")
    async with asyncio.timeout(TIMEOUT):
        users, state = [json.loads(await websocket.recv()) for _ in range(2)]
    assert (users["type"], state["type"]) == ("users", "state")
    return websocket, state


async def test_the_epoch_is_set_once_and_kept_across_instances_and_restarts_of_them(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a = await start_shared()
    epoch = await redis_client.hget(HISTORY, "epoch")
    assert store_of(a).epoch == epoch
    await a.close()
    b = await start_shared()
    assert store_of(b).epoch == epoch


# --- Sessions: exactly once, across instances ----------------------------------------


async def test_an_op_resent_through_another_instance_counts_once(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(), await start_shared()
    first, _ = await join_session(a, "/c/red")
    for number in (1, 2):
        await first.send(op("plus", number))
    await wait_for_ack(first, 2)
    await first.close()
    # The client did not hear the ack of 2, say: it resends 2 to B.
    second, welcome = await join_session(b, "/c/red")
    assert is_state(welcome[1], 2)
    assert welcome[2] == {"type": "ack", "op": 2}
    await second.send(op("plus", 2))
    await second.send(op("plus", 3))
    await wait_for_value(second, 3)  # a pass writes the state, then the acks
    await wait_for_ack(second, 3)
    assert await redis_client.hget(room_keys("red", 0).state, "value") == "3"
    assert await session_key(redis_client, store_of(a), "red") == "3"


async def test_the_same_op_on_two_instances_at_once_counts_once(start_shared: StartShared) -> None:
    a, b = await start_shared(), await start_shared()
    first, _ = await join_session(a)
    second, _ = await join_session(b)
    await asyncio.gather(first.send(op("plus", 1)), second.send(op("plus", 1)))
    await asyncio.gather(wait_for_ack(first, 1), wait_for_ack(second, 1))
    await wait_until(showing(a, b, value=1))


async def test_a_sessions_last_done_op_expires_session_ttl_after_its_last_write(
    start_shared: StartShared, redis_client: Redis
) -> None:
    app = await start_shared(session_ttl=30.0)  # --session-ttl 30
    client, _ = await join_session(app, "/c/red")
    await client.send(op("plus", 1))
    await wait_for_ack(client, 1)
    ttl = await redis_client.pttl(room_keys("red", 0).session(store_of(app).epoch, SESSION))
    assert 25_000 < ttl <= 30_000


async def test_a_session_client_through_two_instances_ends_on_the_exact_sum(
    start_shared: StartShared,
) -> None:
    a, b = await start_shared(), await start_shared()
    async with Client([url(a), url(b)]) as one, Client([url(b), url(a)]) as other:
        for _ in range(20):
            await one.plus()
            await other.minus()
            await other.plus()
        await asyncio.gather(one.settled(), other.settled())
        async with asyncio.timeout(TIMEOUT):
            await one.wait(lambda: one.value == 20)
            await other.wait(lambda: other.value == 20)
        assert one.rejected == other.rejected == []
        assert one.stale_states == other.stale_states == 0


# --- Data loss: FLUSHALL, a deleted key, a restart without persistence -------------


async def test_a_flushall_is_logged_once_and_every_client_sees_the_new_value_soon(
    start_shared: StartShared, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a, b = await start_shared(), await start_shared()
    clients = [await join(app, path) for app in (a, b) for path in ("/", "/c/red")]
    for client in clients[:2]:
        for _ in range(3):
            await client.send(PLUS)
    for client in clients:
        old = await wait_for_value(client, 3)
    loop = asyncio.get_running_loop()
    lost_at = loop.time()
    await redis_client.flushall()
    # Nobody clicks: each instance finds out at its next check.
    for client in clients:
        await wait_for_event(client, new_state(0, old["epoch"]))
    assert loop.time() - lost_at <= PROBE_INTERVAL + SLACK
    assert store_of(a).epoch == store_of(b).epoch == await redis_client.hget(HISTORY, "epoch")
    assert len(warnings_with(caplog, LOST_DATA)) == 2  # once per instance
    await clients[0].send(PLUS)
    for client in clients[::2]:
        await wait_for_value(client, 1)
    await wait_until(idle(a, b))
    assert len(warnings_with(caplog, LOST_DATA)) == 2


async def test_a_click_that_finds_the_data_lost_is_not_applied_and_shows_the_new_history(
    start_shared: StartShared, redis_client: Redis
) -> None:
    # No renewal during the test: the click is what finds the loss.
    a = await start_shared(redis_expiry=NO_RENEWAL)
    b = await start_shared(redis_expiry=NO_RENEWAL)
    alice, bob = await join(a, "/c/red"), await join(b, "/c/red")
    await alice.send(PLUS)
    old = await wait_for_value(bob, 1)
    await redis_client.flushall()
    await alice.send(PLUS)
    error = await wait_for_event(alice, store_error)
    assert error["error"] == "store unavailable: 1 action(s) not applied"
    # Alice's instance read every room again; Bob's heard of the new epoch.
    await wait_for_event(alice, new_state(0, old["epoch"]))
    await wait_for_event(bob, new_state(0, old["epoch"]))
    assert await redis_client.hget(room_keys("red", 0).state, "value") is None
    await bob.send(PLUS)
    await wait_for_value(alice, 1)


async def test_session_clients_carry_on_in_the_new_history_after_a_flushall(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(), await start_shared()
    async with Client(f"{url(a)}c/red") as one, Client(f"{url(b)}c/red") as other:
        for _ in range(5):
            await one.plus()
        await one.settled()
        await other.wait(lambda: other.value == 5)
        old = other.epoch
        await redis_client.flushall()
        await asyncio.wait_for(other.wait(lambda: other.epoch != old), TIMEOUT)
        assert other.value == 0
        for _ in range(2):
            await one.plus()
            await other.plus()
        await asyncio.gather(one.settled(), other.settled())
        await asyncio.wait_for(
            asyncio.gather(one.wait(lambda: one.value == 4), other.wait(lambda: other.value == 4)),
            TIMEOUT,
        )
        assert one.rejected == other.rejected == []
        assert one.stale_states == other.stale_states == 0


async def test_a_deleted_room_is_logged_once_and_every_client_sees_0_soon(
    start_shared: StartShared, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a, b = await start_shared(), await start_shared()
    home = await join(a)
    alice, bob = await join(a, "/c/red"), await join(b, "/c/red")
    for _ in range(3):
        await alice.send(PLUS)
    await home.send(PLUS)
    old = await wait_for_value(bob, 3)
    await wait_for_value(home, 1)
    loop = asyncio.get_running_loop()
    lost_at = loop.time()
    await redis_client.delete(room_keys("red", 0).state)
    for client in (alice, bob):
        event = await wait_for_value(client, 0)
        assert event["seq"] > old["seq"] and event["epoch"] == old["epoch"]
    assert loop.time() - lost_at <= PROBE_INTERVAL + SLACK
    lines = warnings_with(caplog, LOST_ROOM)
    assert len(lines) == 2 and all("red" in line for line in lines)  # once per instance
    await bob.send(PLUS)
    await wait_for_value(alice, 1)
    # The other rooms are untouched, and nothing else was said to be lost.
    assert last_value(await events_until_now(home)) is None
    assert warnings_with(caplog, LOST_DATA) == []
    assert len(warnings_with(caplog, LOST_ROOM)) == 2


async def test_a_click_in_a_deleted_room_counts_from_0_with_a_newer_version(
    start_shared: StartShared, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a = await start_shared(redis_expiry=NO_RENEWAL)
    b = await start_shared(redis_expiry=NO_RENEWAL)
    alice, bob = await join(a, "/c/red"), await join(b, "/c/red")
    for _ in range(3):
        await alice.send(PLUS)
    old = await wait_for_value(bob, 3)
    await redis_client.delete(room_keys("red", 0).state)
    await alice.send(MINUS)
    for client in (alice, bob):
        event = await wait_for_value(client, -1)
        assert event["seq"] > old["seq"]
    assert [line for line in warnings_with(caplog, LOST_ROOM) if "red" in line] != []


async def test_a_redis_restart_without_persistence_is_logged_once_and_shown_soon(
    start_shared: StartShared, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a, b = await start_shared(), await start_shared()
    alice, bob = await join(a, "/c/red"), await join(b, "/c/red")
    await alice.send(PLUS)
    old = await wait_for_value(bob, 1)
    redis_server.stop()
    await wait_until(lambda: not store_of(a).healthy() and not store_of(b).healthy())
    redis_server.start()  # persistence is off: Redis is empty
    loop = asyncio.get_running_loop()
    back_at = loop.time()
    for client in (alice, bob):
        await wait_for_event(client, new_state(0, old["epoch"]))
    # Each instance tries again at most this long after the last attempt.
    assert loop.time() - back_at <= REDIS_RECONNECT_LAST + SLACK
    assert len(warnings_with(caplog, LOST_DATA)) == 2
    await bob.send(PLUS)
    await wait_for_value(alice, 1)


# --- What the API asks of the store: read, list, reset -------------------------------


async def test_peek_reads_a_room_without_joining_it_with_its_users_elsewhere(
    start_shared: StartShared, redis_client: Redis
) -> None:
    a, b = await start_shared(), await start_shared()
    alice = await join(a, "/c/red")
    await join(a, "/c/red")
    await alice.send(PLUS)
    await wait_for_value(alice, 1)
    await until(lambda: has_users(redis_client, "red", 2))
    state, elsewhere = await store_of(b).peek("red")
    assert (state.value, state.epoch, elsewhere) == (1, store_of(b).epoch, 2)
    assert "red" not in store_of(b).rooms  # not joined: nothing subscribed
    state, elsewhere = await store_of(b).peek("nobody")
    assert (state.value, elsewhere) == (0, 0)


async def test_counters_lists_what_redis_holds_by_name_from_a_prefix_and_after_a_name(
    start_shared: StartShared,
) -> None:
    store = store_of(await start_shared())
    names = ["b", "a3", DEFAULT_ROOM, "a1", "a2"]
    await store.commit([Change(name, index + 1) for index, name in enumerate(names)])

    async def listed(prefix: str, after: str, limit: int) -> list[tuple[str, int]]:
        return [(name, state.value) for name, state in await store.counters(prefix, after, limit)]

    assert await listed("", "", 10) == [("/", 3), ("a1", 4), ("a2", 5), ("a3", 2), ("b", 1)]
    assert await listed("a", "a1", 10) == [("a2", 5), ("a3", 2)]
    assert await listed("a", "", 2) == [("a1", 4), ("a2", 5)]
    assert await listed("*", "", 10) == []  # a prefix, not a pattern


async def test_forget_resets_a_room_everywhere_with_a_newer_version_and_is_no_loss(
    start_shared: StartShared, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a, b = await start_shared(), await start_shared()
    alice, bob = await join(a, "/c/red"), await join(b, "/c/red")
    for _ in range(3):
        await alice.send(PLUS)
    old = await wait_for_value(bob, 3)
    state = await store_of(a).forget("red")
    room(a, "red").flush.observe(state=state)  # as the API shows it here
    for client in (alice, bob):
        event = await wait_for_value(client, 0)
        assert event["seq"] > old["seq"]
    assert await redis_client.exists(room_keys("red", 0).state) == 0
    assert "red" not in [name for name, _ in await store_of(b).counters("", "", 10)]
    for app in (a, b):
        await store_of(app).probe()  # what each renewal checks
    assert warnings_with(caplog, LOST_ROOM) == []
    await bob.send(PLUS)
    await wait_for_value(alice, 1)


# --- Forgetting: the keys of a counter nobody uses expire ----------------------------


async def test_a_room_used_once_loses_every_key_after_forget_after_and_reads_0_newer(
    start_shared: StartShared, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a = await start_shared(forget_after=FORGET)
    store = store_of(a)
    async with connect(f"{url(a)}c/once") as once:
        await once.send(PLUS)
        shown = await wait_for_value(once, 1)
        await until(lambda: has_users(redis_client, "once", 1))
        assert len(await keys_of(redis_client, "once")) == 3  # state, users, users:seq
    assert [name for name, _ in await store.counters("", "", 10)] == ["once"]  # / never changed
    for key in await keys_of(redis_client, "once"):
        assert 0 < await redis_client.pttl(key) <= KEPT * 1000
    left_at = asyncio.get_running_loop().time()
    await until(lambda: no_keys(redis_client, "once"))
    assert asyncio.get_running_loop().time() - left_at >= FORGET
    assert await store.counters("", "", 10) == []
    _, again = await join_with_state(a, "/c/once")
    assert (again["value"], again["epoch"]) == (0, shown["epoch"])
    assert again["seq"] > shown["seq"]
    # Expired by design, with nobody in it: no loss to report.
    assert warnings_with(caplog, LOST_ROOM) == warnings_with(caplog, LOST_DATA) == []


async def no_keys(redis: Redis, name: str) -> bool:
    return await keys_of(redis, name) == []


async def test_a_room_with_users_keeps_its_keys_however_long_nobody_clicks(
    start_shared: StartShared, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    a, b = await start_shared(forget_after=FORGET), await start_shared(forget_after=FORGET)
    alice = await join(a, "/c/kept")
    await alice.send(PLUS)
    await wait_for_value(alice, 1)
    state = room_keys("kept", 0).state
    # Time passing is the point: twice as long as a room nobody uses is kept.
    loop = asyncio.get_running_loop()
    until_then = loop.time() + 2 * KEPT
    while loop.time() < until_then:
        assert await redis_client.exists(state) == 1
        await asyncio.sleep(0.1)
    assert 0 < await redis_client.pttl(state) <= KEPT * 1000  # it would expire, unrenewed
    bob = await join(b, "/c/kept")
    await bob.send(PLUS)
    await wait_for_value(alice, 2)
    assert warnings_with(caplog, LOST_ROOM) == warnings_with(caplog, LOST_DATA) == []


async def test_a_churn_of_rooms_clicked_once_leaves_only_the_keys_forget_after_allows(
    shared_process: StartProcess, redis_client: Redis
) -> None:
    process = shared_process("--forget-after", str(FORGET))
    used: list[tuple[float, str]] = []  # (when its client left, room)

    async def only_recent_rooms_kept() -> set[str]:
        """Check that Redis holds keys of recently used rooms only; return those rooms."""
        recent = {room for at, room in used if at >= time.monotonic() - CHURN_WINDOW}
        kept = await rooms_in_redis(redis_client)
        assert kept <= recent, sorted(kept - recent)[:5]
        return kept

    for n in range(CHURN_ROOMS):
        name = f"churn-{n}"
        source = f"127.0.0.{2 + n // CHURN_PER_ADDRESS}"
        async with connect(f"{process.url}c/{name}", local_addr=(source, 0)) as websocket:
            await websocket.send(PLUS)
            await wait_for_value(websocket, 1)
        used.append((time.monotonic(), name))
        if n % 100 == 99:
            await only_recent_rooms_kept()
    # However fast the churn went, the rooms go on schedule after it, then all.
    async with asyncio.timeout(TIMEOUT):
        while await only_recent_rooms_kept():  # noqa: ASYNC110 - expiry is no event
            await asyncio.sleep(0.1)
    assert LOST_ROOM not in process.log and LOST_DATA not in process.log


# --- An instance killed mid-run ------------------------------------------------------

KILL_CLIENTS = 30
KILL_OPS = 100
KILL_CHUNK = 10  # ops a client sends before it waits for their acks
KILL_BOUND = 30.0  # seconds for one whole run, instances' start included


@pytest.mark.parametrize("run", range(5))
async def test_an_instance_killed_mid_run_loses_and_doubles_no_action(
    shared_process: StartProcess, redis_client: Redis, run: int
) -> None:
    async with asyncio.timeout(KILL_BOUND):
        instances = [shared_process("--rate", "0") for _ in range(3)]
        urls = [f"{instance.url}c/kill" for instance in instances]
        clients = [Client(urls[i % 3 :] + urls[: i % 3]) for i in range(KILL_CLIENTS)]
        await asyncio.gather(*(client.__aenter__() for client in clients))
        try:

            async def play(client: Client) -> None:
                for _ in range(KILL_OPS // KILL_CHUNK):
                    for _ in range(KILL_CHUNK):
                        await client.plus()
                    await client.settled()

            def acked() -> int:
                return sum(client.next_op - 1 - client.pending for client in clients)

            playing = asyncio.gather(*(play(client) for client in clients))
            total = KILL_CLIENTS * KILL_OPS
            await wait_until(lambda: acked() >= total // 3)
            instances[0].process.kill()  # SIGKILL, its clients' ops in flight
            killed_at = acked()
            await playing
            for client in clients:
                await client.wait(lambda c=client: c.value == total)  # type: ignore[misc]
        finally:
            await asyncio.gather(*(client.close() for client in clients))
    assert killed_at < total  # the kill came mid-run
    assert sum(client.connections for client in clients) > KILL_CLIENTS  # some reconnected
    assert [client.rejected for client in clients] == [[]] * KILL_CLIENTS
    assert [client.value for client in clients] == [total] * KILL_CLIENTS
    # Monotonic: within one epoch, no client ever received an older state.
    assert [client.stale_states for client in clients] == [0] * KILL_CLIENTS
    assert len({client.epoch for client in clients}) == 1
    assert await redis_client.hget(room_keys("kill", 0).state, "value") == str(total)


# --- The scripts ship with the package ------------------------------------------------


def test_every_lua_script_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["counter_sync"]
    scripts = sorted((ROOT / "counter_sync" / "lua").glob("*.lua"))
    assert scripts
    for script in scripts:
        name = script.relative_to(ROOT / "counter_sync").as_posix()
        assert any(fnmatch(name, pattern) for pattern in patterns), name


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
    running = asyncio.Event()
    swallowed = asyncio.Event()
    released = asyncio.Event()

    async def stubborn() -> None:
        running.set()
        try:
            await asyncio.sleep(TIMEOUT)
        except asyncio.CancelledError:
            swallowed.set()
            await released.wait()  # goes on as if nothing happened

    task = asyncio.create_task(stubborn())
    store.tasks.append(task)
    await running.wait()  # in its try: a task cancelled before it started would just end
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.close()
    assert loop.time() - started <= REDIS_STOP_TIMEOUT + SLACK
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
