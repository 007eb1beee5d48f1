"""``--redis URL``: instances share one exact counter and user count through Redis.

Each test gets its own ``redis-server`` on a free port, without persistence.
Instances run in-process, except the one killed with SIGKILL; start-up errors
run ``python server.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from counter_sync.app import App
from counter_sync.redis_store import FLUSH_MEMORY, STATE, RedisStore
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    ROOT,
    TIMEOUT,
    RedisServer,
    free_port,
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
# Scheduling slack on a busy machine, on top of the promised EXPIRY.
SLACK = 0.5

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
        return await start_server(redis=redis_server.url, redis_expiry=EXPIRY, **overrides)

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


async def health(app: App) -> int:
    """The status code of ``GET /healthz``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status_line = await asyncio.wait_for(reader.readline(), TIMEOUT)
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


def idle(*apps: App) -> Callable[[], bool]:
    """True once every instance is connected to Redis and has flushed everything."""
    return lambda: all(room(app).store.healthy() and room(app).flush_task is None for app in apps)


def settled(*apps: App, value: int) -> Callable[[], bool]:
    """True once every instance holds ``value`` and has broadcast it."""
    return lambda: all(room(app).value == value and room(app).flush_task is None for app in apps)


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


async def test_an_instance_that_stops_leaves_the_count_at_once(start_shared: StartShared) -> None:
    a, b = await start_shared(), await start_shared()
    alice = await join(a)
    await join(b)
    await wait_for_users(alice, 2)
    await b.close()
    async with asyncio.timeout(EXPIRY / 2):  # not waiting for the expiry
        await wait_for_users(alice, 1)


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


async def test_dropped_connections_to_redis_neither_lose_nor_double_an_action(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    a, b = await start_shared(), await start_shared()
    clients = [await join(app) for app in (a, b) for _ in range(5)]
    sent = 40

    async def play(websocket: ClientConnection) -> None:
        # Only "plus": a client's error replies say how many did not count.
        for _ in range(sent):
            await websocket.send(PLUS)
            await asyncio.sleep(0)  # spread the actions over many flushes

    playing = asyncio.gather(*(play(client) for client in clients))
    await wait_until(lambda: room(a).value > 0)
    async with Redis.from_url(redis_server.url, decode_responses=True) as redis:
        # As a network blip would: every connection drops, Redis keeps its data.
        await redis.client_kill_filter(_type="normal", skipme=True)
        await redis.client_kill_filter(_type="pubsub")
    await playing
    # Once a client's mark comes back, its hub has all of its actions.
    events = [await events_until_now(client) for client in clients]
    await wait_until(idle(a, b))
    async with Redis.from_url(redis_server.url, decode_responses=True) as redis:
        stored = int(await redis.hget(STATE, "value") or 0)
    await wait_until(settled(a, b, value=stored))
    for client, seen in zip(clients, events, strict=True):
        seen += await events_until_now(client)

    not_counted = sum(rejected(seen) for seen in events)
    assert not_counted > 0  # the blip did hit some actions
    assert stored == sent * len(clients) - not_counted
    assert [last_value(seen) for seen in events] == [stored] * len(clients)


async def test_healthz_answers_503_while_redis_is_down_and_200_once_it_is_back(
    start_shared: StartShared, redis_server: RedisServer
) -> None:
    app = await start_shared()
    store = room(app).store
    assert await health(app) == 200
    redis_server.stop()
    await wait_until(lambda: not store.healthy())
    assert await health(app) == 503
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


async def test_a_flush_whose_reply_was_lost_never_counts(start_shared: StartShared) -> None:
    app = await start_shared()
    alice = await join(app)
    store = room(app).store
    assert isinstance(store, RedisStore)
    # A flush that Redis applied but whose reply never came back: to the
    # store it failed, so its senders were told "not applied".
    store.flushes += 1
    number = store.flushes
    await add_behind_the_stores_back(store, number, 5)
    await wait_for_value(alice, 5)
    store.in_doubt = (number, 5)
    store.lost(ConnectionError("reply lost"))
    # On reconnection the store makes that true...
    await wait_for_value(alice, 0)
    # ...and neither a delayed copy of the flush nor settling it again changes that.
    assert await add_behind_the_stores_back(store, number, 5) == 0
    assert await run_script(store, "cancel", number, 5) == 0
    await alice.send(PLUS)
    await wait_for_value(alice, 1)


async def add_behind_the_stores_back(store: RedisStore, number: int, delta: int) -> int:
    """Run the store's own script for flush ``number``; return the value it reports."""
    return int(json.loads(await run_script(store, "add", number, delta))["value"])


async def run_script(store: RedisStore, name: str, number: int, delta: int) -> Any:
    return await store.scripts[name](
        keys=[STATE, store.flush_key()], args=[delta, number, store.channel, FLUSH_MEMORY]
    )


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
