"""The server in-process on a free port, driven by real ``websockets`` clients."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import json
import logging
import random
import socket
import struct
import termios
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from counter_sync.app import App, start
from counter_sync.config import CLOSE_TIMEOUT, WRITE_BUFFER_LIMIT, Settings
from counter_sync.connection import Connection
from counter_sync.web import PAGE
from testkit.processes import TIMEOUT
from testkit.rawclient import RawClient, client_frame
from tests.conftest import StartServer
from tests.helpers import (
    is_state,
    join,
    room,
    settled,
    url,
    value,
    wait_for_event,
    wait_for_users,
    wait_for_value,
    wait_until,
)

PLUS = json.dumps({"action": "plus"})
MINUS = json.dumps({"action": "minus"})


def server_side(app: App, client: ClientConnection) -> Connection:
    """The server's end of a client's connection."""
    for websocket in room(app).users:
        if websocket.remote_address[:2] == client.local_address[:2]:
            return websocket
    raise AssertionError("client is not registered")


def log_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("counter_sync") and r.levelno == level
    ]


# --- Connecting, counting, broadcasting ---------------------------------------


async def test_a_new_client_gets_the_user_count_then_the_state(app: App) -> None:
    async with connect(url(app)) as client:
        assert json.loads(await client.recv()) == {"type": "users", "count": 1}
        state = json.loads(await client.recv())
        assert (state["type"], state["value"]) == ("state", 0)
        assert isinstance(state["seq"], int) and isinstance(state["epoch"], str)


# struct tcp_info (linux/tcp.h): tcpi_data_segs_out, the segments that carried data.
TCPI_DATA_SEGS_OUT = 156


async def test_the_handshake_response_and_the_first_messages_go_in_one_segment(
    app: App,
) -> None:
    # A write is a system call: a join storm pays one per newcomer, not three.
    await join(app)  # once it has read users and state
    (newcomer,) = room(app).users
    sock = newcomer.transport.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_DATA_SEGS_OUT + 4)
    assert struct.unpack_from("I", info, TCPI_DATA_SEGS_OUT)[0] == 1  # no Nagle: one per write


async def test_plus_and_minus_reach_three_clients(app: App) -> None:
    clients = [await join(app) for _ in range(3)]
    await clients[0].send(PLUS)
    for client in clients:
        await wait_for_value(client, 1)
    await clients[2].send(MINUS)
    await clients[2].send(MINUS)
    for client in clients:
        await wait_for_value(client, -1)
    assert value(app) == -1


async def test_user_count_follows_joins_and_leaves(app: App) -> None:
    first = await join(app)
    second = await join(app)
    await wait_for_users(first, 2)
    await second.close()
    await wait_for_users(first, 1)
    assert len(room(app).users) == 1


async def test_a_burst_in_one_loop_turn_costs_one_broadcast(app: App) -> None:
    listener = await join(app)
    sender = server_side(app, await join(app))
    await wait_for_users(listener, 2)
    for _ in range(500):  # no await in between: one loop turn
        room(app).flush.add(sender, +1)
    # Without coalescing the listener would see 1, 2, 3, ... first.
    assert is_state(json.loads(await listener.recv()), 500)


async def test_a_burst_from_many_clients_ends_every_client_on_the_exact_sum(
    app: App,
) -> None:
    clients = [await join(app) for _ in range(20)]
    rng = random.Random(7)
    plans = [[rng.choice((PLUS, MINUS)) for _ in range(50)] for _ in clients]
    expected = sum(1 if m == PLUS else -1 for plan in plans for m in plan)
    await asyncio.gather(*(c.send(m) for c, plan in zip(clients, plans, strict=True) for m in plan))
    await asyncio.gather(*(wait_for_value(c, expected) for c in clients))
    assert value(app) == expected


# --- How the server knows a client disconnected -------------------------------


async def test_clean_close_ends_the_loop_quietly_and_notifies_others(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    watcher = await join(app)
    leaver = await join(app)
    await wait_for_users(watcher, 2)
    await leaver.close()
    await wait_for_users(watcher, 1)
    assert any(
        "disconnected (clean_close): code 1000" in line for line in log_lines(caplog, logging.INFO)
    )
    assert not log_lines(caplog, logging.ERROR)


async def test_abrupt_disconnect_unregisters_and_notifies_others(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    watcher = await join(app)
    dropped = await join(app)
    await wait_for_users(watcher, 2)
    dropped.transport.abort()  # TCP reset, no close frame: a killed process
    await wait_for_users(watcher, 1)
    assert any(
        "disconnected (connection_lost): code 1006" in line
        for line in log_lines(caplog, logging.INFO)
    )
    assert not log_lines(caplog, logging.ERROR)


async def test_half_open_peer_is_dropped_by_the_keepalive_ping(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    app = await start_server(ping_interval=0.2, ping_timeout=0.2)
    watcher = await join(app, ping_interval=None)
    silent = await join(app, ping_interval=None)
    await wait_for_users(watcher, 2)
    # The peer stays connected but answers nothing, not even pings: to the
    # server this is a laptop that went to sleep.
    silent.transport.pause_reading()
    await wait_for_users(watcher, 1)
    assert any(
        "disconnected (keepalive_timeout): code 1011" in line
        for line in log_lines(caplog, logging.INFO)
    )
    assert any("keepalive ping timeout" in line for line in log_lines(caplog, logging.INFO))
    silent.transport.abort()


async def test_a_quiet_client_that_answers_pings_is_pinged_each_interval_and_kept(
    start_server: StartServer,
) -> None:
    # The sweep looks at a connection only when its next deadline comes: one
    # heard from (a pong) must be put back for the next ping, again and again.
    app = await start_server(ping_interval=0.2, ping_timeout=0.2)
    client = await RawClient.connect(app.port)
    loop = asyncio.get_running_loop()
    pings, end = 0, loop.time() + 1.5
    try:
        while True:
            try:
                async with asyncio.timeout_at(end):
                    opcode, length = struct.unpack("!BB", await client.reader.readexactly(2))
                    payload = await client.reader.readexactly(length & 0x7F)
            except TimeoutError:
                break
            assert opcode & 0x0F != 0x8, f"closed: {payload!r}"
            if opcode & 0x0F == 0x9:  # a ping: answered as a browser would
                pings += 1
                await client.send(client_frame(0xA, payload))
        # Silent for 1.5 s, seven intervals: pinged after each, never failed.
        assert pings >= 5
        await client.send(client_frame(0x1, b'{"action": "sync"}'))
        async with asyncio.timeout(TIMEOUT):
            while True:
                opcode, length = struct.unpack("!BB", await client.reader.readexactly(2))
                if b'"state"' in await client.reader.readexactly(length & 0x7F):
                    break
    finally:
        client.abort()


# --- Bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("plus", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"value": 5}', 'missing "action"'),
        ('{"action": "reset"}', "unknown action"),
        (b"\x00\x01", "binary frames are not supported"),
    ],
)
async def test_bad_message_gets_an_error_and_the_connection_goes_on(
    app: App, caplog: pytest.LogCaptureFixture, message: str | bytes, reason: str
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    client = await join(app)
    await client.send(message)
    error = await wait_for_event(client, lambda e: e["type"] == "error")
    assert reason in error["error"]
    warnings = log_lines(caplog, logging.WARNING)
    peer = "{}:{}".format(*client.local_address[:2])
    assert any(peer in line and reason in line for line in warnings)
    await client.send(PLUS)
    await wait_for_value(client, 1)  # still connected, and the bad message counted nothing


async def test_oversized_message_closes_only_that_connection_with_1009(
    start_server: StartServer,
) -> None:
    app = await start_server(max_message_size=1024)
    bystander = await join(app)
    offender = await join(app)
    await offender.send(json.dumps({"action": "plus", "pad": "x" * 2000}))
    with pytest.raises(ConnectionClosed) as closed:
        await wait_for_event(offender, lambda e: False)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    await wait_for_users(bystander, 1)
    await bystander.send(PLUS)
    await wait_for_value(bystander, 1)


async def test_actions_over_the_rate_limit_get_errors_and_are_not_counted(
    start_server: StartServer,
) -> None:
    app = await start_server(rate=0.001, burst=3)
    client = await join(app)
    for _ in range(5):
        await client.send(PLUS)
    errors = [await wait_for_event(client, lambda e: e["type"] == "error") for _ in range(2)]
    assert all("rate limit" in e["error"] for e in errors)
    await wait_until(lambda: value(app) == 3 and settled(app))
    other = await join(app)  # the limit is per connection
    await other.send(PLUS)
    await wait_for_value(other, 4)


class Message:
    """A generated client message and the change it must cause."""

    def __init__(self, payload: str | bytes, delta: int | None) -> None:
        self.payload = payload
        self.delta = delta  # None: must be rejected

    def __repr__(self) -> str:
        return f"Message({self.payload!r}, {self.delta})"


valid = st.sampled_from([Message(PLUS, 1), Message(MINUS, -1)])
invalid = st.one_of(
    st.text(max_size=50).map(lambda t: Message("x" + t, None)),  # never JSON
    st.binary(max_size=50).map(lambda b: Message(b, None)),
    st.lists(st.integers(), max_size=3).map(lambda v: Message(json.dumps(v), None)),
    st.text(max_size=10)
    .filter(lambda a: a not in ("plus", "minus"))
    .map(lambda a: Message(json.dumps({"action": a}), None)),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(messages=st.lists(st.one_of(valid, invalid), max_size=40))
def test_the_count_is_the_sum_of_accepted_actions(messages: list[Message]) -> None:
    async def scenario() -> None:
        app = await start(Settings(host="127.0.0.1", port=0, rate=0))
        try:
            client = await join(app)
            for message in messages:
                await client.send(message.payload)
            expected = sum(m.delta for m in messages if m.delta is not None)
            rejected = sum(m.delta is None for m in messages)
            # A last bad message marks the end: once its error arrives, the
            # server has read every message before it.
            await client.send("end")
            errors = 0
            async with asyncio.timeout(TIMEOUT):
                while errors < rejected + 1:
                    event: dict[str, Any] = json.loads(await client.recv())
                    errors += event["type"] == "error"
            await wait_until(lambda: settled(app))
            assert value(app) == expected
        finally:
            await app.close()

    asyncio.run(scenario())


# --- Slow and stalled clients -------------------------------------------------


def kernel_unsent_bytes(websocket: ServerConnection) -> int:
    """Bytes in the kernel's send queue for this socket (SIOCOUTQ)."""
    sock = websocket.transport.get_extra_info("socket")
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int(struct.unpack("i", raw)[0])


async def stall(app: App, updates: int) -> tuple[ClientConnection, ServerConnection, int, int]:
    """Make a client stop reading, then broadcast ``updates`` values one by one.

    Returns the client, the server's end of it, and the most bytes ever queued
    for it in user space and in the kernel.
    """
    stalled = await join(app)
    driver = server_side(app, await join(app))
    stalled_server_side = server_side(app, stalled)
    stalled.transport.pause_reading()  # it stops reading, and stays connected
    user_space = kernel = 0
    for _ in range(updates):
        room(app).flush.add(driver, +1)
        assert not app.hub.flusher.idle()
        await app.hub.flusher.drain()  # one broadcast per update
        user_space = max(user_space, stalled_server_side.transport.get_write_buffer_size())
        kernel = max(kernel, kernel_unsent_bytes(stalled_server_side))
    return stalled, stalled_server_side, user_space, kernel


async def test_a_stalled_reader_costs_bounded_memory_and_converges_when_it_resumes(
    app: App,
) -> None:
    updates = 12_000
    stalled, _, user_space, kernel = await stall(app, updates)
    # Without the skip, user space would hold every update (~30 bytes each).
    assert user_space <= WRITE_BUFFER_LIMIT + 1024
    # Without the SO_SNDBUF cap the kernel queues ~300 KiB here. With it, Linux
    # doubles the cap and lets the packet being built grow to 64 KiB.
    assert kernel <= 64 * 1024
    stalled.transport.resume_reading()
    received = 0
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = json.loads(await stalled.recv())
            received += 1
            if is_state(event, updates):
                break
    assert received < updates // 2, f"{received} messages for {updates} updates"


async def test_shutdown_does_not_wait_for_a_stalled_reader(app: App) -> None:
    stalled, _, user_space, _ = await stall(app, 8_000)
    assert user_space > WRITE_BUFFER_LIMIT  # its close frame cannot drain
    # The keepalive (20 s + 20 s) would end it eventually; shutdown must not wait.
    async with asyncio.timeout(CLOSE_TIMEOUT + 3):
        await app.close()
    assert not room(app).users
    stalled.transport.abort()


# --- Origins, caps, HTTP ------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [None, "null", "http://127.0.0.1:{port}", "https://counter.example"],
)
async def test_allowed_origins_connect(start_server: StartServer, origin: str | None) -> None:
    app = await start_server(origins=("https://counter.example",))
    headers = {} if origin is None else {"Origin": origin.format(port=app.port)}
    # connect() sends no Origin header unless told; the page's origin is set here.
    async with connect(url(app), origin=headers.get("Origin")) as client:  # type: ignore[arg-type]
        assert json.loads(await client.recv())["type"] == "users"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:1", "file://"])
async def test_other_origins_get_403(app: App, origin: str) -> None:
    with pytest.raises(InvalidStatus) as rejected:
        await connect(url(app), origin=origin)  # type: ignore[arg-type]
    assert rejected.value.response.status_code == 403
    assert not room(app).users


async def test_connections_beyond_the_cap_get_503(start_server: StartServer) -> None:
    app = await start_server(max_users=2)
    await join(app)
    await join(app)
    with pytest.raises(InvalidStatus) as rejected:
        await connect(url(app))
    assert rejected.value.response.status_code == 503
    assert len(room(app).users) == 2


def http_get(port: int, path: str) -> tuple[int, list[str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.headers.get_all("Content-Type") or [], response.read()
    finally:
        connection.close()


async def test_get_root_serves_the_page_as_html(app: App) -> None:
    status, content_types, body = await asyncio.to_thread(http_get, app.port, "/")
    assert status == 200
    assert content_types == ["text/html; charset=utf-8"]  # one header, not two
    assert body == PAGE.read_bytes()


async def test_get_root_with_a_query_still_serves_the_page(app: App) -> None:
    status, _, body = await asyncio.to_thread(http_get, app.port, "/?server=ws://x:1/")
    assert status == 200
    assert body == PAGE.read_bytes()


async def test_healthz_reports_users_and_value(app: App) -> None:
    client = await join(app)
    await client.send(PLUS)
    await wait_for_value(client, 1)
    status, content_types, body = await asyncio.to_thread(http_get, app.port, "/healthz")
    assert status == 200
    assert content_types == ["application/json"]
    assert json.loads(body) == {
        "status": "ok",
        "users": 1,
        "rooms": 1,
        "value": 1,
        "store": "ok",
    }


async def test_other_paths_are_404(app: App) -> None:
    status, _, _ = await asyncio.to_thread(http_get, app.port, "/admin")
    assert status == 404
    with pytest.raises(InvalidStatus) as rejected:
        await connect(f"ws://127.0.0.1:{app.port}/other")
    assert rejected.value.response.status_code == 404
