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
import resource
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from websockets.asyncio.client import ClientConnection, connect

from counter_sync.app import App
from counter_sync.counter import Room
from counter_sync.store import DEFAULT_ROOM
from testkit.processes import IN_CI, TIMEOUT, LoggedProcess, MissingBinary, find_binary
from tests import readers

__all__ = [
    "http_request",
    "is_state",
    "join",
    "raw_http",
    "reading_clients",
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


# How wait_until polls: on the next few loop turns first (most conditions hold
# within a few, and a turn costs nothing while the loop has work), then after
# waits doubling from POLL_FIRST to POLL_LAST. A long wait costs a wake-up every
# POLL_LAST instead of every millisecond, and ends at most POLL_LAST late.
POLL_TURNS = 4
POLL_FIRST = 0.001
POLL_LAST = 0.008


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a server-side condition (for state no client sees); fail if it is not met in TIMEOUT.

    For what the server exposes no event for: a client-visible change is
    awaited on the client instead (``wait_for_event``).
    """
    async with asyncio.timeout(TIMEOUT):
        for delay in poll_delays():
            if condition():
                return
            await asyncio.sleep(delay)


def poll_delays() -> Iterator[float]:
    yield from [0.0] * POLL_TURNS
    delay = POLL_FIRST
    while True:
        yield delay
        delay = min(2 * delay, POLL_LAST)


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


@contextlib.asynccontextmanager
async def reading_clients(app: App, path: str, count: int) -> AsyncIterator[None]:
    """``count`` clients of ``path`` that read all they are sent, in a process of their own.

    For a room whose broadcasts must really be written: clients in this
    process would take the event loop from the server, and clients that do not
    read are skipped. They are gone (reset) on leaving the block. Needs the
    server's per-address caps raised to ``count`` users and
    ``readers.BATCH`` pending handshakes.
    """
    needed = count + 1024  # the server's ends of them, and everything else here
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        unavailable(f"{count} connections need an open-files limit of {needed} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    argv = [sys.executable, "-m", "tests.readers", str(app.port), path, str(count)]
    # In a thread: this event loop must answer their handshakes meanwhile.
    process = await asyncio.to_thread(LoggedProcess, argv, ready=f"^{readers.READY}")
    try:
        yield
    finally:
        process.kill()


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
