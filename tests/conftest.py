"""Fixtures shared by the tests: servers in-process and as subprocesses, clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

import server

ROOT = Path(__file__).resolve().parent.parent
# Generous: a wait only ends this early when the behaviour under test is broken.
TIMEOUT = 10.0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

StartServer = Callable[..., Awaitable[server.App]]


def require_binary(name: str, *candidates: str) -> str:
    """Find a system program the test needs: skip without it locally, fail in CI."""
    for candidate in (name, *candidates):
        path = shutil.which(candidate)
        if path is not None:
            return path
    reason = f"{name} is not installed (apt-get install {name})"
    if IN_CI:
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
    pytest.skip(reason)


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start in-process servers on free ports; every one is closed afterwards."""
    apps: list[server.App] = []

    async def start(**overrides: Any) -> server.App:
        options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "rate": 0.0}
        options.update(overrides)
        app = await server.start(server.Settings(**options))
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.close()


@pytest.fixture
async def app(start_server: StartServer) -> server.App:
    """One in-process server with the rate limit off."""
    return await start_server()


def url(app: server.App) -> str:
    return f"ws://127.0.0.1:{app.port}/"


async def join(app: server.App, **options: Any) -> ClientConnection:
    """Connect a client and read its connect sequence (users, then state)."""
    websocket = await connect(url(app), **options)
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


async def wait_for_value(websocket: ClientConnection, value: int) -> dict[str, Any]:
    return await wait_for_event(websocket, lambda e: e == {"type": "state", "value": value})


async def wait_for_users(websocket: ClientConnection, count: int) -> dict[str, Any]:
    return await wait_for_event(websocket, lambda e: e == {"type": "users", "count": count})


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a server-side condition each loop turn (for state no client sees)."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110 - the server exposes no event for these
            await asyncio.sleep(0.001)


class ServerProcess:
    """``python server.py`` as a subprocess, its log read by a thread.

    The thread keeps draining the pipe: a server whose log pipe filled up
    would block on its next log line.
    """

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.port = 0
        self.reader = threading.Thread(target=self.read_log, daemon=True)
        self.reader.start()
        if not self.listening.wait(TIMEOUT) or not self.port:
            self.process.kill()
            self.reader.join(TIMEOUT)
            raise AssertionError(f"server did not start listening:\n{self.log}")

    def read_log(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = re.search(r"listening on ws://[^ ]+:(\d+)/", line)
            if match and not self.port:
                self.port = int(match.group(1))
                self.listening.set()
        self.listening.set()  # exited: stop waiting either way

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def stop(self, timeout: float = TIMEOUT) -> tuple[int, str]:
        """SIGTERM, then the exit code and the whole log."""
        if self.process.poll() is None:
            self.process.terminate()
        returncode = self.process.wait(timeout)
        self.reader.join(timeout)
        return returncode, self.log


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``python server.py`` subprocesses; any left running are killed."""
    processes: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        process = ServerProcess(*args)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()
