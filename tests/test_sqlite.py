"""``--state PATH``: the counter in a SQLite file, durable across restarts and crashes.

Restarts and kills use ``python server.py`` subprocesses on real files in
``tmp_path``; the rest runs in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from counter_sync import sqlite_store
from counter_sync.sqlite_store import APPLICATION_ID, SqliteStore
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    ROOT,
    TIMEOUT,
    ServerProcess,
    join,
    room,
    wait_for_event,
    wait_for_value,
)

PLUS = json.dumps({"action": "plus"})
MINUS = json.dumps({"action": "minus"})


# --- Helpers ------------------------------------------------------------------


async def connect_sequence(websocket: ClientConnection) -> int:
    """Read what every client gets first (users, then state); return the value."""
    users = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    state = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    assert (users["type"], state["type"]) == ("users", "state")
    return int(state["value"])


async def value_on_start(process: ServerProcess) -> int:
    """The value a freshly started server shows its first client."""
    async with connect(process.url) as websocket:
        return await connect_sequence(websocket)


def stored_value(path: Path) -> int:
    """What another process reading the file sees: only committed transactions."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        (value,) = reader.execute("SELECT value FROM counter").fetchone()
    return int(value)


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Hold SQLite's write lock from another connection, so commits must wait."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")


async def write_state(path: Path, value: int) -> None:
    """Make a counter-sync file holding ``value``, as a server would."""
    store = SqliteStore(path)
    await store.open()
    await store.add("/", value)
    await store.close()


def run_refused(*args: str) -> str:
    """Run ``server.py`` expecting a refusal; return its one line on stderr."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # one line: no traceback, no log noise
    assert lines[0].startswith("server.py: error: --state "), lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file under ``directory`` with its bytes (None for directories)."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


# --- In-process: the store behind a running hub -------------------------------


async def test_missing_file_is_created_at_zero_and_marked_as_counter_sync(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state))
    websocket = await join(app)
    await websocket.send(PLUS)
    await wait_for_value(websocket, 1)
    header = state.read_bytes()[:100]
    assert int.from_bytes(header[68:72], "big") == APPLICATION_ID
    assert header[18:20] == b"\x02\x02"  # WAL mode


async def test_empty_file_is_taken_as_a_new_counter(tmp_path: Path) -> None:
    state = tmp_path / "counter.sqlite"
    state.touch()
    await write_state(state, 3)
    assert stored_value(state) == 3


async def test_every_value_shown_is_already_committed(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state))
    websocket = await join(app)
    for _ in range(200):
        await websocket.send(PLUS)
    shown = 0
    while shown < 200:
        event = await wait_for_event(websocket, lambda e: e["type"] == "state")
        shown = event["value"]
        assert stored_value(state) >= shown  # only increments: committed >= shown


async def test_failed_commit_counts_nothing_and_tells_the_sender(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT", 0.05)
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state))
    websocket = await join(app)
    with write_lock_held(state):
        await websocket.send(PLUS)
        event = await wait_for_event(websocket, lambda e: e["type"] == "error")
        assert event["error"] == "store unavailable: 1 action(s) not applied"
        assert not room(app).store.healthy()
    await websocket.send(PLUS)
    await wait_for_value(websocket, 1)
    assert room(app).store.healthy()
    assert stored_value(state) == 1


async def test_commit_failing_midway_is_rolled_back_and_the_store_carries_on(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    await write_state(state, 0)
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        db.execute("UPDATE counter SET value = ?", (2**63 - 1,))  # SQLite's largest integer
    app = await start_server(state=str(state))
    websocket = await join(app)
    await websocket.send(PLUS)  # the UPDATE fails (the value would overflow), mid-transaction
    event = await wait_for_event(websocket, lambda e: e["type"] == "error")
    assert event["error"] == "store unavailable: 1 action(s) not applied"
    await websocket.send(MINUS)
    await wait_for_value(websocket, 2**63 - 2)
    assert stored_value(state) == 2**63 - 2


# --- Subprocess: restarts, kills, refusals ------------------------------------


async def test_restart_keeps_the_value(server_process: StartProcess, tmp_path: Path) -> None:
    state = str(tmp_path / "counter.sqlite")
    first = server_process("--port", "0", "--rate", "0", "--state", state)
    async with connect(first.url) as websocket:
        assert await connect_sequence(websocket) == 0
        for message in [PLUS] * 5 + [MINUS]:
            await websocket.send(message)
        await wait_for_value(websocket, 4)
    returncode, log = first.stop()
    assert returncode == 0, log
    second = server_process("--port", "0", "--state", state)
    assert await value_on_start(second) == 4


async def test_kill_9_mid_burst_loses_nothing_shown_and_counts_nothing_twice(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--port", "0", "--rate", "0", "--state", state)
    kill_at = 2_000  # some value shown; the clients keep sending past it
    shown = sent = 0
    enough_shown = asyncio.Event()

    async def send_until_cut(websocket: ClientConnection) -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionClosed):
            while True:
                for _ in range(50):
                    sent += 1  # before send(): an upper bound even if the kill cuts it
                    await websocket.send(PLUS)
                # send() rarely waits (the socket takes it all): let the others run.
                await asyncio.sleep(0)

    async def watch(websocket: ClientConnection) -> None:
        nonlocal shown
        with contextlib.suppress(ConnectionClosed):
            async for message in websocket:
                event = json.loads(message)
                if event["type"] == "state":
                    shown = max(shown, event["value"])
                    if shown >= kill_at:
                        enough_shown.set()

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(process.url)) for _ in range(4)]
        for websocket in clients:
            assert await connect_sequence(websocket) == 0
        tasks = [
            asyncio.create_task(task(websocket))
            for websocket in clients
            for task in (send_until_cut, watch)
        ]
        async with asyncio.timeout(TIMEOUT):
            await enough_shown.wait()
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*tasks)

    restarted = server_process("--port", "0", "--state", state)
    value = await value_on_start(restarted)
    assert shown <= value <= sent, (shown, value, sent)


async def test_sigterm_commits_pending_actions(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    process = server_process("--port", "0", "--rate", "0", "--state", str(state))
    actions = 500
    async with connect(process.url) as websocket:
        assert await connect_sequence(websocket) == 0
        # With the write lock held elsewhere the server's commit waits, so
        # every action stays pending until after SIGTERM.
        with write_lock_held(state):
            for _ in range(actions):
                await websocket.send(PLUS)
            # The pong comes after the server has read every frame sent before
            # the ping: all the actions are acknowledged.
            await asyncio.wait_for(await websocket.ping(), TIMEOUT)
            process.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(TIMEOUT):
                shown = [json.loads(message) async for message in websocket]
            assert websocket.close_code == CloseCode.GOING_AWAY
        assert shown == []  # nothing committed before SIGTERM, so nothing broadcast
    returncode, log = process.stop()
    assert returncode == 0, log
    restarted = server_process("--port", "0", "--state", str(state))
    assert await value_on_start(restarted) == actions


async def test_second_instance_on_the_same_file_is_refused(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    first = server_process("--port", "0", "--rate", "0", "--state", state)
    before = snapshot(tmp_path)
    line = run_refused("--state", state)
    assert line == f"server.py: error: --state {state}: in use by another running server"
    assert snapshot(tmp_path) == before
    async with connect(first.url) as websocket:  # the first one carries on
        assert await connect_sequence(websocket) == 0
        await websocket.send(PLUS)
        await wait_for_value(websocket, 1)


def garbage(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    path.write_bytes(bytes(range(256)) * 40)
    return path


def foreign_database(directory: Path) -> Path:
    path = directory / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
        db.commit()
    return path


def corrupt_database(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    asyncio.run(write_state(path, 7))
    data = bytearray(path.read_bytes())
    data[4096 + 8 : 4096 + 200] = b"\xa5" * 192  # page 2: the counter table
    path.write_bytes(data)
    return path


def a_directory(directory: Path) -> Path:
    path = directory / "state"
    path.mkdir()
    return path


def read_only_file(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    asyncio.run(write_state(path, 7))
    path.chmod(0o444)
    return path


def read_only_directory(directory: Path) -> Path:
    path = directory / "ro" / "counter.sqlite"
    path.parent.mkdir()
    asyncio.run(write_state(path, 7))
    path.parent.chmod(0o555)
    return path


@pytest.mark.parametrize(
    ("make_path", "problem"),
    [
        (garbage, "not a SQLite database; refusing to touch it"),
        (foreign_database, "a SQLite database but not a counter-sync one"),
        (corrupt_database, "the database is corrupt"),
        (a_directory, "is a directory"),
        (read_only_file, "the file is read-only"),
        (read_only_directory, "is read-only (SQLite creates"),
    ],
)
def test_unusable_state_path_is_refused_and_left_untouched(
    make_path: Callable[[Path], Path], problem: str, tmp_path: Path
) -> None:
    path = make_path(tmp_path)
    before = snapshot(tmp_path)
    try:
        line = run_refused("--state", str(path))
        assert problem in line
        assert snapshot(tmp_path) == before
    finally:
        for each in [tmp_path, *tmp_path.rglob("*")]:
            each.chmod(0o755 if each.is_dir() else 0o644)
