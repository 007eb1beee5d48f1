"""What only the tests use: pytest's skip for a missing program, clients of an in-process server.

Plain code, not pytest fixtures (those are in ``conftest.py`` and build on
this). What the bench uses too (child processes, ports, raw clients) is in
``testkit/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from websockets.asyncio.client import ClientConnection, connect

from counter_sync.app import App
from counter_sync.counter import Room
from counter_sync.store import DEFAULT_ROOM
from testkit.processes import IN_CI, TIMEOUT, MissingBinary, find_binary

__all__ = [
    "http_request",
    "is_state",
    "join",
    "raw_http",
    "require_binary",
    "require_module",
    "room",
    "settled",
    "url",
    "value",
    "wait_for_event",
    "wait_for_users",
    "wait_for_value",
    "wait_until",
    "write_lock_held",
]


def require_binary(name: str, *candidates: str) -> str:
    """Find a system program the test needs: skip without it locally, fail in CI."""
    try:
        return find_binary(name, *candidates)
    except MissingBinary as exc:
        unavailable(str(exc))


def require_module(name: str, hint: str) -> None:
    """Skip without the Python package ``name`` locally, fail in CI; ``hint``: how to get it."""
    if importlib.util.find_spec(name) is None:
        unavailable(f"{name} is not installed: {hint}")


def unavailable(reason: str) -> NoReturn:
    """Skip: the test needs something this machine lacks. In CI, which installs all, fail."""
    if IN_CI:
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
    pytest.skip(reason)


# --- Clients of an in-process server ------------------------------------------------


def url(app: App) -> str:
    return f"ws://127.0.0.1:{app.port}/"


async def join(app: App, path: str = "/", **options: Any) -> ClientConnection:
    """Connect a client to a room's path and read its connect sequence (users, then state)."""
    websocket = await connect(f"ws://127.0.0.1:{app.port}{path}", **options)
    first = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    second = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    assert (first["type"], second["type"]) == ("users", "state")
    return websocket


async def wait_for_event(
    websocket: ClientConnection, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Read events until one matches; fail if none does within TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            event: dict[str, Any] = json.loads(await websocket.recv())
            if predicate(event):
                return event


def is_state(event: dict[str, Any], value: int) -> bool:
    """A state message with ``value``, whatever its version (``seq``, ``epoch``)."""
    return bool(event["type"] == "state" and event["value"] == value)


async def wait_for_value(websocket: ClientConnection, value: int) -> dict[str, Any]:
    return await wait_for_event(websocket, lambda e: is_state(e, value))


async def wait_for_users(websocket: ClientConnection, count: int) -> dict[str, Any]:
    return await wait_for_event(websocket, lambda e: e == {"type": "users", "count": count})


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a server-side condition each loop turn (for state no client sees)."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110 - the server exposes no event for these
            await asyncio.sleep(0.001)


async def raw_http(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``request`` as it is, from ``source``; return every byte until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    async with asyncio.timeout(TIMEOUT):
        response = await reader.read()
    writer.close()
    return response


async def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (http.client, in a thread): the status, headers and body."""

    def request() -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    return await asyncio.to_thread(request)


def room(app: App, name: str = DEFAULT_ROOM) -> Room:
    """A room of the server (``/`` by default), for the few tests that look inside."""
    return app.hub.rooms[name]


def value(app: App, name: str = DEFAULT_ROOM) -> int:
    """The value a room shows its users."""
    return room(app, name).state.value


def settled(app: App) -> bool:
    """Every change the server took in is committed and delivered (for ``wait_until``)."""
    return app.hub.flusher.idle() and not any(
        each.flush.delivering for each in app.hub.rooms.values()
    )


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Hold SQLite's write lock from another connection, so a server's commits must wait."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
