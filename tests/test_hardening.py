"""Hostile and unlucky clients: each hole abuse testing found, closed and pinned down.

Each test causes the problem the way an attacker or a bad network would (a
raw socket that floods pings and never reads, a client that stops reading,
silent sockets, pipelined requests, garbage) and checks what others see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import struct
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from counter_sync import counter
from counter_sync.app import App
from counter_sync.config import WRITE_BUFFER_LIMIT
from testkit.processes import TIMEOUT
from testkit.rawclient import (
    HOST,
    SMALL_RCVBUF,
    RawClient,
    bound_socket,
    check_upgraded,
    connected_socket,
    upgrade_request,
)
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    is_state,
    join,
    raw_http,
    room,
    settled,
    value,
    wait_for_event,
    wait_for_users,
    wait_for_value,
    wait_until,
)

PLUS = json.dumps({"action": "plus"})


def server_side(app: App, port: int) -> Any:
    """The server's end of the connection whose client port is ``port``."""
    for name in app.hub.rooms:
        for websocket in room(app, name).users:
            if websocket.remote_address[1] == port:
                return websocket
    raise AssertionError("not connected")


# --- 1. Read-side backpressure ---------------------------------------------------


async def test_a_ping_flood_from_a_client_that_never_reads_costs_bounded_memory(app: App) -> None:
    flooder = await RawClient.connect(app.port)
    flooder.stop_reading()
    port = flooder.writer.get_extra_info("sockname")[1]
    await wait_until(lambda: any(port == ws.remote_address[1] for ws in room(app).users))
    websocket = server_side(app, port)
    pings = flooder.frames(0x9, b"ping", 10_000)  # 100 KB of pings per write
    sent = 0
    most_queued = 0
    # Without read-side backpressure the server reads every ping and queues
    # a 6-byte pong for each: 2 MB of pings would queue ~1 MB of pongs.
    async with asyncio.timeout(TIMEOUT):
        while sent < 2_000_000:
            flooder.writer.write(pings)
            sent += len(pings)
            await asyncio.sleep(0)  # let the server read what it will
            most_queued = max(most_queued, websocket.transport.get_write_buffer_size())
            if flooder.writer.transport.get_write_buffer_size() > 1_000_000:
                break  # the server stopped reading: our own buffer fills
    assert most_queued <= WRITE_BUFFER_LIMIT + 256 * 1024 // 6 * 2
    assert websocket.reading_paused
    # Everyone else is served as usual meanwhile.
    other = await join(app)
    await other.send(PLUS)
    await wait_for_event(other, lambda event: is_state(event, 1))
    flooder.abort()


# --- 2. The liveness deadline --------------------------------------------------


async def test_a_stalled_reader_is_dropped_within_the_keepalive_deadline(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    interval, timeout = 1.0, 0.5
    app = await start_server(ping_interval=interval, ping_timeout=timeout)
    watcher = await join(app, ping_interval=None)
    driver = await join(app, ping_interval=None)
    loop = asyncio.get_running_loop()
    stalled = await stalled_reader(app.port)
    stalled_at = loop.time()
    await wait_for_users(watcher, 3)
    stalled_side = server_side(app, stalled.writer.get_extra_info("sockname")[1])
    # Updates back up behind the stalled reader until its writes are stuck: a
    # keepalive ping then waits behind them, and cannot be answered; only the
    # liveness deadline can drop it. One update at a time: a burst would be
    # coalesced into a few broadcasts.
    value = 0
    async with asyncio.timeout(TIMEOUT):
        while not stalled_side.paused_for_writes:
            value += 1
            await driver.send(PLUS)
            await wait_for_value(driver, value)
    assert loop.time() - stalled_at < interval + timeout, "stuck before the deadline"
    await wait_for_users(watcher, 2)
    # The deadline, then at most one sweep (a quarter of the interval), and slack.
    assert loop.time() - stalled_at <= interval + timeout + interval / 4 + 0.5
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("counter_sync")]
    assert any(
        "disconnected (liveness_deadline): code 1006, reason 'liveness deadline" in line
        for line in lines
    ), lines
    stalled.abort()


async def stalled_reader(port: int) -> RawClient:
    """A client that reads nothing, with a small receive window from the start.

    Set before it connects, the window the server is offered stays small, so
    the server's writes get stuck for good once its buffers are full; set
    later (as :meth:`RawClient.stop_reading` does), the kernel may still take
    tens of KiB more, and unstick them for a while.
    """
    sock = bound_socket(HOST, rcvbuf=SMALL_RCVBUF)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(port))
    async with asyncio.timeout(TIMEOUT):
        check_upgraded(await reader.readuntil(b"\r\n\r\n"))
    client = RawClient(reader, writer)
    client.stop_reading()
    return client


# --- 3. Admission before the handshake ------------------------------------------


async def silent_sockets(port: int, count: int, source: str) -> list[socket.socket]:
    return [await connected_socket(port, source) for _ in range(count)]


async def closed_by_server(sock: socket.socket) -> None:
    """Return once the server has closed or reset this socket."""
    with contextlib.suppress(ConnectionResetError):
        await asyncio.get_running_loop().sock_recv(sock, 1)


async def test_silent_sockets_beyond_the_per_address_cap_are_reset_and_others_get_in(
    start_server: StartServer,
) -> None:
    app = await start_server(max_pending_per_ip=5)
    sockets = await silent_sockets(app.port, 20, "127.0.0.1")
    reads = {asyncio.ensure_future(closed_by_server(sock)) for sock in sockets}
    try:
        closed: set[asyncio.Future[None]] = set()
        async with asyncio.timeout(TIMEOUT):
            while len(closed) < 15:
                done, _ = await asyncio.wait(reads - closed, return_when=asyncio.FIRST_COMPLETED)
                closed |= done
        assert app.hub.gate.handshakes_by_address["127.0.0.1"] == 5
        async with asyncio.timeout(1):
            client = await connect(
                f"ws://127.0.0.1:{app.port}/",
                sock=await connected_socket(app.port, "127.0.0.2"),
            )
            await client.recv()
    finally:
        for read in reads:
            read.cancel()
        for sock in sockets:
            sock.close()


def test_silent_sockets_beyond_the_open_files_limit_leave_room_for_others(
    server_process: StartProcess,
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        pytest.skip(f"the test needs 1300 open files itself (the limit is {soft})")
    process = server_process(open_files=1024)  # a limit it cannot raise
    assert "open-files limit 1024 is below" in process.log

    async def scenario() -> None:
        sockets = await silent_sockets(process.port, 1100, "127.0.0.1")
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with connect(
                process.url, sock=await connected_socket(process.port, "127.0.0.2")
            ) as client:
                assert json.loads(await client.recv())["type"] == "users"
            assert loop.time() - started < 1.0
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", process.port, local_addr=("127.0.0.3", 0)
            )
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(1):
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.close()
        finally:
            for sock in sockets:
                sock.close()

    asyncio.run(scenario())
    returncode, log = process.stop()
    assert returncode == 0, log
    assert "Traceback" not in log


def test_a_limit_that_fits_the_caps_shortens_the_listen_queue_not_the_caps(
    server_process: StartProcess,
) -> None:
    # 800 users, 100 pending and 64 spare fit in 1024 files; the queue of 4096
    # connections not yet accepted holds no file: it gives way, not the users.
    process = server_process("--max-users", "800", "--max-pending", "100", open_files=1024)
    assert "open-files limit 1024: listen backlog 60 (of 4096)" in process.log, process.log
    assert "is below" not in process.log
    returncode, log = process.stop()
    assert returncode == 0, log


# --- 4. Per-address connection cap ------------------------------------------------


async def test_connections_beyond_the_per_address_cap_get_429(start_server: StartServer) -> None:
    app = await start_server(max_users_per_ip=2)
    for _ in range(2):
        await join(app)
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{app.port}/")
    assert refused.value.response.status_code == 429
    client = await connect(
        f"ws://127.0.0.1:{app.port}/", sock=await connected_socket(app.port, "127.0.0.2")
    )
    assert json.loads(await client.recv())["type"] == "users"


async def test_a_trusted_proxy_names_the_client_and_others_cannot(
    start_server: StartServer,
) -> None:
    app = await start_server(max_users_per_ip=1, trusted_proxies=("127.0.0.1",))
    url = f"ws://127.0.0.1:{app.port}/"
    # Through the proxy: two clients, two addresses, one connection each.
    await connect(url, additional_headers={"X-Forwarded-For": "203.0.113.7"})
    await connect(url, additional_headers={"X-Forwarded-For": "203.0.113.8"})
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, additional_headers={"X-Forwarded-For": "203.0.113.7"})
    assert refused.value.response.status_code == 429
    # 127.0.0.2 is not a proxy: its header is ignored, its own address counts.
    untrusted = {"X-Forwarded-For": "198.51.100.1"}
    await connect(
        url, sock=await connected_socket(app.port, "127.0.0.2"), additional_headers=untrusted
    )
    with pytest.raises(InvalidStatus):
        await connect(
            url,
            sock=await connected_socket(app.port, "127.0.0.2"),
            additional_headers={"X-Forwarded-For": "198.51.100.2"},
        )


# --- 5. HTTP edge cases ------------------------------------------------------------


async def test_pipelined_requests_get_the_first_answered_and_no_error(
    app: App, errors: None
) -> None:
    for _ in range(20):
        response = await raw_http(
            app.port,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert response.startswith(b"HTTP/1.1 200"), response


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 100,  # TLS to a plain port
        b"garbage\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /c/x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    ],
    ids=["tls", "garbage", "http-1.0", "post", "long-header", "bad-upgrade", "upgrade-pipelined"],
)
async def test_malformed_requests_get_an_answer_or_a_close_and_no_error(
    start_server: StartServer, errors: None, request_bytes: bytes
) -> None:
    # A request whose head never ends (TLS) is closed at the handshake
    # deadline: a second instead of the default five.
    app = await start_server(handshake_timeout=1.0)
    await raw_http(app.port, request_bytes)
    client = await join(app)  # the server carries on
    await client.send(PLUS)
    await wait_for_event(client, lambda event: is_state(event, 1))


# --- 6. Bounded logs -------------------------------------------------------------------


async def test_garbage_senders_write_one_warning_each_per_interval(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    clients = [await join(app) for _ in range(20)]
    for client in clients:
        for _ in range(100):
            await client.send("not json")
    for client in clients:  # every error reply read: every message was handled
        for _ in range(100):
            await wait_for_event(client, lambda event: event["type"] == "error")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(clients)


async def test_an_over_the_limit_client_is_logged_once_per_interval_not_per_episode(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    rate = 50.0
    app = await start_server(rate=rate, burst=1)
    client = await join(app)
    # Episodes: an accepted message, then one over the limit. The old "once
    # per episode" warning logged again after every accepted one.
    value = episodes = 0
    for _ in range(5):
        await client.send(PLUS)
        await client.send(PLUS)  # at once: over the limit, the bucket held one
        before, refused = value, 0
        async with asyncio.timeout(TIMEOUT):
            while value - before + refused < 2:  # both answered, in either order
                event = json.loads(await client.recv())
                if event["type"] == "error":
                    refused += 1
                elif event["type"] == "state":
                    value = event["value"]
        episodes += (value - before, refused) == (1, 1)
        # Time passing is the point: one token refills in 1 / rate, the least.
        await asyncio.sleep(1 / rate)
    assert episodes >= 2  # (each round is one, unless the test was held up 1 / rate)
    lines = [r.getMessage() for r in caplog.records if "rate limit" in r.getMessage()]
    assert len(lines) == 1


# --- 10. Origins that DNS rebinding cannot fake --------------------------------------


def as_if_from(host: str, app: App) -> dict[str, Any]:
    """``connect()`` options for a browser that loaded the page from ``host`` (and
    resolved it to this server): that Host header, that Origin, this server's socket."""
    return {
        "uri": f"ws://{host}:{app.port}/",
        "host": "127.0.0.1",
        "port": app.port,
        "origin": f"http://{host}:{app.port}",
    }


async def test_a_dns_rebinding_page_is_refused(app: App) -> None:
    # evil.example resolved to the attacker first, then to 127.0.0.1: the
    # browser sends the attacker's name as Host and as Origin.
    with pytest.raises(InvalidStatus) as refused:
        await connect(**as_if_from("evil.example", app))
    assert refused.value.response.status_code == 403


async def test_a_repeated_host_header_is_a_bad_request(app: App) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{app.port}/", additional_headers={"Host": "other"})
    assert refused.value.response.status_code == 400


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "app.localhost"])
async def test_the_servers_own_page_at_an_address_or_localhost_gets_in(app: App, host: str) -> None:
    async with connect(**as_if_from(host, app)) as client:
        assert json.loads(await client.recv())["type"] == "users"


async def test_a_name_given_with_origin_gets_in_behind_a_proxy(start_server: StartServer) -> None:
    app = await start_server(origins=("https://counter.example",))
    # As nginx passes it on: Host counter.example, the page's origin.
    async with connect(
        "ws://counter.example/",
        host="127.0.0.1",
        port=app.port,
        origin="https://counter.example",  # type: ignore[arg-type]
    ) as client:
        assert json.loads(await client.recv())["type"] == "users"
    with pytest.raises(InvalidStatus) as refused:
        await connect(
            "ws://counter.example/",
            host="127.0.0.1",
            port=app.port,
            origin="https://other.example",  # type: ignore[arg-type]
        )
    assert refused.value.response.status_code == 403


# --- 12. What no test pinned before ------------------------------------------------------


async def test_a_bug_in_the_receive_loop_still_unregisters_and_notifies_others(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = await join(app)
    victim = await join(app)
    await wait_for_users(watcher, 2)

    def broken(message: str | bytes) -> str:
        raise RuntimeError("a bug in parsing")

    monkeypatch.setattr(counter, "parse_message", broken)
    await victim.send(PLUS)
    await wait_for_users(watcher, 1)
    assert len(room(app).users) == 1


async def test_a_handshake_storm_past_max_users_gets_1013_for_the_extra_ones(
    start_server: StartServer,
) -> None:
    app = await start_server(max_users=3)
    results = await asyncio.gather(
        *(connect(f"ws://127.0.0.1:{app.port}/") for _ in range(12)), return_exceptions=True
    )
    outcomes: list[object] = []
    for result in results:
        if isinstance(result, InvalidStatus):
            outcomes.append(result.response.status_code)
            continue
        assert isinstance(result, ClientConnection), result
        try:
            await result.send("{}")  # a client that got in is answered with an error event
            await wait_for_event(result, lambda event: event["type"] == "error")
            outcomes.append("in")
        except ConnectionClosed as closed:
            outcomes.append(closed.rcvd.code if closed.rcvd else None)
    assert outcomes.count("in") == 3
    assert set(outcomes) - {"in"} <= {503, 1013}
    assert len(room(app).users) == 3


# --- The sync action and the admission probe --------------------------------------------


async def test_sync_answers_the_asker_alone_with_users_then_state(app: App) -> None:
    asker = await join(app)
    other = await join(app)
    await wait_for_users(asker, 2)
    await asker.send(json.dumps({"action": "sync"}))
    assert json.loads(await asker.recv()) == {"type": "users", "count": 2}
    assert is_state(json.loads(await asker.recv()), 0)
    await other.send("{}")  # before this mark's reply, no state: the sync's answer was not its
    async with asyncio.timeout(TIMEOUT):
        while (event := json.loads(await other.recv()))["type"] != "error":
            assert event["type"] == "users"  # a user count it may be sent at any time


async def probe(port: int, query: str, source: str = "127.0.0.1") -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(f"GET /admission?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Access-Control-Allow-Origin: *" in head
    result: dict[str, Any] = json.loads(body)
    return result


async def test_the_admission_probe_says_why_a_handshake_would_be_refused(
    start_server: StartServer,
) -> None:
    app = await start_server(max_users_per_ip=1, max_rooms=2)
    assert await probe(app.port, "room=votes") == {"admitted": True}
    await join(app)
    assert await probe(app.port, "") == {
        "admitted": False,
        "status": 429,
        "reason": "too many connections from your address",
    }
    await join(app, "/c/votes", sock=await connected_socket(app.port, "127.0.0.2"))
    assert await probe(app.port, "room=other", source="127.0.0.3") == {
        "admitted": False,
        "status": 503,
        "reason": "too many counters in use",
    }
    assert (await probe(app.port, "origin=http://evil.example", source="127.0.0.3"))[
        "reason"
    ] == "origin not allowed"
    assert (await probe(app.port, "room=no%20such", source="127.0.0.3"))["status"] == 404


async def test_a_client_that_keeps_sending_past_its_rate_limit_is_closed_with_1008(
    start_server: StartServer,
) -> None:
    app = await start_server(rate=1.0, burst=5)
    bystander = await join(app)
    flooder = await join(app)
    for _ in range(50):
        with contextlib.suppress(ConnectionClosed):
            await flooder.send(PLUS)
    with pytest.raises(ConnectionClosed) as closed:
        await wait_for_event(flooder, lambda event: False)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    await wait_for_users(bystander, 1)
    await bystander.send(PLUS)
    await wait_for_event(bystander, lambda event: event.get("value", 0) >= 1)


async def read_frame(client: RawClient) -> tuple[int, bytes]:
    """The next frame the server sent: its opcode and payload."""
    head = await client.reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", await client.reader.readexactly(2))[0]
    return head[0] & 0x0F, await client.reader.readexactly(length)


async def test_a_connection_the_server_is_closing_is_sent_nothing_after_its_close_frame(
    start_server: StartServer,
) -> None:
    # Closed for its rate, the flooder holds back its own close frame: the
    # server waits for it, with the flooder still in the room, while the
    # bystander's actions go on.
    app = await start_server(rate=1.0, burst=5)
    bystander = await join(app)
    flooder = await RawClient.connect(app.port)
    await wait_for_users(bystander, 2)
    await flooder.send(flooder.frames(0x1, PLUS.encode(), 50))
    async with asyncio.timeout(TIMEOUT):
        while (await read_frame(flooder))[0] != 0x8:
            pass
    await wait_until(lambda: settled(app))
    await bystander.send(PLUS)
    await wait_for_value(bystander, value(app) + 1)
    assert len(room(app).users) == 2, "the flooder left before the broadcast"
    await flooder.send(flooder.frames(0x8, struct.pack("!H", 1000), 1))
    after: list[int] = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
        async with asyncio.timeout(TIMEOUT):
            while True:
                after.append((await read_frame(flooder))[0])
    assert after == []
    flooder.abort()


async def test_a_message_that_crosses_the_servers_close_frame_ends_quietly(
    app: App, errors: None
) -> None:
    client = await RawClient.connect(app.port)
    closing = asyncio.create_task(app.close())  # as on SIGTERM: a close frame to everyone
    async with asyncio.timeout(TIMEOUT):
        head = b""
        while not head or head[0] & 0x0F != 0x8:  # skip users and state, up to the close
            head = await client.reader.readexactly(2)
            await client.reader.readexactly(head[1] & 0x7F)
    # Sent after the server's close frame, before ours: the server reads it while
    # closing, and its error reply cannot be sent any more.
    await client.send(client.frames(0x1, b"not json", 1))
    registry = app.hub.metrics.registry
    await wait_until(
        lambda: (
            registry.get_sample_value("counter_sync_actions_total", {"result": "bad_message"}) == 1
        )
    )
    await client.send(client.frames(0x8, struct.pack("!H", 1000), 1))
    await closing
    client.abort()
