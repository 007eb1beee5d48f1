"""Fixtures shared by the tests: servers in-process and as subprocesses.

The helpers they build on are plain code: ``testkit/`` (child processes,
ports, raw clients; the bench shares it) and ``tests/helpers.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from counter_sync.app import App, start
from counter_sync.config import Settings
from testkit.processes import RedisServer, ServerProcess
from tests.helpers import require_binary

StartServer = Callable[..., Awaitable[App]]
StartProcess = Callable[..., ServerProcess]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start in-process servers on free ports; every one is closed afterwards."""
    apps: list[App] = []

    async def start_one(**overrides: Any) -> App:
        options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "rate": 0.0}
        options.update(overrides)
        app = await start(Settings(**options))
        apps.append(app)
        return app

    yield start_one
    for app in apps:
        await app.close()


@pytest.fixture
async def app(start_server: StartServer) -> App:
    """One in-process server with the rate limit off."""
    return await start_server()


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if anything, the library included, logs an ERROR."""
    caplog.set_level(logging.INFO)
    yield
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


@pytest.fixture
def server_process() -> Iterator[StartProcess]:
    """Start ``python server.py`` subprocesses; any left running are killed."""
    processes: list[ServerProcess] = []

    def start_process(*args: str, **options: Any) -> ServerProcess:
        process = ServerProcess(*args, **options)
        processes.append(process)
        return process

    yield start_process
    for process in processes:
        process.kill()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A ``redis-server`` of the test's own on a free port, persistence off."""
    redis = RedisServer(require_binary("redis-server"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture(params=["memory", "state", "redis"])
def mode(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The settings of each mode in turn: memory, durable (--state), shared (--redis)."""
    if request.param == "state":
        return {"state": str(tmp_path / "counters.sqlite")}
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        return {"redis": redis.url}
    return {}
