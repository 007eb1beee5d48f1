"""The HTTP side of the port, through the wire: what a request names, what a malformed one gets,
who gets in while silent sockets crowd the pending cap, who a proxy's request is from,
and how many plain requests one address may send.

Requests are written byte for byte on plain sockets, from the loopback
address each test needs: the caps are per client address, and Linux routes
all of 127.0.0.0/8 to the loopback device.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import Sequence

import pytest
from websockets.exceptions import InvalidStatus

from counter_sync import admission
from counter_sync.admission import RequestRate
from counter_sync.app import App
from counter_sync.config import MAX_RATED_ADDRESSES
from counter_sync.store import DEFAULT_ROOM
from testkit.processes import TIMEOUT
from testkit.rawclient import RawClient, connected_socket, tcp_open
from tests.conftest import StartServer
from tests.helpers import join, raw_http, room, wait_until

PROXY = "127.0.0.1"  # trusted in the tests of proxies; the others have no proxy
CLIENT = "203.0.113.7"  # a client behind the proxy, as its X-Forwarded-For names it
SESSION = "a-session-id-0123456789"
TWO_ORIGINS = [("Origin", "http://a"), ("Origin", "http://b")]
UPGRADE = [
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated one keeps its last value
    body: bytes


async def ask(
    port: int,
    target: str = "/healthz",
    headers: Sequence[tuple[str, str]] = (),
    *,
    upgrade: bool = False,
    source: str = "127.0.0.1",
) -> Answer:
    """Send one GET (an opening handshake with ``upgrade``) and read the answer to the end.

    Not for a handshake that succeeds: the server keeps that connection open.
    """
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if upgrade:
        lines += UPGRADE
    lines += [f"{name}: {value}" for name, value in headers]
    response = await raw_http(
        port, "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n", source
    )
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return Answer(int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body)


def sample(app: App, name: str, **labels: str) -> float:
    value = app.hub.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("counter_sync")]


async def closed_by_server(sock: socket.socket) -> None:
    """Return once the server has closed or reset this socket."""
    with contextlib.suppress(ConnectionResetError):
        await asyncio.get_running_loop().sock_recv(sock, 1)


async def sockets_from(port: int, source: str, count: int) -> list[socket.socket]:
    return [await connected_socket(port, source) for _ in range(count)]


# --- 1. The room: read once, from the target as a browser sends it -----------------


@pytest.mark.parametrize("target", ["/c/x#y", "//h/c/x", "http://h/c/x", "/c/", "/c/a/b", "/%63/x"])
async def test_an_upgrade_to_anything_but_a_room_path_is_404_before_the_handshake(
    app: App, errors: None, target: str
) -> None:
    answer = await ask(app.port, target, upgrade=True)
    assert answer.status == 404
    assert set(app.hub.rooms) == {DEFAULT_ROOM}  # no room opened, under whatever name


@pytest.mark.parametrize(
    ("target", "name"),
    [("/", DEFAULT_ROOM), ("/?x=1", DEFAULT_ROOM), ("/c/x", "x"), (f"/c/x?session={SESSION}", "x")],
)
async def test_an_upgrade_to_a_room_path_with_or_without_a_query_joins_that_room(
    app: App, errors: None, target: str, name: str
) -> None:
    client = await RawClient.connect(app.port, path=target)
    await wait_until(lambda: name in app.hub.rooms and len(room(app, name).users) == 1)
    client.abort()


# --- 4. Malformed requests: 400 with the reason, never a traceback ------------------


@pytest.mark.parametrize(
    ("target", "headers", "upgrade", "reason"),
    [
        ("/healthz", [("Host", "other")], False, "repeated Host header"),
        ("/", [("Host", "other")], True, "repeated Host header"),
        ("/", TWO_ORIGINS, True, "repeated Origin header"),
        ("/healthz", TWO_ORIGINS, False, "repeated Origin header"),
        ("/", [("Origin", "http://[")], True, "malformed Origin header"),
        ("/admission?origin=http://%5B", [], False, "malformed Origin header"),
        ("/admission?origin=%0D%0Ax", [], False, "invalid Origin header"),
        ("/c/x?session=short", [], True, "bad session: 16 to 64 characters of A-Z a-z 0-9 _ -"),
    ],
    ids=[
        "host-healthz",
        "host-upgrade",
        "origin-upgrade",
        "origin-healthz",
        "origin-unparsable",
        "origin-unparsable-probe",
        "origin-newline-probe",
        "session",
    ],
)
async def test_a_malformed_request_is_a_400_with_its_reason_and_no_traceback(
    app: App,
    errors: None,
    caplog: pytest.LogCaptureFixture,
    target: str,
    headers: list[tuple[str, str]],
    upgrade: bool,
    reason: str,
) -> None:
    answer = await ask(app.port, target, headers, upgrade=upgrade)
    assert (answer.status, answer.body) == (400, f"{reason}\n".encode())
    assert not any(record.exc_info for record in caplog.records)
    assert any(f"sent a malformed request: {reason}" in line for line in messages(caplog))


async def test_a_repeated_upgrade_header_is_one_list_on_any_path(app: App, errors: None) -> None:
    # RFC 9110 5.3: repeated lines of a list-valued header are one comma-separated list.
    twice = [("Upgrade", "websocket"), ("Upgrade", "h2c")]
    assert (await ask(app.port, "/healthz", twice)).status == 200
    assert (await ask(app.port, "/c/", twice)).status == 404


async def test_a_repeated_accept_header_on_metrics_is_one_list(app: App, errors: None) -> None:
    answer = await ask(app.port, "/metrics", [("Accept", "text/plain"), ("Accept", "*/*")])
    assert answer.status == 200
    assert b"counter_sync_connections" in answer.body


# --- 5. Silent sockets at the pending cap -------------------------------------------


async def test_at_the_pending_cap_the_socket_silent_longest_makes_room(
    start_server: StartServer,
) -> None:
    app = await start_server(max_pending=6, max_pending_per_ip=3)
    silent = await sockets_from(app.port, "127.0.0.2", 3) + await sockets_from(
        app.port, "127.0.0.3", 3
    )
    await wait_until(lambda: app.hub.gate.handshakes == 6)
    client = await join(app, sock=await connected_socket(app.port, "127.0.0.4"))
    async with asyncio.timeout(TIMEOUT):
        await closed_by_server(silent[0])
    assert [tcp_open(sock) for sock in silent] == [False] + [True] * 5
    assert sample(app, "counter_sync_handshakes_rejected_total", reason="silent") == 1
    await client.close()
    for sock in silent:
        sock.close()


async def test_a_pending_connection_that_has_sent_bytes_is_never_evicted(
    start_server: StartServer,
) -> None:
    app = await start_server(max_pending=2, max_pending_per_ip=2)
    talking = await sockets_from(app.port, "127.0.0.2", 2)
    for sock in talking:
        sock.send(b"GET / HTTP/1.1\r\n")  # the start of a request: it is talking
    await wait_until(lambda: app.hub.gate.handshakes == 2 and not app.hub.gate.silent)
    newcomer = await connected_socket(app.port, "127.0.0.3")
    async with asyncio.timeout(TIMEOUT):
        await closed_by_server(newcomer)  # nobody to evict: reset
    assert all(tcp_open(sock) for sock in talking)
    assert sample(app, "counter_sync_handshakes_rejected_total", reason="pending") == 1
    for sock in [*talking, newcomer]:
        sock.close()


async def test_a_handshake_started_under_pressure_gets_the_shorter_deadline(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    shorter = 0.5
    monkeypatch.setattr(admission, "HANDSHAKE_TIMEOUT_UNDER_PRESSURE", shorter)
    app = await start_server(max_pending=4, handshake_timeout=60.0)
    # Two of four pending is not over half: these two get the full minute.
    early = await sockets_from(app.port, "127.0.0.2", 2)
    await wait_until(lambda: app.hub.gate.handshakes == 2)
    loop = asyncio.get_running_loop()
    started = loop.time()  # before the server accepts it: its deadline runs from then
    trickler = await connected_socket(app.port, "127.0.0.3")
    trickler.send(b"GET / HTTP/1.1\r\n")  # and nothing more: it is never evicted as silent
    async with asyncio.timeout(TIMEOUT):
        await closed_by_server(trickler)
    # Its own deadline, not the full minute, and not sooner (a refusal).
    assert shorter <= loop.time() - started < shorter + 1
    assert all(tcp_open(sock) for sock in early)
    for sock in [*early, trickler]:
        sock.close()


async def test_an_api_write_whose_body_never_comes_ends_at_the_handshake_deadline(
    start_server: StartServer,
) -> None:
    # The deadline is the gate's one timer for every handshake: it must end
    # the handshake wherever it waits, here for a body, and not only reset
    # the socket, or the waiting task would stay for good.
    key = "backend-key-0123456789"
    app = await start_server(api_keys=(key.encode(),), handshake_timeout=0.5)
    tasks_before = len(app.server.handler_tasks)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sock = await connected_socket(app.port, "127.0.0.2")
    sock.send(
        b"POST /api/counters/votes HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {key}\r\n".encode()
        + b'Content-Length: 10\r\n\r\n{"add"'  # 6 of its 10 bytes
    )
    async with asyncio.timeout(TIMEOUT):
        await closed_by_server(sock)
    assert 0.5 <= loop.time() - started < 1.5
    await wait_until(lambda: len(app.server.handler_tasks) == tasks_before)
    assert (await ask(app.port)).status == 200  # and the server carries on
    sock.close()


async def reopen_silently(port: int, source: str, opened: list[socket.socket]) -> None:
    """Hold one silent socket from ``source``; open another each time the server drops it."""
    while True:
        sock = await connected_socket(port, source)
        opened.append(sock)
        with sock:
            await closed_by_server(sock)


async def test_silent_sockets_from_many_addresses_do_not_lock_out_clients_or_probes(
    start_server: StartServer,
) -> None:
    # The attack of issue 14 (50 addresses x 20 silent sockets against a
    # --max-pending of 1,000), scaled down: each address within its own cap,
    # together exactly at the overall one, reopening what the server drops.
    app = await start_server(max_pending=40, max_pending_per_ip=4, handshake_timeout=60.0)
    opened: list[socket.socket] = []
    attack = [
        asyncio.create_task(reopen_silently(app.port, f"127.0.0.{2 + index // 4}", opened))
        for index in range(40)
    ]
    try:
        await wait_until(lambda: app.hub.gate.handshakes == 40)
        for index in range(20):
            source = f"127.0.0.{100 + index}"
            client = await join(app, sock=await connected_socket(app.port, source))
            await client.close()
        probes = [await ask(app.port, source=f"127.0.0.{150 + index}") for index in range(10)]
        assert [answer.status for answer in probes] == [200] * 10
        assert len(opened) > 40  # the attack went on: the evicted came back
    finally:
        for task in attack:
            task.cancel()
        await asyncio.gather(*attack, return_exceptions=True)


# --- 6. Behind a trusted proxy ------------------------------------------------------


@pytest.mark.parametrize(
    "forwarded", ["garbage", f"{CLIENT}, garbage", f"{CLIENT}:443", "", f"{CLIENT},"]
)
async def test_a_garbled_forwarded_hop_from_a_trusted_proxy_is_a_bad_request(
    start_server: StartServer, errors: None, forwarded: str
) -> None:
    app = await start_server(trusted_proxies=(PROXY,))
    answer = await ask(app.port, "/", [("X-Forwarded-For", forwarded)], upgrade=True)
    assert (answer.status, answer.body) == (400, b"garbled X-Forwarded-For header\n")


async def test_what_the_client_wrote_left_of_its_address_is_never_read(
    start_server: StartServer,
) -> None:
    app = await start_server(trusted_proxies=(PROXY,), max_users_per_ip=1)
    await join(app, additional_headers={"X-Forwarded-For": f"garbage, {CLIENT}"})
    with pytest.raises(InvalidStatus) as refused:  # counted as CLIENT: its one place is taken
        await join(app, additional_headers={"X-Forwarded-For": f"198.51.100.1, {CLIENT}"})
    assert refused.value.response.status_code == 429
    await join(app, additional_headers={"X-Forwarded-For": "198.51.100.1"})


async def test_garbled_hops_use_up_no_quota_of_the_proxy_or_its_clients(
    start_server: StartServer,
) -> None:
    app = await start_server(
        trusted_proxies=(PROXY,), max_users_per_ip=1, http_rate=0.001, http_burst=2
    )
    garbled = [("X-Forwarded-For", "garbage")]
    for _ in range(5):
        assert (await ask(app.port, "/healthz", garbled)).status == 400
        assert (await ask(app.port, "/", garbled, upgrade=True)).status == 400
    # The proxy's own requests (a load balancer's probe) and its clients' are untouched.
    assert (await ask(app.port, "/healthz")).status == 200
    assert (await ask(app.port, "/healthz", [("X-Forwarded-For", CLIENT)])).status == 200
    await join(app)
    await join(app, additional_headers={"X-Forwarded-For": CLIENT})


async def test_every_log_line_about_a_client_behind_a_proxy_names_the_client(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    app = await start_server(trusted_proxies=(PROXY,), max_users_per_ip=1, http_burst=1)
    forwarded = {"X-Forwarded-For": CLIENT}
    client = await join(app, additional_headers=forwarded)
    with pytest.raises(InvalidStatus):
        await join(app, additional_headers=forwarded)
    await client.send("not json")
    assert json.loads(await client.recv())["type"] == "error"
    await ask(app.port, "/healthz", list(forwarded.items()))
    assert (await ask(app.port, "/healthz", list(forwarded.items()))).status == 429
    await client.close()
    await wait_until(lambda: any("disconnected" in line for line in messages(caplog)))
    lines = messages(caplog)
    for what in (
        "connected to /",
        "rejected: 1 users from",
        "sent a bad message",
        "is over the HTTP request rate",
        "disconnected (clean_close)",
    ):
        assert any(line.startswith(f"{CLIENT} {what}") for line in lines), (what, lines)
    assert not any(PROXY in line for line in lines if not line.startswith("listening")), lines


# --- 7. Plain HTTP requests: a rate per client address, and counted ------------------


async def test_plain_requests_beyond_the_burst_get_429_with_retry_after(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    app = await start_server(http_rate=0.5, http_burst=3)
    await join(app)  # an upgrade spends no token: the caps are for those
    assert [(await ask(app.port)).status for _ in range(3)] == [200] * 3
    refused = await ask(app.port, "/nowhere")  # a 404 costs the same
    assert (refused.status, refused.headers["retry-after"], refused.body) == (
        429,
        "2",
        b"too many requests\n",
    )
    assert (await ask(app.port, source="127.0.0.2")).status == 200  # another address
    assert sum("over the HTTP request rate" in line for line in messages(caplog)) == 1


async def test_an_address_told_429_that_knocks_before_its_next_token_is_reset_at_accept(
    start_server: StartServer,
) -> None:
    app = await start_server(http_rate=0.001, http_burst=1)
    assert (await ask(app.port)).status == 200
    assert (await ask(app.port)).status == 429
    knocking = await connected_socket(app.port, "127.0.0.1")
    async with asyncio.timeout(TIMEOUT):
        await closed_by_server(knocking)  # before a byte of its request is read
    knocking.close()
    assert sample(app, "counter_sync_handshakes_rejected_total", reason="http_rate") == 1
    assert (await ask(app.port, source="127.0.0.2")).status == 200


async def test_an_upgrade_header_on_a_plain_endpoint_is_still_a_plain_request(
    start_server: StartServer,
) -> None:
    app = await start_server(http_rate=0.001, http_burst=1)
    assert (await ask(app.port, "/healthz", upgrade=True)).status == 200
    assert (await ask(app.port, "/healthz", upgrade=True)).status == 429


async def test_the_limit_behind_a_proxy_is_per_forwarded_client(start_server: StartServer) -> None:
    app = await start_server(trusted_proxies=(PROXY,), http_rate=0.001, http_burst=1)
    first, second = [("X-Forwarded-For", CLIENT)], [("X-Forwarded-For", "198.51.100.1")]
    assert (await ask(app.port, "/healthz", first)).status == 200
    assert (await ask(app.port, "/healthz", first)).status == 429
    assert (await ask(app.port, "/healthz", second)).status == 200


async def test_http_requests_are_counted_by_endpoint_and_status(start_server: StartServer) -> None:
    app = await start_server(http_rate=0.001, http_burst=4)
    client = await join(app)
    for target in ("/healthz", "/", "/nowhere", "/favicon.ico", "/healthz"):
        await ask(app.port, target)
    await client.close()
    counted = {
        (endpoint, status): sample(
            app, "counter_sync_http_requests_total", endpoint=endpoint, status=status
        )
        for endpoint, status in [
            ("websocket", "101"),
            ("healthz", "200"),
            ("page", "200"),
            ("other", "404"),
            ("favicon", "204"),
            ("healthz", "429"),
        ]
    }
    assert counted == {
        ("websocket", "101"): 1,
        ("healthz", "200"): 1,
        ("page", "200"): 1,
        ("other", "404"): 1,
        ("favicon", "204"): 1,
        ("healthz", "429"): 1,  # the fifth plain request: the burst was 4
    }


def test_the_table_of_request_rates_keeps_the_addresses_heard_from_last() -> None:
    rates = RequestRate(1.0, 1)
    addresses = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(20_000)]
    for address in addresses:
        assert rates.retry_after(address, 0.0) is None
    assert len(rates.limits) == MAX_RATED_ADDRESSES
    assert rates.retry_after(addresses[-1], 0.0) == 1  # remembered: its token is spent
    assert rates.retry_after(addresses[0], 0.0) is None  # forgotten: a fresh bucket
