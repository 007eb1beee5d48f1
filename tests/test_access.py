"""Who may read and who may change, through the wire: tokens, anonymous users, per-user caps.

Most tests run in each mode (memory, ``--state``, ``--redis``): the rules are
the server's, but what they guard (a change, a read) goes through each store.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from counter_sync.app import App
from counter_sync.config import SWEEP_PERIOD
from testkit.processes import TIMEOUT
from tests.conftest import StartProcess, StartServer
from tests.helpers import http_request, value, wait_for_event, wait_for_value, wait_until

SECRET = b"a-secret-for-tests-that-is-long-enough"
PLUS = json.dumps({"action": "plus"})


def mint(secret: bytes = SECRET, **claims: Any) -> str:
    """A token for ``/``, valid a minute, reading only, unless ``claims`` say otherwise."""
    body: dict[str, Any] = {"sub": "ada", "exp": time.time() + 60, "rooms": ["/"]}
    body.update(claims)
    return jwt.encode({name: v for name, v in body.items() if v is not None}, secret, "HS256")


def ws_url(app: App, path: str = "/", token: str | None = None) -> str:
    query = f"?token={token}" if token else ""
    return f"ws://127.0.0.1:{app.port}{path}{query}"


async def first_messages(client: ClientConnection, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT):
        return [json.loads(await client.recv()) for _ in range(count)]


async def refused(url: str, **options: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as refusal:
        await connect(url, **options)
    response = refusal.value.response
    return response.status_code, response.body.decode().strip()


@pytest.fixture
async def app(start_server: StartServer, mode: dict[str, Any]) -> App:
    """A server with tokens (anonymous users may read) in each mode."""
    return await start_server(token_secret=SECRET, **mode)


# --- Tokens before the upgrade ------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "status", "reason"),
    [
        ({"secret": b"another-secret-of-thirty-two-bytes!"}, 401, "the token is not valid"),
        ({"exp": -5}, 401, "the token has expired"),
        ({"rooms": None}, 401, 'the token has no "rooms" claim'),
        ({"sub": None}, 401, 'the token has no "sub" claim'),
        ({"rooms": ["votes", "poll-*"]}, 403, "the token is not for this counter"),
    ],
    ids=["signature", "expired", "no rooms", "no sub", "other rooms"],
)
async def test_a_token_that_does_not_open_the_counter_is_refused_before_the_upgrade(
    app: App, claims: dict[str, Any], status: int, reason: str
) -> None:
    # Minted here, not at collection: a token made then may expire before its test runs.
    fields = dict(claims)
    secret = fields.pop("secret", SECRET)
    if "exp" in fields:
        fields["exp"] = time.time() + fields["exp"]
    token = mint(secret, **fields)
    for options in ({}, {"additional_headers": {"Authorization": f"Bearer {token}"}}):
        url = ws_url(app) if options else ws_url(app, token=token)
        got_status, got_reason = await refused(url, **options)
        assert got_status == status and got_reason.startswith(reason), got_reason


async def test_without_anonymous_access_no_token_is_401(start_server: StartServer) -> None:
    app = await start_server(token_secret=SECRET, anonymous="none")
    assert await refused(ws_url(app)) == (401, "this counter needs a token")


async def test_a_write_token_clicks_from_a_header_or_the_query(app: App) -> None:
    token = mint(can="write", rooms=["/", "poll-*"])
    async with connect(ws_url(app, "/c/poll-1", token)) as by_query:
        assert [e["type"] for e in await first_messages(by_query, 2)] == ["users", "state"]
        await by_query.send(PLUS)
        await wait_for_value(by_query, 1)
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(ws_url(app), additional_headers=headers) as by_header:
        await first_messages(by_header, 2)
        await by_header.send(PLUS)
        await wait_for_value(by_header, 1)


# --- Read-only connections ----------------------------------------------------


async def test_a_read_only_user_is_told_and_cannot_change_but_sees_every_change(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    app = await start_server(token_secret=SECRET, api_keys=(b"backend-key",), **mode)
    async with connect(ws_url(app)) as reader:
        first = await first_messages(reader, 3)
        assert [e["type"] for e in first] == ["users", "state", "access"]
        assert first[2]["reason"] == "read-only: this counter needs a token to change"
        await reader.send(PLUS)
        error = await wait_for_event(reader, lambda e: e["type"] == "error")
        assert error["error"] == "read-only: this counter needs a token to change"
        async with connect(ws_url(app, token=mint(can="write"))) as writer:
            await writer.send(PLUS)
            await wait_for_value(reader, 1)  # a change made with a token
        status, _, _ = await http_request(
            app.port,
            "/api/counters/%2F",
            method="POST",
            body=b'{"add": 10}',
            headers={"Authorization": "Bearer backend-key"},
        )
        assert status == 200
        await wait_for_value(reader, 11)  # and one made with the API
        await reader.send(json.dumps({"action": "sync"}))  # the connection stays
        await wait_for_event(reader, lambda e: e["type"] == "users")
    assert value(app) == 11


async def test_a_read_token_is_read_only_too(app: App) -> None:
    async with connect(ws_url(app, token=mint(can="read"))) as reader:
        first = await first_messages(reader, 3)
        assert first[2]["reason"] == "read-only: this token does not allow changes"


async def test_a_session_ops_rejected_as_read_only_still_count_as_done(app: App) -> None:
    url = ws_url(app) + "?session=reader-session-0123456789"
    async with connect(url) as reader:
        await first_messages(reader, 4)  # users, state, access, ack 0 (in some order)
        await reader.send(json.dumps({"action": "plus", "op": 1}))
        error = await wait_for_event(reader, lambda e: e["type"] == "error")
        assert (error["op"], error["error"]) == (
            1,
            "read-only: this counter needs a token to change",
        )
        await wait_for_event(reader, lambda e: e == {"type": "ack", "op": 1})


async def test_an_expired_tokens_connection_is_closed_with_1008(app: App) -> None:
    # Time passing is the point: a token that expires after the server's first
    # sweep (SWEEP_PERIOD after it started), and well after it is shown.
    expires = time.time() + 1.5 * SWEEP_PERIOD
    async with connect(ws_url(app, token=mint(exp=expires))) as client:
        await first_messages(client, 3)
        with pytest.raises(ConnectionClosed) as closed:
            await wait_for_event(client, lambda e: False)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")
    # Not before it expired; at the latest at the next sweep after it, and slack.
    assert expires <= time.time() <= expires + SWEEP_PERIOD + 0.5


# --- Per user, not per connection -----------------------------------------------


async def test_the_rate_limit_is_per_user_across_its_connections(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    app = await start_server(token_secret=SECRET, rate=0.001, burst=3, **mode)
    token = mint(can="write")
    clients = [await connect(ws_url(app, token=token)) for _ in range(3)]
    for client in clients:
        await first_messages(client, 2)
        await client.send(PLUS)
        await client.send(PLUS)
    # Six sent, three tokens for the user: three counted, three refused.
    errors = 0
    for client in clients:
        async with asyncio.timeout(TIMEOUT):
            while errors < 3:
                event = json.loads(await client.recv())
                if event["type"] == "error":
                    errors += 1
                    assert "rate limit" in event["error"]
                elif event["type"] == "state" and event["value"] == 3:
                    break
    assert errors == 3
    assert value(app) == 3


async def test_connections_beyond_max_connections_per_user_get_429(
    start_server: StartServer,
) -> None:
    app = await start_server(token_secret=SECRET, max_connections_per_user=2)
    token = mint()
    held = [await connect(ws_url(app, token=token)) for _ in range(2)]
    assert await refused(ws_url(app, token=token)) == (429, "too many connections for this user")
    await connect(ws_url(app, token=mint(sub="grace")))  # another user is not held back
    await held[0].close()
    await wait_until(lambda: app.hub.gate.users.held["ada"][1] == 1)  # the server saw it go
    await connect(ws_url(app, token=token))  # its slot is free again


# --- Counters do not pile up ---------------------------------------------------


async def test_new_rooms_from_one_address_are_held_to_their_budget(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    budget = 30
    app = await start_server(new_rooms_per_ip=budget, **mode)
    opened = refused_count = 0
    for attempt in range(2000):  # a script making counters without end
        try:
            client = await connect(f"ws://127.0.0.1:{app.port}/c/churn-{attempt}")
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            refused_count += 1
            continue
        opened += 1
        await client.send(PLUS)
        await wait_for_value(client, 1)
        await client.close()
    # The budget refills at 30 a minute: a few more may pass while this runs.
    assert budget <= opened <= budget + 5, opened
    assert refused_count == 2000 - opened
    # Someone else, from another address, still opens a new counter.
    async with connect(
        f"ws://127.0.0.1:{app.port}/c/fresh", additional_headers={}, **local("127.0.0.2")
    ) as other:
        await wait_for_value(other, 0)


def local(address: str) -> dict[str, Any]:
    """``connect`` options that make a client connect from ``address`` (loopback)."""
    return {"local_addr": (address, 0)}


async def test_tokens_never_appear_in_the_log(server_process: StartProcess, tmp_path: Any) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    process = server_process("--token-secret-file", str(secret_file))
    token = mint(can="write")
    async with connect(f"{process.url}?token={token}") as client:
        await client.recv()
    bad = mint(exp=time.time() - 10)
    with pytest.raises(InvalidStatus):
        await connect(f"{process.url}?token={bad}")
    _, log = process.stop()
    assert "connected" in log and "rejected" in log
    assert token not in log and bad not in log
    assert token.split(".")[2] not in log  # not even the signature
