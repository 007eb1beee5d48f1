"""``--state PATH``: every counter and session in one SQLite file, durable across crashes.

Restarts, kills and failing disks use ``python server.py`` subprocesses on
real files in ``tmp_path``; the disk fails (or hangs) for real, through a
small C library preloaded into the server (``tests/faults/faults.c``). The
rest runs in-process, with real clients, or calls the store itself where only
the store can be watched (transactions, sweeps, its agreement with the
memory store).
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
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from counter_sync import sqlite_store
from counter_sync.client import Client
from counter_sync.config import (
    CLOSE_TIMEOUT,
    FLUSH_TIMEOUT,
    MAX_VALUE,
    SESSION_TTL,
    STORE_CLOSE_TIMEOUT,
)
from counter_sync.sqlite_store import APPLICATION_ID, SCHEMA_VERSION, SqliteStore
from counter_sync.store import Change, MemoryStore, OpBatch, RoomState
from testkit.processes import ROOT, TIMEOUT, ServerProcess
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    http_request,
    is_state,
    join,
    require_binary,
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
# The rooms version's layout (schema 2, as of commit 60f8a8c): one row per
# room, no versions, no sessions.
ROOMS_SCHEMA = f"""
CREATE TABLE counter (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
        CHECK (typeof(value) = 'integer' AND value BETWEEN -{MAX_VALUE} AND {MAX_VALUE})
) WITHOUT ROWID
"""
FAULTS_SOURCE = ROOT / "tests" / "faults" / "faults.c"
# The longest a stop may take, as docs/operations.md#stopping states it: the
# closes (CLOSE_TIMEOUT + 1), the aborted handlers (CLOSE_TIMEOUT), the last
# flushes and the store.
STOP_BOUND = CLOSE_TIMEOUT + 1 + CLOSE_TIMEOUT + FLUSH_TIMEOUT + STORE_CLOSE_TIMEOUT
SESSION = "sqlite-session-0123456789"
# --forget-after at its smallest, so that forgetting takes seconds: a room's
# row goes within FORGET (and one sweep interval, as long) after its last use.
FORGET = 1.0
# The store's own, in-process: shorter still.
QUICK_FORGET = 0.2
# Rooms the churn test opens in turn, and how recently a room may have been
# used for its row to be in the file still: forget-after, a sweep interval,
# and scheduling slack on a busy machine.
CHURN_ROOMS = 2_000
CHURN_WINDOW = FORGET + FORGET + 1.0
# Rooms the churn opens from one loopback address before it takes the next:
# as many clients would, each below the cap on new rooms per address (the
# admission's business, not the store's).
CHURN_PER_ADDRESS = 20


# --- Helpers ------------------------------------------------------------------


def room_url(port: int, name: str = "/") -> str:
    """The WebSocket address of a room: ``/`` or ``/c/<name>``."""
    return f"ws://127.0.0.1:{port}{'/' if name == '/' else f'/c/{name}'}"


def churn_source(n: int) -> tuple[str, int]:
    """Where the ``n``-th of many new rooms is opened from: see CHURN_PER_ADDRESS."""
    return f"127.0.0.{2 + n // CHURN_PER_ADDRESS}", 0


async def connect_sequence(websocket: ClientConnection) -> int:
    """Read what every client gets first (users, then state); return the value."""
    return int((await first_state(websocket))["value"])


async def first_state(websocket: ClientConnection) -> dict[str, Any]:
    """Read what every client gets first (users, then state); return the state."""
    users = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    state: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    assert (users["type"], state["type"]) == ("users", "state")
    return state


async def value_on_start(process: ServerProcess, name: str = "/") -> int:
    """The value a freshly started server shows the first client of a room."""
    async with connect(room_url(process.port, name)) as websocket:
        return await connect_sequence(websocket)


async def session_join(port: int, session: str = SESSION) -> tuple[ClientConnection, list[Any]]:
    """Connect to ``/`` with a session; return the client and its first three messages."""
    websocket = await connect(f"{room_url(port)}?session={session}")
    async with asyncio.timeout(TIMEOUT):
        first = [json.loads(await websocket.recv()) for _ in range(3)]
    return websocket, first


def stored_value(path: Path, name: str = "/") -> int:
    """What another process reading the file sees: only committed transactions."""
    return stored_rows(path).get(name, 0)


def stored_rows(path: Path) -> dict[str, int]:
    """Every counter row of the file, as another process reads it."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        return dict(reader.execute("SELECT name, value FROM counter").fetchall())


async def rows_become(path: Path, expected: dict[str, int]) -> None:
    """Wait for the file to hold exactly ``expected``: for a sweep. Fail after TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while stored_rows(path) != expected:  # noqa: ASYNC110 - a sweep is no event to await
            await asyncio.sleep(0.02)


def last_used(path: Path, name: str) -> float:
    """When the file says counter ``name`` was last used (Unix time)."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        (used,) = reader.execute("SELECT used FROM counter WHERE name = ?", (name,)).fetchone()
    return float(used)


def stored_sessions(path: Path) -> dict[tuple[str, str], int]:
    """The last done op of every (room, session) the file holds."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        rows = reader.execute("SELECT room, session, done FROM session").fetchall()
    return {(room, session): done for room, session, done in rows}


def age_sessions(path: Path, seconds: float) -> None:
    """Make every session of a closed file look ``seconds`` older, as if its server had slept."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE session SET touched = touched - ?", (seconds,))


@contextlib.asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[SqliteStore]:
    """The store on ``path``, open, as a server holds it; closed afterwards."""
    store = SqliteStore(path, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def write_state(path: Path, value: int, name: str = "/") -> None:
    """Make a counter-sync file holding ``value`` in room ``name``, as a server would."""
    async with opened(path) as store:
        await store.commit([Change(name, value)])


def ops(session: str, first: int, *deltas: int) -> OpBatch:
    return OpBatch(session, first, deltas)


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


def write_rooms_file(path: Path, rows: dict[str, int]) -> None:
    """Make a file as the rooms version left it: schema 2, WAL, one row per room."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 2")
        db.execute(ROOMS_SCHEMA)
        db.executemany("INSERT INTO counter (name, value) VALUES (?, ?)", rows.items())
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = WAL")


def migrated_once(log: str, path: Path) -> str:
    """The one INFO line a server logged migrating ``path``, now in this version's layout."""
    lines = [line for line in log.splitlines() if ": migrated from schema" in line]
    assert len(lines) == 1 and " INFO " in lines[0], log
    with contextlib.closing(sqlite3.connect(path)) as reader:
        assert reader.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    return lines[0]


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


async def store_health(port: int) -> tuple[int, str]:
    """What the operator's probes say: ``/readyz``'s status and ``/healthz``'s store field."""
    ready_status, _, _ = await http_request(port, "/readyz")
    _, _, health = await http_request(port, "/healthz")
    store: str = json.loads(health)["store"]
    return ready_status, store


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
        """Make the WAL's I/O fail: ``"eio"``, ``"enospc"`` or ``"hang"``, maybe narrowed.

        A second word ``"sync"`` narrows it to fsync, so the commit's frames
        are written first; ``"write"`` to the writes; with neither, both.
        """
        self.trigger.write_text(how)

    @property
    def hanging(self) -> Path:
        """The file that exists while a call hangs (after ``fail("hang ...")``)."""
        return self.trigger.with_name(self.trigger.name + ".hanging")

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


async def test_changes_of_many_rooms_in_one_commit_share_one_transaction(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state) as store:
        outcomes = await store.commit([Change(f"room-{n}", n) for n in range(1, 21)])
        # Each room gets its own value, and its own number of the one sequence.
        assert [outcome.state.value for outcome in outcomes] == list(range(1, 21))
        assert [outcome.state.seq for outcome in outcomes] == list(range(1, 21))
        assert {outcome.state.epoch for outcome in outcomes} == {store.epoch}
        assert committed_transactions(state) == 1
    assert stored_rows(state) == {f"room-{n}": n for n in range(1, 21)}


async def test_commits_called_while_one_waits_for_the_disk_share_the_next_transaction(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state) as store:
        with write_lock_held(state):
            first = asyncio.create_task(store.commit([Change("first", 1)]))
            await wait_until(lambda: bool(store.committing))  # waiting for the lock
            others = [
                asyncio.create_task(store.commit([Change(f"room-{n}", n)])) for n in range(1, 6)
            ]
            await wait_until(lambda: len(store.queued) == len(others))
        outcomes = await asyncio.gather(first, *others)
        assert [each[0].state.value for each in outcomes] == [1, 1, 2, 3, 4, 5]
        assert committed_transactions(state) == 2  # the first, then the five together


async def test_change_beyond_the_range_counts_nothing_but_its_ops_are_done(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    await write_state(state, MAX_VALUE, "full")
    async with opened(state) as store:
        before = await store.load("full")
        beyond, other = await store.commit(
            [Change("full", 0, (ops(SESSION, 1, +1, +1),)), Change("other", 5)]
        )
        assert (beyond.applied, beyond.state, beyond.done) == (False, before, {SESSION: (0, 2)})
        assert (other.applied, other.state.value) == (True, 5)
        assert store.healthy()  # the value was refused, not the disk
        (back,) = await store.commit([Change("full", 0, (ops(SESSION, 3, -1),))])
        assert (back.applied, back.state.value) == (True, MAX_VALUE - 1)
        assert back.done == {SESSION: (2, 3)}
    assert stored_rows(state) == {"full": MAX_VALUE - 1, "other": 5}
    assert stored_sessions(state) == {("full", SESSION): 3}


async def test_a_counter_back_at_zero_keeps_its_row_and_its_version(tmp_path: Path) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state) as store:
        await store.commit([Change("votes", 1)])
        (at_zero,) = await store.commit([Change("votes", -1)])
        assert stored_rows(state) == {"votes": 0}  # listed, as the other stores list it
        await store.commit([Change("elsewhere", 1)])
        assert await store.load("votes") == at_zero.state
        assert [name for name, _ in await store.counters("", "", 10)] == ["elsewhere", "votes"]


async def test_a_counter_unused_for_forget_after_is_swept_and_reads_0_at_a_newer_version(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state, forget_after=QUICK_FORGET) as store:
        (votes,) = await store.commit([Change("votes", 3)])
        changed_at = time.monotonic()
        # Nobody commits: the store's own timer sweeps.
        await rows_become(state, {})
        assert time.monotonic() - changed_at >= QUICK_FORGET
        again = await store.load("votes")
        assert (again.value, again.epoch) == (0, votes.state.epoch)
        assert again.is_newer_than(votes.state)
        assert await store.counters("", "", 10) == []
    async with opened(state) as restarted:
        assert await restarted.load("votes") == again  # the file kept the newer version


async def test_a_loaded_room_is_kept_however_long_and_forgotten_forget_after_after_its_leave(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state, forget_after=QUICK_FORGET) as store:
        await store.load("busy")
        await store.commit([Change("busy", 1), Change("idle", 1)])
        # Both were as stale when the sweep took idle: busy has users here.
        await rows_become(state, {"busy": 1})
        store.release("busy")
        left_at = time.monotonic()
        await rows_become(state, {})
        assert time.monotonic() - left_at >= QUICK_FORGET
        assert (await store.load("busy")).value == 0


async def test_a_join_writes_nothing_and_a_leave_rides_on_the_next_transaction(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state) as store:
        await store.commit([Change("votes", 1)])
        changed = last_used(state, "votes")
        await store.load("votes")
        store.release("votes")
        left = time.time()
        assert committed_transactions(state) == 1
        await store.commit([Change("elsewhere", 1)])
        assert committed_transactions(state) == 2
        assert changed < last_used(state, "votes") <= left


async def test_the_epoch_is_kept_by_the_file_and_a_new_file_has_a_new_one(
    tmp_path: Path,
) -> None:
    epochs = []
    for path in (tmp_path / "one.sqlite", tmp_path / "one.sqlite", tmp_path / "two.sqlite"):
        async with opened(path) as store:
            epochs.append(store.epoch)
            assert (await store.load("/")).epoch == store.epoch
    assert epochs[0] == epochs[1] != epochs[2]


async def test_a_sessions_last_done_op_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state) as store:
        await store.commit([Change("/", 0, (ops(SESSION, 1, +1, +1, +1),))])
    async with opened(state) as again:
        # The server died before its ack: the client sends ops 2 to 4 again.
        (retry,) = await again.commit([Change("/", 0, (ops(SESSION, 2, +1, +1, +1),))])
        assert (retry.state.value, retry.done) == (4, {SESSION: (3, 4)})


async def test_sessions_idle_beyond_the_ttl_are_swept_and_the_others_kept(
    tmp_path: Path,
) -> None:
    state = tmp_path / "counter.sqlite"
    ttl = 60.0
    async with opened(state, session_ttl=ttl) as store:
        await store.commit([Change("/", 0, (ops("idle-session-0123456", 1, +1),))])
    age_sessions(state, ttl + 1)
    async with opened(state, session_ttl=ttl) as store:
        (outcome,) = await store.commit([Change("/", 0, (ops(SESSION, 1, +1),))])
        assert outcome.state.value == 2
        assert stored_sessions(state) == {("/", SESSION): 1}


async def test_a_sweep_deletes_a_bounded_number_per_transaction_until_it_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "SWEEP_LIMIT", 2)
    state = tmp_path / "counter.sqlite"
    old = [f"old-session-{n:010d}" for n in range(5)]
    async with opened(state) as store:
        await store.commit([Change("/", 0, tuple(ops(session, 1, +1) for session in old))])
    age_sessions(state, SESSION_TTL + 1)
    async with opened(state) as store:
        await store.commit([Change("/", 0, (ops(SESSION, 1, +1),))])
        await wait_until(lambda: store.committer is None)
        assert stored_sessions(state) == {("/", SESSION): 1}
        # The commit swept 2, then two transactions of their own 2 and 1.
        assert committed_transactions(state) == 3


async def test_a_commit_that_only_looks_sessions_up_takes_no_write_lock(tmp_path: Path) -> None:
    state = tmp_path / "counter.sqlite"
    async with opened(state) as store:
        await store.commit([Change("/", 0, (ops(SESSION, 1, +1),))])
        with write_lock_held(state):  # an operator's write in a sqlite3 shell
            (outcome,) = await store.commit([Change("/", 0, (), (SESSION, "new-session-0123456"))])
        assert outcome.done == {SESSION: (1, 1), "new-session-0123456": (0, 0)}
        assert committed_transactions(state) == 1


async def test_counters_are_listed_by_name_a_page_at_a_time(tmp_path: Path) -> None:
    async with opened(tmp_path / "counter.sqlite") as store:
        names = ["/", "vote", "votes-1", "votes-2", "votes_3", "votesz", "w"]
        await store.commit([Change(name, 1) for name in names] + [Change("votes-0", 0)])

        async def page(prefix: str, after: str, limit: int) -> list[str]:
            return [name for name, _ in await store.counters(prefix, after, limit)]

        assert await page("votes", "", 2) == ["votes-1", "votes-2"]
        assert await page("votes", "votes-2", 2) == ["votes_3", "votesz"]
        assert await page("votes", "votesz", 2) == []
        assert await page("", "votesz", 5) == ["w"]
        assert await page("", "", 100) == sorted(names)  # votes-0 never changed: no row


SESSIONS = ("session-a-0123456789", "session-b-0123456789")
ROOMS = ("/", "votes")
op_batches = st.builds(
    OpBatch,
    st.sampled_from(SESSIONS),
    st.integers(1, 8),
    st.lists(st.sampled_from([-1, 0, 1]), min_size=1, max_size=4).map(tuple),
)
changes = st.builds(
    Change,
    st.sampled_from(ROOMS),
    st.one_of(st.integers(-3, 3), st.sampled_from([MAX_VALUE, -MAX_VALUE])),
    st.lists(op_batches, max_size=3).map(tuple),
    st.lists(st.sampled_from(SESSIONS), max_size=2, unique=True).map(tuple),
    st.one_of(st.none(), st.integers(-3, 3)),
)
# A step is one commit (of a flush pass, or an API call), a room the API
# forgets, or None: the server restarts on the file.
steps = st.lists(
    st.one_of(st.lists(changes, min_size=1, max_size=3), st.sampled_from(ROOMS), st.none()),
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(steps)
def test_the_file_answers_as_the_memory_store_does(script: list[list[Change] | str | None]) -> None:
    asyncio.run(compare_with_memory(script))


async def compare_with_memory(script: list[list[Change] | str | None]) -> None:
    """Run the same calls on both stores; the file's server restarts at each None."""
    memory = MemoryStore(max_counters=10)
    runs: list[list[list[Change] | str]] = [[]]
    for step in script:
        if step is None:
            runs.append([])
        else:
            runs[-1].append(step)
    with tempfile.TemporaryDirectory() as directory:
        for run in runs:
            async with opened(Path(directory) / "counter.sqlite") as store:
                for step in run:
                    if isinstance(step, str):
                        assert same_state(await store.forget(step), await memory.forget(step))
                        continue
                    answers = zip(await store.commit(step), await memory.commit(step), strict=True)
                    for change, (answer, expected) in zip(step, answers, strict=True):
                        assert (answer.applied, answer.done) == (expected.applied, expected.done)
                        assert same_state(answer.state, expected.state), change
                await compare_reads(store, memory)
            for room in ROOMS:
                memory.release(room)  # the server stopped: nobody is in any room


async def compare_reads(store: SqliteStore, memory: MemoryStore) -> None:
    for room in ROOMS:
        assert same_state(await store.load(room), await memory.load(room)), room
        assert same_state((await store.peek(room))[0], (await memory.peek(room))[0]), room
    # The file lists what it holds as the memory store does. It holds no row
    # for a counter only joined (or forgotten while someone is in it), which
    # the memory store keeps, at 0.
    listed = {name: (state.value, state.seq) for name, state in await memory.counters("", "", 9)}
    in_file = {name: (state.value, state.seq) for name, state in await store.counters("", "", 9)}
    assert in_file.items() <= listed.items()
    assert all(value == 0 for name, (value, _) in listed.items() if name not in in_file)


def same_state(answer: RoomState, expected: RoomState) -> bool:
    """The same value and version, but for a room at 0 without a row in the file.

    Loaded again, it is at the file's latest seq, which may be past the one
    the memory store keeps for it. Each store has an epoch of its own.
    """
    if answer.value != expected.value:
        return False
    return answer.seq >= expected.seq if answer.value == 0 else answer.seq == expected.seq


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
        assert not app.hub.store.healthy()
    await websocket.send(PLUS)
    await wait_for_value(websocket, 1)
    assert app.hub.store.healthy()
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
        await wait_until(lambda: bool(store.committing))
        for websocket in clients[1:]:
            await websocket.send(PLUS)
        # They wait for the next flush pass, which commits them all at once.
        await wait_until(lambda: len(app.hub.flusher.dirty) == len(clients) - 1)
    for websocket in clients:
        await wait_for_value(websocket, 1)
    # One for the first room, one for the nine that flushed while it waited.
    assert committed_transactions(state) == 2
    assert stored_rows(state) == dict.fromkeys(names, 1)


async def test_a_room_used_once_is_forgotten_and_one_with_users_kept_while_they_stay(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state), forget_after=FORGET)
    staying = await join(app, "/c/kept")
    await staying.send(PLUS)
    await wait_for_value(staying, 1)
    async with connect(room_url(app.port, "once")) as once:
        await connect_sequence(once)
        await once.send(MINUS)
        shown = await wait_for_value(once, -1)
    # Once "once" is forgotten, "kept" has been unchanged for longer still.
    await rows_become(state, {"kept": 1})
    async with connect(room_url(app.port, "once")) as again:
        rejoined = await first_state(again)
    assert (rejoined["value"], rejoined["epoch"]) == (0, shown["epoch"])
    assert rejoined["seq"] > shown["seq"]
    await staying.close()
    await rows_become(state, {})


async def test_a_session_that_joins_is_told_its_last_done_op_while_the_file_is_locked(
    start_server: StartServer, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    app = await start_server(state=str(state))
    websocket, _ = await session_join(app.port)
    await websocket.send(json.dumps({"action": "plus", "op": 1}))
    await wait_for_event(websocket, lambda e: e == {"type": "ack", "op": 1})
    await websocket.close()
    before = sizes(state)
    with write_lock_held(state):  # looking a session up needs no write lock
        _, first = await session_join(app.port)
    assert [first[0]["type"], first[2]] == ["users", {"type": "ack", "op": 1}]
    assert is_state(first[1], 1)
    assert sizes(state) == before  # nothing written


# --- Subprocess: restarts, kills, refusals ------------------------------------


async def test_restart_keeps_the_value_its_version_and_the_history(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    first = server_process("--port", "0", "--rate", "0", "--state", state)
    async with connect(first.url) as websocket:
        assert await connect_sequence(websocket) == 0
        for message in [PLUS] * 5 + [MINUS]:
            await websocket.send(message)
        shown = await wait_for_value(websocket, 4)
    returncode, log = first.stop()
    assert returncode == 0, log
    second = server_process("--port", "0", "--state", state)
    async with connect(second.url) as websocket:
        assert await first_state(websocket) == shown  # same value, seq and epoch


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


async def test_kill_9_and_a_restart_count_each_numbered_op_exactly_once(
    server_process: StartProcess, tmp_path: Path
) -> None:
    # Session clients send numbered ops into two rooms; the only instance is
    # killed in the middle and restarted on the same file and port. Each
    # client reconnects, learns its last done op and resends every op above
    # it: ops committed before the kill but never acked count once, and so do
    # ops lost with the process.
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--rate", "0", "--state", state)
    port = process.port
    per_client, acked_before_kill = 400, 100
    rooms = {"/": 4, "votes": 2}  # clients per room
    names = [name for name, count in rooms.items() for _ in range(count)]
    clients = [
        Client(room_url(port, name), session=f"crash-test-session-{n:04d}")
        for n, name in enumerate(names)
    ]

    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        epochs = {client.epoch for client in clients}
        senders = [asyncio.create_task(send_ops(client, per_client)) for client in clients]
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(acked_at_least(client, acked_before_kill) for client in clients))
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(TIMEOUT)
        unacked_at_kill = sum(client.pending for client in clients)
        restarted = server_process("--port", str(port), "--rate", "0", "--state", state)
        async with asyncio.timeout(3 * TIMEOUT):
            await asyncio.gather(*senders)
        assert unacked_at_kill > 0  # the kill came mid-run: there was something to resend
        assert [client.connections for client in clients] == [2] * len(clients)
        assert [client.rejected for client in clients] == [[]] * len(clients)
        assert {client.epoch for client in clients} == epochs  # the same history
        assert sum(client.stale_states for client in clients) == 0
    for name, count in rooms.items():
        assert await value_on_start(restarted, name) == count * per_client


async def send_ops(client: Client, count: int) -> None:
    """Click ``count`` times, as fast as the client's window of unacked ops allows."""
    for _ in range(count):
        await client.wait(lambda: client.pending < client.max_pending)
        await client.plus()
    await client.settled()


async def acked_at_least(client: Client, count: int) -> None:
    await client.wait(lambda: client.next_op - 1 - client.pending >= count)


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
        async with connect(
            room_url(process.port, f"visited-{n}"), local_addr=churn_source(n)
        ) as websocket:
            assert await connect_sequence(websocket) == 0
    # A last client of / sees a flush after all those leaves: the server is idle.
    assert await value_on_start(process) == 0
    assert stored_rows(state) == {}
    assert sizes(state) == before


async def test_a_churn_of_rooms_clicked_once_leaves_only_the_rows_forget_after_allows(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    process = server_process("--state", str(state), "--forget-after", str(FORGET))
    used: list[tuple[float, str]] = []  # (when its client left, room)

    def only_recent_rows() -> set[str]:
        """Check that the file holds rows of recently used rooms only; return those rooms."""
        recent = {room for at, room in used if at >= time.monotonic() - CHURN_WINDOW}
        rows = set(stored_rows(state))
        assert rows <= recent, sorted(rows - recent)[:5]
        return rows

    for n in range(CHURN_ROOMS):
        name = f"churn-{n}"
        async with connect(room_url(process.port, name), local_addr=churn_source(n)) as websocket:
            await connect_sequence(websocket)
            await websocket.send(PLUS)
            await wait_for_value(websocket, 1)
        used.append((time.monotonic(), name))
        if n % 100 == 99:
            only_recent_rows()
    # However fast the churn went, the rows go on schedule after it, then all.
    async with asyncio.timeout(TIMEOUT):
        while only_recent_rows():  # noqa: ASYNC110 - a sweep is no event to await
            await asyncio.sleep(0.05)


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
    assert "/ keeps its value 41" in migrated_once(log, state)
    assert stored_rows(state) == {"/": 42}
    second = server_process("--port", "0", "--state", str(state))
    assert await value_on_start(second) == 42
    assert ": migrated from schema" not in second.log


async def test_rooms_file_is_migrated_keeping_every_counter_in_one_history(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    write_rooms_file(state, {"/": 3, "votes": -2, "Votes": MAX_VALUE})
    first = server_process("--port", "0", "--state", str(state))
    async with connect(room_url(first.port, "votes")) as votes:
        shown = await first_state(votes)
        assert (shown["value"], shown["seq"]) == (-2, 0)  # the old layout had no versions
        async with connect(first.url) as root:
            assert (await first_state(root))["epoch"] == shown["epoch"]
        await votes.send(PLUS)
        changed = await wait_for_value(votes, -1)
        assert changed["seq"] > 0 and changed["epoch"] == shown["epoch"]
    assert await value_on_start(first, "Votes") == MAX_VALUE
    returncode, log = first.stop()
    assert returncode == 0, log
    assert "3 counter(s) keep their values" in migrated_once(log, state)
    assert stored_rows(state) == {"/": 3, "votes": -1, "Votes": MAX_VALUE}
    second = server_process("--port", "0", "--state", str(state))
    assert await value_on_start(second, "votes") == -1
    assert ": migrated from schema" not in second.log


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


def rooms_file_beyond_the_range(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    write_rooms_file(path, {"votes": 5})
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA ignore_check_constraints = ON")
        db.execute("UPDATE counter SET value = ? WHERE name = 'votes'", (-MAX_VALUE - 1,))
    return path


def without_its_history(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    asyncio.run(write_state(path, 7))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM meta")
    return path


def from_a_newer_server(directory: Path) -> Path:
    path = directory / "counter.sqlite"
    asyncio.run(write_state(path, 7))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
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
        (rooms_file_beyond_the_range, f"counter 'votes' holds {-MAX_VALUE - 1}, beyond"),
        (without_its_history, "marked as counter-sync but its meta row is missing"),
        (from_a_newer_server, f"schema version {SCHEMA_VERSION + 1}; this server knows 1, 2, 3"),
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


async def test_an_io_error_during_a_drain_still_stops_the_server_with_status_1(
    faulty_disk: FaultyDisk, server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process(
        "--rate", "0", "--state", state, "--drain-seconds", "30", env=faulty_disk.environment()
    )
    clients = [await connect(process.url) for _ in range(3)]  # one of them is drained first
    for client in clients:
        await connect_sequence(client)
    process.process.send_signal(signal.SIGTERM)  # the drain begins, for 30 s
    async with asyncio.timeout(TIMEOUT):
        while (await store_health(process.port))[0] != 503:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.01)
    faulty_disk.fail("eio sync")
    sender = next(client for client in clients if client.close_code is None)
    await sender.send(PLUS)  # its commit's outcome is unknown: the server must not go on
    returncode = await asyncio.to_thread(process.process.wait, TIMEOUT)  # well before the 30 s
    process.reader.join(TIMEOUT)
    assert returncode == 1, process.log
    assert len([line for line in process.log.splitlines() if "CRITICAL" in line]) == 1
    codes = {client.close_code for client in clients}
    assert CloseCode.INTERNAL_ERROR in codes, codes  # 1011, not the drain's 1012


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
    assert not any(is_state(event, 4) for event in events)  # never shown: never confirmed
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


async def test_sigterm_exits_within_the_stop_bound_while_fsync_hangs(
    faulty_disk: FaultyDisk, server_process: StartProcess, tmp_path: Path
) -> None:
    state = str(tmp_path / "counter.sqlite")
    process = server_process("--rate", "0", "--state", state, env=faulty_disk.environment())
    async with connect(process.url) as websocket:
        assert await connect_sequence(websocket) == 0
        await websocket.send(PLUS)
        await wait_for_value(websocket, 1)
        faulty_disk.fail("hang sync")
        await websocket.send(PLUS)  # its commit writes the WAL, then waits in fsync for good
        await wait_until(faulty_disk.hanging.exists)
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        try:
            returncode = await asyncio.to_thread(process.process.wait, STOP_BOUND + TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND + TIMEOUT:g} s after SIGTERM")
        elapsed = time.monotonic() - started
    process.reader.join(TIMEOUT)
    assert elapsed <= STOP_BOUND, (elapsed, process.log)
    assert returncode == 0, process.log
    assert "the store did not close within" in process.log

    faulty_disk.heal()
    restarted = server_process("--port", "0", "--state", state)
    assert await value_on_start(restarted) in (1, 2)  # the hung commit: in doubt
