"""The HTTP API for backends, through the wire, in each mode."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect

from counter_sync.app import App
from testkit.processes import TIMEOUT
from tests.conftest import StartServer
from tests.helpers import http_request, is_state, join, wait_for_value

KEY = "backend-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def app(start_server: StartServer, mode: dict[str, Any]) -> App:
    return await start_server(api_keys=(KEY.encode(), b"second-key"), **mode)


async def api(
    app: App,
    path: str,
    method: str = "GET",
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One API call: the status and the JSON it answered."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = await http_request(
        app.port, path, method=method, body=data, headers=AUTH | (headers or {})
    )
    return status, json.loads(answer)


async def test_get_reads_a_counter(app: App) -> None:
    client = await join(app, "/c/votes")
    await client.send(json.dumps({"action": "plus"}))
    await wait_for_value(client, 1)
    status, answer = await api(app, "/api/counters/votes")
    assert status == 200
    assert answer["room"] == "votes" and answer["value"] == 1 and answer["users"] == 1
    assert isinstance(answer["seq"], int)


async def test_post_add_and_set_reach_the_rooms_users_and_answer_the_new_value(app: App) -> None:
    client = await join(app, "/c/votes")
    status, answer = await api(app, "/api/counters/votes", "POST", {"add": 41})
    assert (status, answer["value"], answer["duplicate"]) == (200, 41, False)
    await wait_for_value(client, 41)
    status, answer = await api(app, "/api/counters/votes", "POST", {"set": -5})
    assert (status, answer["value"]) == (200, -5)
    await wait_for_value(client, -5)
    status, answer = await api(app, "/api/counters/%2F", "POST", {"add": 2})
    assert (status, answer["room"], answer["value"]) == (200, "/", 2)


async def test_a_retried_post_with_the_same_idempotency_key_counts_once(app: App) -> None:
    headers = {"Idempotency-Key": "ballot-box-7"}
    for attempt in range(3):
        status, answer = await api(app, "/api/counters/mail", "POST", {"add": 25}, headers)
        assert (status, answer["value"], answer["duplicate"]) == (200, 25, attempt > 0)
    other = {"Idempotency-Key": "ballot-box-8"}
    assert (await api(app, "/api/counters/mail", "POST", {"add": 5}, other))[1]["value"] == 30


async def test_delete_resets_and_forgets_and_the_users_see_zero(app: App) -> None:
    client = await join(app, "/c/gone")
    await api(app, "/api/counters/gone", "POST", {"add": 3})
    await wait_for_value(client, 3)
    status, answer = await api(app, "/api/counters/gone", "DELETE")
    assert (status, answer["value"]) == (200, 0)
    await wait_for_value(client, 0)


async def test_the_list_pages_through_the_counters_by_name(app: App) -> None:
    for name in ("poll-a", "poll-b", "poll-c", "other"):
        await api(app, f"/api/counters/{name}", "POST", {"add": 1})
    status, page = await api(app, "/api/counters?prefix=poll-&limit=2")
    assert status == 200
    assert [c["room"] for c in page["counters"]] == ["poll-a", "poll-b"]
    status, rest = await api(app, f"/api/counters?prefix=poll-&limit=2&after={page['next']}")
    assert ([c["room"] for c in rest["counters"]], rest["next"]) == (["poll-c"], None)
    assert all(c["value"] == 1 for c in page["counters"] + rest["counters"])


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", f"Bearer {KEY}x"],
    ids=["none", "wrong", "basic", "empty", "longer"],
)
async def test_anything_but_a_key_is_401_without_a_hint(
    app: App, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, response_headers, body = await http_request(
        app.port, "/api/counters/votes", headers=headers
    )
    assert (status, json.loads(body)) == (401, {"error": "unauthorized"})
    assert response_headers["WWW-Authenticate"].startswith("Bearer")


async def test_every_key_in_the_file_works(app: App) -> None:
    status, _, _ = await http_request(
        app.port, "/api/counters/votes", headers={"Authorization": "Bearer second-key"}
    )
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        ("POST", "/api/counters/votes", b"{not json", 400, "the body is not valid JSON"),
        ("POST", "/api/counters/votes", {"add": 1, "set": 2}, 400, 'send {"add": N} or {"set": V}'),
        ("POST", "/api/counters/votes", {"add": 1.5}, 400, '"add" must be a whole number'),
        ("POST", "/api/counters/votes", {"add": True}, 400, '"add" must be a whole number'),
        ("POST", "/api/counters/votes", {"set": 2**53}, 400, '"set" must be a whole number'),
        ("POST", "/api/counters/votes", b"x" * 5000, 413, "the body is over 4096 bytes"),
        ("GET", "/api/counters/no%20spaces", None, 404, "no such counter"),
        ("GET", "/api/counters/" + "x" * 65, None, 404, "no such counter"),
        ("GET", "/api/elsewhere", None, 404, "no such endpoint"),
        ("PUT", "/api/counters/votes", {"add": 1}, 405, "method not allowed"),
        ("POST", "/api/counters", {"add": 1}, 405, "method not allowed"),
        ("GET", "/api/counters?limit=0", None, 400, "limit: 1 to 1000"),
    ],
)
async def test_bad_requests_get_a_status_and_a_reason(
    app: App, method: str, path: str, body: object, status: int, reason: str
) -> None:
    got_status, answer = await api(app, path, method, body)
    assert got_status == status and answer["error"].startswith(reason), answer


async def test_a_change_beyond_the_range_is_409_and_not_applied(app: App) -> None:
    await api(app, "/api/counters/edge", "POST", {"set": 2**53 - 1})
    status, answer = await api(app, "/api/counters/edge", "POST", {"add": 1})
    assert status == 409 and "out of range" in answer["error"]
    assert (await api(app, "/api/counters/edge"))[1]["value"] == 2**53 - 1


async def test_without_a_key_file_there_is_no_api(start_server: StartServer) -> None:
    app = await start_server()
    status, _, _ = await http_request(app.port, "/api/counters/votes", headers=AUTH)
    assert status == 404


async def test_api_requests_count_against_the_http_rate(start_server: StartServer) -> None:
    app = await start_server(api_keys=(KEY.encode(),), http_rate=0.001, http_burst=2)
    statuses = [
        (await http_request(app.port, "/api/counters/a", headers=AUTH))[0] for _ in range(3)
    ]
    assert statuses == [200, 200, 429]


async def test_a_post_on_one_instance_reaches_a_client_on_another(
    start_server: StartServer, redis_server: Any
) -> None:
    first = await start_server(api_keys=(KEY.encode(),), redis=redis_server.url)
    second = await start_server(redis=redis_server.url)
    async with connect(f"ws://127.0.0.1:{second.port}/c/shared") as client:
        status, answer = await api(first, "/api/counters/shared", "POST", {"add": 7})
        assert (status, answer["value"]) == (200, 7)
        async with asyncio.timeout(TIMEOUT):
            while not is_state(json.loads(await client.recv()), 7):
                pass
