"""``--state PATH``: every counter in one SQLite file, durable across restarts and crashes.

Restarts, kills and failing disks use ``python server.py`` subprocesses on
real files in ``tmp_path``; the disk fails for real, through a small C library
preloaded into the server (``tests/faults/faults.c``). The rest runs
in-process, with real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from counter_sync import sqlite_store
from counter_sync.config import MAX_VALUE
from counter_sync.sqlite_store import APPLICATION_ID, SCHEMA_VERSION, SqliteStore
from counter_sync.store import OutOfRange
from testkit.processes import ROOT, TIMEOUT, ServerProcess
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    join,
    require_binary,
    room,
    wait_for_event,
    wait_for_value,
    wait_until,
    write_lock_held,
)

PLUS = json.dumps({"action": "plus"})
MINUS = json.dumps({"action": "minus"})
# The single-counter version's layout (schema 1, as of commit eb7b7cb), to
# build the files it left behind.
SINGLE_COUNTER_SCHEMA = """
CREATE TABLE counter (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    value INTEGER NOT NULL CHECK (typeof(value) = 'integer')
)
"""
FAULTS_SOURCE = ROOT / "tests" / "faults" / "faults.c"


# --- Helpers ------------------------------------------------------------------


def room_url(port: int, name: str = "/") -> str:
    """The WebSocket address of a room: ``/`` or ``/c/<name>``."""
    return f"ws://127.0.0.1:{port}{'/' if name == '/' else f'/c/{name}'}"


async def connect_sequence(websocket: ClientConnection) -> int:
    """Read what every client gets first (users, then state); return the value."""
    users = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    state = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    assert (users["type"], state["type"]) == ("users", "state")
    return int(state["value"])


async def value_on_start(process: ServerProcess, name: str = "/") -> int:
    """The value a freshly started server shows the first client of a room."""
    async with connect(room_url(process.port, name)) as websocket:
        return await connect_sequence(websocket)


def stored_value(path: Path, name: str = "/") -> int:
    """What another process reading the file sees: only committed transactions."""
    return stored_rows(path).get(name, 0)


def stored_rows(path: Path) -> dict[str, int]:
    """Every counter row of the file, as another process reads it."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        return dict(reader.execute("SELECT name, value FROM counter").fetchall())


async def write_state(path: Path, value: int, name: str = "/") -> None:
    """Make a counter-sync file holding ``value`` in room ``name``, as a server would."""
    store = SqliteStore(path)
    await store.open()
    await store.add(name, value)
    await store.close()


def write_single_counter_file(path: Path, value: int) -> None:
    """Make a file as the single-counter version left it: schema 1, WAL, one row."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 1")
        db.execute(SINGLE_COUNTER_SCHEMA)
        db.execute("INSERT INTO counter (id, value) VALUES (0, ?)", (value,))
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = WAL")


def committed_transactions(database: Path) -> int:
    """Count the transactions in the database's write-ahead log since it last restarted.

    Every transaction ends with exactly one commit frame, the one whose header
    records the database size after it (non-zero); frames of an earlier
    generation of the log carry other salts than the log's header.
    """
    wal = database.with_name(database.name + "-wal")
    data = wal.read_bytes() if wal.exists() else b""
    if len(data) < 32:
        return 0
    page_size = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    commits = 0
    for offset in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        frame_header = data[offset : offset + 24]
        if frame_header[8:16] != salts:
            break
        commits += int.from_bytes(frame_header[4:8], "big") != 0
    return commits


def sizes(database: Path) -> tuple[int, int]:
    """The bytes of the database file and of its write-ahead log."""
    wal = database.with_name(database.name + "-wal")
    return database.stat().st_size, wal.stat().st_size if wal.exists() else 0


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


async def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """The status code and JSON body of ``GET path`` (``/healthz``, ``/readyz``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def store_health(port: int) -> tuple[int, str]:
    """What the operator's probes say: ``/readyz``'s status and ``/healthz``'s store field."""
    ready_status, _ = await http_get(port, "/readyz")
    _, health = await http_get(port, "/healthz")
    return ready_status, health["store"]


def not_applied(event: dict[str, Any]) -> bool:
    return event["type"] == "error" and "not applied" in event["error"]


# --- A disk that fails on demand ----------------------------------------------


@dataclasses.dataclass
class FaultyDisk:
    """The fault library and its trigger: while the trigger exists, the WAL's I/O fails.

    Only the write-ahead log (the file whose name ends with ``-wal``) fails: a
    commit writes its frames there, then fsyncs it.
    """

    library: Path
    trigger: Path

    def fail(self, how: str) -> None:
        """Make the WAL's I/O fail: ``"eio"`` or ``"enospc"``, then maybe ``"sync"`` or ``"write"``.

        With ``"sync"`` only fsync fails, so the commit's frames are written
        first; with ``"write"`` only the writes; with neither, both.
        """
        self.trigger.write_text(how)

    def heal(self) -> None:
        self.trigger.unlink()

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "LD_PRELOAD": str(self.library),
            "FAULTS_TRIGGER": str(self.trigger),
            "FAULTS_SUFFIX": "-wal",
        }


@pytest.fixture(scope="session")
def fault_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tests/faults/faults.c``, compiled once for the session."""
    gcc = require_binary("gcc")
    library = tmp_path_factory.mktemp("faults") / "faults.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-Wall", "-Werror", "-o", library, FAULTS_SOURCE, "-ldl"],
        check=True,
        timeout=60,
    )
    return library


@pytest.fixture
def faulty_disk(fault_library: Path, tmp_path: Path) -> FaultyDisk:
    return FaultyDisk(fault_library, tmp_path / "fault-trigger")


# --- The store itself ---------------------------------------------------------


async def test_adds_to_many_rooms_in_one_loop_turn_share_one_transaction(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    store = SqliteStore(state)
    await store.open()
    try:
        values = await asyncio.gather(*(store.add(f"room-{n}", n) for n in range(1, 21)))
        assert values == list(range(1, 21))  # each caller gets its own room's value
        assert committed_transactions(state) == 1
    finally:
        await store.close()
    assert stored_rows(state) == {f"room-{n}": n for n in range(1, 21)}


async def test_add_beyond_the_range_is_not_applied_and_the_other_rooms_commit(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    await write_state(state, MAX_VALUE, "full")
    store = SqliteStore(state)
    await store.open()
    try:
        beyond, other = await asyncio.gather(
            store.add("full", 1), store.add("other", 5), return_exceptions=True
        )
        assert isinstance(beyond, OutOfRange)
        assert other == 5
        assert store.healthy()  # the value was refused, not the disk
        assert await store.add("full", -1) == MAX_VALUE - 1
    finally:
        await store.close()
    assert stored_rows(state) == {"full": MAX_VALUE - 1, "other": 5}


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
    assert int.from_bytes(header[60:64], "big") == SCHEMA_VERSION
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


async def test_rooms_flushing_while_a_commit_waits_share_the_next_transaction(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state))
    store = app.hub.store
    assert isinstance(store, SqliteStore)
    names = [f"room-{n}" for n in range(10)]
    clients = [await join(app, f"/c/{name}") for name in names]
    assert committed_transactions(state) == 0  # joining writes nothing
    with write_lock_held(state):
        # The first room's commit waits for the lock: it is in flight.
        await clients[0].send(PLUS)
        await wait_until(lambda: store.committer is not None and not store.queued)
        for websocket in clients[1:]:
            await websocket.send(PLUS)
        await wait_until(lambda: len(store.queued) == len(clients) - 1)
    for websocket in clients:
        await wait_for_value(websocket, 1)
    # One for the first room, one for the nine that flushed while it waited.
    assert committed_transactions(state) == 2
    assert stored_rows(state) == dict.fromkeys(names, 1)


async def test_a_counter_back_at_zero_takes_no_row(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state))
    websocket = await join(app, "/c/votes")
    await websocket.send(PLUS)
    await wait_for_value(websocket, 1)
    assert stored_rows(state) == {"votes": 1}
    await websocket.send(MINUS)
    await wait_for_value(websocket, 0)
    assert stored_rows(state) == {}


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


async def test_restart_keeps_each_room_its_own_value(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    # Names are case-sensitive: "votes" and "Votes" are two counters.
    actions = {"/": [PLUS] * 2, "votes": [PLUS] * 3, "Votes": [MINUS] * 4, "a-b_c": [PLUS]}
    expected = {"/": 2, "votes": 3, "Votes": -4, "a-b_c": 1}
    first = server_process("--port", "0", "--rate", "0", "--state", state)
    for name, messages in actions.items():
        async with connect(room_url(first.port, name)) as websocket:
            assert await connect_sequence(websocket) == 0
            for message in messages:
                await websocket.send(message)
            await wait_for_value(websocket, expected[name])
    returncode, log = first.stop()
    assert returncode == 0, log
    second = server_process("--port", "0", "--state", state)
    assert {name: await value_on_start(second, name) for name in expected} == expected
    assert await value_on_start(second, "never-used") == 0


async def burst_until_killed(
    process: ServerProcess, names: list[str], *, clients_per_room: int, kill_at: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Send ``plus`` into every room until each has shown ``kill_at``, then kill -9 the server.

    Return, per room, the highest value any client was shown and the actions
    sent (counted before each send: an upper bound even if the kill cuts it).
    """
    shown = dict.fromkeys(names, 0)
    sent = dict.fromkeys(names, 0)
    enough_shown = asyncio.Event()

    async def send_until_cut(name: str, websocket: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                for _ in range(50):
                    sent[name] += 1
                    await websocket.send(PLUS)
                # send() rarely waits (the socket takes it all): let the others run.
                await asyncio.sleep(0)

    async def watch(name: str, websocket: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in websocket:
                event = json.loads(message)
                if event["type"] == "state":
                    shown[name] = max(shown[name], event["value"])
                    if min(shown.values()) >= kill_at:
                        enough_shown.set()

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            (name, await stack.enter_async_context(connect(room_url(process.port, name))))
            for name in names
            for _ in range(clients_per_room)
        ]
        for _, websocket in clients:
            assert await connect_sequence(websocket) == 0
        tasks = [
            asyncio.create_task(task(name, websocket))
            for name, websocket in clients
            for task in (send_until_cut, watch)
        ]
        async with asyncio.timeout(TIMEOUT):
            await enough_shown.wait()
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*tasks)
    return shown, sent


async def test_kill_9_mid_burst_loses_nothing_shown_and_counts_nothing_twice(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--port", "0", "--rate", "0", "--state", state)
    shown, sent = await burst_until_killed(process, ["/"], clients_per_room=4, kill_at=2_000)
    restarted = server_process("--port", "0", "--state", state)
    value = await value_on_start(restarted)
    assert shown["/"] <= value <= sent["/"], (shown, value, sent)


async def test_kill_9_mid_bursts_in_several_rooms_keeps_each_room_within_its_bounds(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--port", "0", "--rate", "0", "--state", state)
    names = ["/", "left", "right"]
    shown, sent = await burst_until_killed(process, names, clients_per_room=2, kill_at=1_000)
    restarted = server_process("--port", "0", "--state", state)
    for name in names:
        value = await value_on_start(restarted, name)
        assert shown[name] <= value <= sent[name], (name, shown[name], value, sent[name])


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


async def test_joining_and_leaving_many_rooms_leaves_no_rows_and_no_growth(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    process = server_process("--port", "0", "--state", str(state))
    before = sizes(state)
    for n in range(200):
        async with connect(room_url(process.port, f"visited-{n}")) as websocket:
            assert await connect_sequence(websocket) == 0
    # A last client of / sees a flush after all those leaves: the server is idle.
    assert await value_on_start(process) == 0
    assert stored_rows(state) == {}
    assert sizes(state) == before


async def test_single_counter_file_is_migrated_to_the_counter_at_root(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    write_single_counter_file(state, 41)
    first = server_process("--port", "0", "--state", str(state))
    assert await value_on_start(first) == 41
    assert await value_on_start(first, "votes") == 0
    async with connect(first.url) as websocket:
        assert await connect_sequence(websocket) == 41
        await websocket.send(PLUS)
        await wait_for_value(websocket, 42)
    returncode, log = first.stop()
    assert returncode == 0, log
    migrated = [line for line in log.splitlines() if "migrated" in line]
    assert len(migrated) == 1, log
    assert " INFO " in migrated[0] and "/ keeps its value 41" in migrated[0]
    with contextlib.closing(sqlite3.connect(state)) as reader:
        assert reader.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert stored_rows(state) == {"/": 42}
    second = server_process("--port", "0", "--state", str(state))
    assert await value_on_start(second) == 42
    assert "migrated" not in second.log


async def test_action_that_would_leave_the_range_gets_an_error_and_is_not_counted(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    await write_state(state, MAX_VALUE)
    process = server_process("--port", "0", "--rate", "0", "--state", str(state))
    async with connect(process.url) as websocket:
        assert await connect_sequence(websocket) == MAX_VALUE
        await websocket.send(PLUS)
        event = await wait_for_event(websocket, lambda e: e["type"] == "error")
        assert event["error"].startswith("value out of range")
        await websocket.send(MINUS)
        await wait_for_value(websocket, MAX_VALUE - 1)
    returncode, log = process.stop()
    assert returncode == 0, log
    assert stored_value(state) == MAX_VALUE - 1


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


def edited_beyond_the_range(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    asyncio.run(write_state(path, 5, "votes"))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA ignore_check_constraints = ON")  # as a careless hand edit would
        db.execute("UPDATE counter SET value = ? WHERE name = 'votes'", (MAX_VALUE + 1,))
    return path


def single_counter_beyond_the_range(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    write_single_counter_file(path, 2**63 - 1)  # SQLite's largest integer: schema 1 took it
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
        (edited_beyond_the_range, f"counter 'votes' holds {MAX_VALUE + 1}, beyond ±{MAX_VALUE}"),
        (single_counter_beyond_the_range, f"counter '/' holds {2**63 - 1}, beyond ±{MAX_VALUE}"),
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


# --- Subprocess on a failing disk ---------------------------------------------


async def events_until_closed_or_rejected(websocket: ClientConnection) -> list[dict[str, Any]]:
    """Read until the server closes the connection or rejects an action (fail fast)."""
    events: list[dict[str, Any]] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT):
            async for message in websocket:
                events.append(json.loads(message))
                if events[-1]["type"] == "error":
                    break
    return events


@pytest.mark.parametrize("fault", ["eio sync", "eio write"])
async def test_io_error_in_a_commit_stops_the_server_without_saying_not_applied(
    fault: str, faulty_disk: FaultyDisk, server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--rate", "0", "--state", state, env=faulty_disk.environment())
    async with connect(process.url) as websocket:
        assert await connect_sequence(websocket) == 0
        for _ in range(3):
            await websocket.send(PLUS)
        await wait_for_value(websocket, 3)
        faulty_disk.fail(fault)
        await websocket.send(PLUS)  # its commit's outcome is unknown: fsync or write said EIO
        events = await events_until_closed_or_rejected(websocket)
    assert not [event for event in events if not_applied(event)], events
    assert {"type": "state", "value": 4} not in events  # never shown: never confirmed
    returncode = process.process.wait(TIMEOUT)
    process.reader.join(TIMEOUT)
    assert returncode != 0, process.log
    critical = [line for line in process.log.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, process.log
    assert "may or may not be on disk" in critical[0]

    faulty_disk.heal()
    restarted = server_process("--port", "0", "--state", state)
    assert await value_on_start(restarted) in (3, 4)


async def test_full_disk_in_a_commit_rejects_the_actions_and_the_server_carries_on(
    faulty_disk: FaultyDisk, server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--rate", "0", "--state", state, env=faulty_disk.environment())
    port = process.port
    async with connect(process.url) as websocket:
        assert await connect_sequence(websocket) == 0
        await websocket.send(PLUS)
        await wait_for_value(websocket, 1)
        faulty_disk.fail("enospc")
        await websocket.send(PLUS)
        event = await wait_for_event(websocket, lambda e: e["type"] == "error")
        assert event["error"] == "store unavailable: 1 action(s) not applied"
        assert await store_health(port) == (503, "unavailable")  # alive, not ready
        faulty_disk.heal()
        await websocket.send(PLUS)
        await wait_for_value(websocket, 2)
        assert await store_health(port) == (200, "ok")
    returncode, log = process.stop()
    assert returncode == 0, log
    restarted = server_process("--port", "0", "--state", state)
    assert await value_on_start(restarted) == 2
