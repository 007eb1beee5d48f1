"""Exactly-once actions: sessions, numbered ops, acks, and never an older value.

Every test runs in each mode: memory, durable (``--state``) and shared
(``--redis``), since each store keeps the sessions itself. Crashes and dead
instances are in ``test_sqlite.py`` and ``test_redis.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from counter_sync.app import App
from counter_sync.client import Client
from testkit.processes import TIMEOUT
from tests.conftest import StartServer
from tests.helpers import is_state, value, wait_for_event, wait_for_value

SESSION = "session-0123456789abcdef"


@pytest.fixture
async def app(start_server: StartServer, mode: dict[str, Any]) -> App:
    return await start_server(**mode)


def op(action: str, number: int) -> str:
    return json.dumps({"action": action, "op": number})


async def join_session(
    app: App, session: str = SESSION, path: str = "/"
) -> tuple[ClientConnection, list[dict[str, Any]]]:
    """Connect with a session; return the client and its first three messages."""
    websocket = await connect(f"ws://127.0.0.1:{app.port}{path}?session={session}")
    async with asyncio.timeout(TIMEOUT):
        first = [json.loads(await websocket.recv()) for _ in range(3)]
    return websocket, first


async def wait_for_ack(websocket: ClientConnection, number: int) -> dict[str, Any]:
    return await wait_for_event(websocket, lambda e: e == {"type": "ack", "op": number})


async def test_a_session_client_gets_users_state_then_its_last_done_op(app: App) -> None:
    _, first = await join_session(app)
    assert [event["type"] for event in first] == ["users", "state", "ack"]
    assert first[2] == {"type": "ack", "op": 0}


async def test_ops_are_acked_cumulatively_once_committed(app: App) -> None:
    client, _ = await join_session(app)
    for number in (1, 2, 3):
        await client.send(op("plus", number))
    await wait_for_ack(client, 3)
    assert value(app) == 3


async def test_one_ack_per_flush_covers_every_op_in_it(app: App) -> None:
    client, _ = await join_session(app)
    await client.send(op("plus", 1))
    await wait_for_ack(client, 1)
    # Three ops in one write: the server reads them in one loop turn.
    for number in (2, 3, 4):
        client.protocol.send_text(op("plus", number).encode())
    client.transport.write(b"".join(client.protocol.data_to_send()))
    acks: list[int] = []
    while not acks or acks[-1] != 4:
        event = await wait_for_event(client, lambda e: e["type"] == "ack")
        acks.append(event["op"])
    assert acks == [4]


async def test_a_resent_op_is_acked_again_and_not_counted(app: App) -> None:
    client, _ = await join_session(app)
    await client.send(op("plus", 1))
    await wait_for_ack(client, 1)
    await client.send(op("plus", 1))
    await wait_for_ack(client, 1)
    await client.send(op("plus", 2))
    await wait_for_ack(client, 2)
    assert value(app) == 2


async def test_an_op_that_skips_ahead_is_an_error_and_not_applied(app: App) -> None:
    client, _ = await join_session(app)
    await client.send(op("plus", 1))
    await wait_for_ack(client, 1)
    await client.send(op("plus", 3))
    error = await wait_for_event(client, lambda e: e["type"] == "error")
    assert error == {"type": "error", "error": "op out of order", "op": 3}
    await client.send(op("minus", 2))  # the right next one is still taken
    await wait_for_ack(client, 2)
    assert value(app) == 0


async def test_a_reconnecting_session_is_told_its_last_done_op(app: App) -> None:
    client, _ = await join_session(app)
    for number in range(1, 6):
        await client.send(op("plus", number))
    await wait_for_ack(client, 5)
    await client.close()
    again, first = await join_session(app)
    assert first[2] == {"type": "ack", "op": 5}
    assert is_state(first[1], 5)
    await again.send(op("plus", 5))  # a retry of what was done: not counted
    await again.send(op("plus", 6))
    await wait_for_ack(again, 6)
    assert value(app) == 6


async def test_the_same_op_on_two_connections_of_one_session_counts_once(app: App) -> None:
    # A retry that races the original (an old connection not yet gone, a
    # duplicated tab): only the store, which holds the session's last done
    # op, can tell them apart.
    first, _ = await join_session(app)
    second, _ = await join_session(app)
    await asyncio.gather(first.send(op("plus", 1)), second.send(op("plus", 1)))
    await asyncio.gather(wait_for_ack(first, 1), wait_for_ack(second, 1))
    assert value(app) == 1


async def test_a_session_is_per_room(app: App) -> None:
    home, _ = await join_session(app)
    await home.send(op("plus", 1))
    await wait_for_ack(home, 1)
    _, first = await join_session(app, path="/c/other")
    assert first[2] == {"type": "ack", "op": 0}


async def test_a_rejected_op_names_itself_and_still_counts_as_done(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    app = await start_server(rate=0.001, burst=1, **mode)
    client, _ = await join_session(app)
    await client.send(op("plus", 1))
    await client.send(op("plus", 2))  # over the rate limit
    error = await wait_for_event(client, lambda e: e["type"] == "error")
    assert error["op"] == 2 and "rate limit" in error["error"]
    await wait_for_ack(client, 2)  # done, though not counted
    assert value(app) == 1


async def test_an_op_beyond_the_range_is_rejected_by_number(start_server: StartServer) -> None:
    # Memory mode only: the room's value is set where it is kept. (Each store's
    # own range check is in its tests.)
    app = await start_server()
    room = app.hub.rooms["/"]  # no client could click this far
    room.state = dataclasses.replace(room.state, value=2**53 - 1)
    client, _ = await join_session(app)
    await client.send(op("plus", 1))
    error = await wait_for_event(client, lambda e: e["type"] == "error")
    assert error["op"] == 1 and "out of range" in error["error"]
    await wait_for_ack(client, 1)


async def test_an_op_without_a_session_is_an_error(app: App) -> None:
    async with connect(f"ws://127.0.0.1:{app.port}/") as client:
        await client.send(op("plus", 1))
        error = await wait_for_event(client, lambda e: e["type"] == "error")
        assert "session" in error["error"]
    assert value(app) == 0


@pytest.mark.parametrize("session", ["short", "x" * 65, "has%20space" + "x" * 16, "%C3%BC" * 16])
async def test_a_bad_session_id_is_refused_before_the_upgrade(app: App, session: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{app.port}/?session={session}")
    assert refused.value.response.status_code == 400


async def test_clients_without_a_session_get_no_acks(app: App) -> None:
    async with connect(f"ws://127.0.0.1:{app.port}/") as client:
        first = [json.loads(await client.recv()) for _ in range(2)]
        assert [event["type"] for event in first] == ["users", "state"]
        await client.send(json.dumps({"action": "plus"}))
        await wait_for_value(client, 1)
        await client.send(json.dumps({"action": "sync"}))
        event = await wait_for_event(client, lambda e: True)
        assert event["type"] == "users"  # the sync's answer, no ack in between


async def test_the_python_client_counts_each_click_once_across_reconnects(app: App) -> None:
    async with Client(f"ws://127.0.0.1:{app.port}/c/clicks") as clicks:
        for _ in range(20):
            await clicks.plus()
        await clicks.settled()
        assert clicks.value == 20
        # The connection drops with ops on their way: they are resent, counted once.
        for _ in range(10):
            await clicks.plus()
        assert clicks.websocket is not None
        clicks.websocket.transport.abort()
        await clicks.settled()
        await clicks.wait(lambda: clicks.value == 30)
        assert clicks.connections >= 2
        assert (clicks.rejected, clicks.stale_states) == ([], 0)
    assert value(app, "clicks") == 30


async def test_seq_grows_with_every_change_and_never_goes_back(app: App) -> None:
    async with Client(f"ws://127.0.0.1:{app.port}/") as one:
        seen = [one.seq]
        for _ in range(5):
            await one.plus()
            await one.settled()
            seen.append(one.seq)
        assert seen == sorted(seen) and len(set(seen)) == len(seen)


async def test_a_sync_sent_before_the_first_messages_never_brings_an_older_state(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    app = await start_server(max_users_per_ip=1000, max_pending_per_ip=1000, **mode)
    clicker = await connect(f"ws://127.0.0.1:{app.port}/")

    async def click() -> None:
        for _ in range(300):
            await clicker.send(json.dumps({"action": "plus"}))
            await asyncio.sleep(0)

    clicking = asyncio.ensure_future(click())

    async def join_and_sync() -> list[int]:
        """Connect, ask for a sync at once, and return every seq of the states received."""
        async with connect(f"ws://127.0.0.1:{app.port}/") as client:
            await client.send(json.dumps({"action": "sync"}))
            await clicking
            await client.send("{}")  # its error reply marks the end
            seqs = []
            async with asyncio.timeout(TIMEOUT):
                while (event := json.loads(await client.recv()))["type"] != "error":
                    if event["type"] == "state":
                        seqs.append(event["seq"])
            return seqs

    received = await asyncio.gather(*(join_and_sync() for _ in range(50)))
    assert all(seqs == sorted(seqs) for seqs in received), received
