"""Keep the counters in a SQLite file so they survive restarts: ``--state PATH``.

One file holds every counter, one row per room (``"/"`` and each named
counter) with its version and when it was last used; the last done op of each
(room, session); and the file's history, its epoch and sequence. A room that
has never changed (or was forgotten) has no row and reads as 0. What the
store promises, in the order a change goes through it:

* Write-ahead. :meth:`SqliteStore.commit` returns only after its transaction
  is committed with ``synchronous=FULL`` (the WAL is fsynced), and the hub
  broadcasts a value, or acknowledges an op, only after ``commit`` returned
  it. A value anyone was shown, and an op anyone was told is done, is on disk.
* Atomic per room, sessions included. A room's new value, its ``seq`` and the
  last done op of every session in its change are written in one
  transaction, by the one rule of :func:`~counter_sync.store.apply_batch`. So
  an op sent again after the server died mid-flush counts at most once, and
  exactly once if it was not applied. A change that would take the value
  beyond ±MAX_VALUE counts no delta (``applied=False``), but its ops are done.
* Versions. Every committed change of a room takes the next number of one
  sequence kept in the file for all rooms, and so does every sweep that
  forgets counters: a room whose row was deleted (forgotten, by the sweep or
  the API) reads as 0 at a version newer than any it had, and never goes back.
  The epoch is drawn when the file is created (or migrated) and kept in it:
  it is the same after every restart.
* Group commit. The flusher sends the changes of every room that flushes in
  one pass as one :meth:`~SqliteStore.commit`; the commits that arrive while
  one waits for the disk go into the next transaction together. One fsync for
  all of them.
* Off the event loop. A commit blocks in fsync, and a sqlite3 connection
  belongs to the thread that opened it, so one worker thread owns the
  connection and makes every SQLite call; the loop only awaits it. The thread
  is a daemon: one stuck in fsync does not keep the process alive after the
  server's bounded stop has given up on it.
* Counters and sessions are forgotten, not kept forever. A sweep deletes the
  sessions whose last op is older than ``session_ttl``, and the counters
  nobody changed, joined or left for longer than ``forget_after`` and that
  nobody is in here now. It runs at most once per ``SWEEP_INTERVAL`` (or per
  ``forget_after`` if shorter): in the transaction of a commit that writes,
  or alone, from a timer, if it finds anything to delete. It deletes at most
  ``SWEEP_LIMIT`` rows of each table, then goes on at once, a transaction
  each, until it has caught up. Joins and leaves cost no transaction: the
  rooms loaded now are kept by the sweep, and the time of a leave goes into
  the file with the next transaction (at the latest at the next sweep or a
  clean stop; a crash loses it, and the row goes ``forget_after`` after its
  last change or sweep instead). Ages are wall-clock time, so that they
  survive restarts; a clock set forward forgets early by as much.
* Honest failures. A commit SQLite certainly rolled back (disk full, database
  locked) raises :exc:`~counter_sync.store.StoreUnavailable`: nothing of it
  counts, and the store carries on. Any other failure of a commit (an I/O
  error, say fsync returning EIO) may have left it on disk, so it raises
  :exc:`~counter_sync.store.StoreInDoubt`, and so does every later ``commit``:
  only a restart, which reads the file afresh, can tell what it holds.

At start-up the file is checked before SQLite may write to it: a file that is
not a counter-sync database, is corrupt, read-only, held by another server, or
holds a value beyond ±MAX_VALUE is refused with one line for the operator
(:exc:`~counter_sync.store.StoreError`) and left as it was. A file of an
earlier layout is migrated in one transaction: schema 1 (one counter) and
schema 2 (one row per room, no versions) keep every value, at ``seq`` 0 in a
new epoch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from counter_sync.config import (
    BUSY_TIMEOUT,
    FORGET_AFTER,
    LOG_INTERVAL,
    MAX_VALUE,
    SESSION_TTL,
    SWEEP_INTERVAL,
    SWEEP_LIMIT,
)
from counter_sync.store import (
    DEFAULT_ROOM,
    Change,
    Observer,
    Outcome,
    RoomState,
    StoreError,
    StoreInDoubt,
    StoreUnavailable,
    apply_change,
    new_epoch,
    one_line,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger("counter_sync.sqlite_store")

_T = TypeVar("_T")

# "CSYN" in the database header: four bytes at a fixed offset tell a foreign
# SQLite file from ours without letting SQLite open it (and maybe write to it).
APPLICATION_ID = 0x4353594E
SCHEMA_VERSION = 3  # PRAGMA user_version for the layout below
_SINGLE_COUNTER_VERSION = 1  # the layout before rooms: one row, id 0
_ROOMS_VERSION = 2  # one row per room, without versions or sessions

_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100
_APPLICATION_ID_OFFSET = 68
# counter: one row per counter that has changed and is not forgotten, with
# the seq of its last change and when it was last used (changed, or left:
# Unix time), indexed for the sweep. meta: the one row of the file's history,
# its epoch and the last seq handed out to any room. session: the last done
# op of each (room, session), and when it was last changed (Unix time),
# indexed for the sweep.
# The CHECKs restate the rules the code keeps, so that a bug or a hand edit
# fails a statement instead of storing a value no client could be shown.
# WITHOUT ROWID: the key is the name, so each table is one b-tree instead of two.
_SCHEMA = (
    f"""
    CREATE TABLE counter (
        name TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
            CHECK (typeof(value) = 'integer' AND value BETWEEN -{MAX_VALUE} AND {MAX_VALUE}),
        seq INTEGER NOT NULL CHECK (typeof(seq) = 'integer' AND seq >= 0),
        used REAL NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX counter_by_use ON counter (used)",
    """
    CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        epoch TEXT NOT NULL,
        seq INTEGER NOT NULL CHECK (typeof(seq) = 'integer' AND seq >= 0)
    )
    """,
    f"""
    CREATE TABLE session (
        room TEXT NOT NULL,
        session TEXT NOT NULL,
        done INTEGER NOT NULL CHECK (typeof(done) = 'integer' AND done BETWEEN 0 AND {MAX_VALUE}),
        touched REAL NOT NULL,
        PRIMARY KEY (room, session)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX session_by_age ON session (touched)",
)
# The columns of each table of each layout, as pragma_table_info lists them.
_TABLES_BY_VERSION = {
    _SINGLE_COUNTER_VERSION: {"counter": ["id", "value"]},
    _ROOMS_VERSION: {"counter": ["name", "value"]},
    SCHEMA_VERSION: {
        "counter": ["name", "value", "seq", "used"],
        "meta": ["id", "epoch", "seq"],
        "session": ["room", "session", "done", "touched"],
    },
}
# The rows of each layout as (name, value), for the checks before migrating.
_COUNTERS_BY_VERSION = {
    _SINGLE_COUNTER_VERSION: f"SELECT '{DEFAULT_ROOM}' AS name, value FROM counter WHERE id = 0",
    _ROOMS_VERSION: "SELECT name, value FROM counter",
    SCHEMA_VERSION: "SELECT name, value FROM counter",
}
_SET_COUNTER = """
INSERT INTO counter (name, value, seq, used) VALUES (?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET value = excluded.value, seq = excluded.seq, used = excluded.used
"""
# A room left: used then, unless something later already counts (a change).
_TOUCH = "UPDATE counter SET used = max(used, ?) WHERE name = ?"
_SET_DONE = """
INSERT INTO session (room, session, done, touched) VALUES (?, ?, ?, ?)
ON CONFLICT (room, session) DO UPDATE SET done = excluded.done, touched = excluded.touched
"""
# The oldest idle sessions first, a bounded number, through the index.
_SWEEP_SESSIONS = """
DELETE FROM session WHERE (room, session) IN (
    SELECT room, session FROM session WHERE touched < ? ORDER BY touched LIMIT ?
)
"""
# The counters unused the longest, a bounded number, through the index: the
# sweep deletes those nobody is in, and marks the others used now.
_STALE_COUNTERS = "SELECT name FROM counter WHERE used < ? ORDER BY used LIMIT ?"
# Whether a sweep would find anything: two lookups of the oldest entry.
_ANY_STALE = """
SELECT EXISTS (SELECT 1 FROM session WHERE touched < ?)
    OR EXISTS (SELECT 1 FROM counter WHERE used < ?)
"""
# Errors after which SQLite has certainly rolled the transaction back: it
# could not write the WAL (disk full) or never got the write lock.
_KNOWN_ROLLBACKS = ("SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED")


@dataclasses.dataclass
class _Pending:
    """One :meth:`SqliteStore.commit` call, waiting for the transaction that carries it."""

    changes: Sequence[Change]
    done: asyncio.Future[list[Outcome]]


class SqliteStore:
    """Every counter and session in one SQLite file, in WAL mode, held by this process alone.

    ``session_ttl`` (seconds, ``--session-ttl``): how long after its last op
    a session's last done op is kept at least. ``forget_after`` (seconds,
    ``--forget-after``): how long a counter nobody changed, joined or left is
    kept at least (and at most about one sweep interval longer).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        session_ttl: float = SESSION_TTL,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)  # as the operator wrote it, for messages
        self.session_ttl = session_ttl
        self.forget_after = forget_after
        self.sweep_interval = min(SWEEP_INTERVAL, forget_after)
        self.worker: _Worker | None = None  # started by open()
        self._epoch = ""  # read from the file by open()
        # Touched on the worker thread only.
        self.connection: sqlite3.Connection | None = None
        self.lock: int | None = None  # descriptor of the file, holding the flock
        self.seq = 0  # the last seq committed to any room: meta.seq
        # Unix time; the first write sweeps what the last run left. Read by
        # the loop between two transactions, to offer the next one a sweep.
        self.next_sweep = 0.0
        # Touched on the event loop only.
        self.queued: list[_Pending] = []  # for the next transaction
        self.committing: list[_Pending] = []  # in the transaction under way
        self.committer: asyncio.Task[None] | None = None
        self.write_wanted = False  # a transaction without commits: a sweep, leaves
        self.sweeper: asyncio.Task[None] | None = None
        # Rooms with users here: the sweep keeps their rows. Those of them
        # that have a row (as far as this process wrote or read it), whose
        # leave is worth writing down; and the rooms left since the last
        # transaction, with when, for the next one.
        self.loaded: set[str] = set()
        self.with_rows: set[str] = set()
        self.left: dict[str, float] = {}
        self.last_commit_ok = True
        self.in_doubt: str | None = None  # why, once a commit's outcome is unknown
        self.sweep_warned_at = 0.0  # monotonic: when a failed sweep may be logged again
        self.closed = False

    @property
    def epoch(self) -> str:
        """The history of this file: drawn when it was created or migrated, kept in it."""
        return self._epoch

    async def open(self) -> None:
        """Open (or create, empty) the file, migrating one of an earlier layout.

        Raise :exc:`StoreError` with one line if the file cannot be ours.
        """
        worker = self.worker = _Worker()
        try:
            how = await worker.call(self._open_file)
            value, others, sessions = await worker.call(self._summary)
        except BaseException:
            await worker.call(self._release_file)
            worker.stop()
            raise
        self.sweeper = asyncio.create_task(self._sweeping())
        log.info(
            "state %s: value %d at /, %d other counter(s), %d session(s) (%s)",
            self.name,
            value,
            others,
            sessions,
            how,
        )

    async def load(self, room: str) -> RoomState:
        """Read the state of ``room``; one without a row is at 0, at the file's latest seq.

        From now until :meth:`release`, the sweep keeps its row. The join
        costs no write. Raise :exc:`StoreUnavailable` if the file cannot be
        read now.
        """
        # Before the read is queued: a sweep queued after it keeps what it read.
        self.loaded.add(room)
        try:
            state, has_row = await self._read(functools.partial(self._read_row, room))
        except BaseException:
            self.loaded.discard(room)
            raise
        if has_row:
            self.with_rows.add(room)
        return state

    async def peek(self, room: str) -> tuple[RoomState, int]:
        """Read the state of ``room`` as :meth:`load` does, without joining it.

        No other instance has users. Raise :exc:`StoreUnavailable` if the
        file cannot be read now.
        """
        return await self._read(functools.partial(self._read_state, room)), 0

    async def counters(self, prefix: str, after: str, limit: int) -> list[tuple[str, RoomState]]:
        """Up to ``limit`` counters by name, those starting with ``prefix``, after ``after``.

        Listed: every counter with a row, i.e. changed and not forgotten
        (whatever its value, 0 too); a counter only joined has no row. Raise
        :exc:`StoreUnavailable` if the file cannot be read now.
        """
        return await self._read(functools.partial(self._read_counters, prefix, after, limit))

    async def _read(self, function: Callable[[], _T]) -> _T:
        """Run a read on the worker thread; :exc:`StoreUnavailable` if it fails."""
        if self.in_doubt is not None or self.closed or self.worker is None:
            # Once in doubt, the server is stopping: nobody new joins it.
            raise StoreUnavailable(self.in_doubt or f"{self.name} is closed")
        try:
            return await self.worker.call(function)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read {self.name}: {exc}") from exc

    async def commit(self, changes: Sequence[Change]) -> list[Outcome]:
        """Apply ``changes`` durably, in the next group transaction; one outcome each, in order.

        Each room's change is atomic with its sessions, and the whole call is
        one transaction. Raise :exc:`StoreUnavailable` if it was rolled back
        (nothing of it counts), and :exc:`StoreInDoubt` if it failed in a way
        that may have left it on disk (and for every call after that).
        """
        if self.in_doubt is not None:
            raise StoreInDoubt(self.in_doubt)  # the store is done: only a restart can tell
        if self.closed or self.worker is None:
            raise StoreUnavailable(f"{self.name} is closed")
        if not changes:
            return []
        pending = _Pending(changes, asyncio.get_running_loop().create_future())
        self.queued.append(pending)
        if self.committer is None:
            # A task starts on the next loop turn: every commit called in
            # this one is queued by then.
            self.committer = asyncio.create_task(self._commit_queued())
        return await pending.done

    async def forget(self, room: str) -> RoomState:
        """Reset ``room`` to 0, durably, in a transaction of its own; return its new state.

        Its row goes and the state takes the next seq, so it replaces any
        shown. Its sessions are kept, as :class:`~counter_sync.store.MemoryStore`
        keeps them: a client still connected goes on with its next op. Raise
        as :meth:`commit` does.
        """
        if self.in_doubt is not None:
            raise StoreInDoubt(self.in_doubt)
        if self.closed or self.worker is None:
            raise StoreUnavailable(f"{self.name} is closed")
        try:
            state = await self.worker.call(functools.partial(self._reset, room))
        except sqlite3.Error as exc:
            raise self._failure(exc) from exc
        self.last_commit_ok = True
        self.with_rows.discard(room)
        self.left.pop(room, None)
        return state

    def release(self, room: str) -> None:
        """Nobody here is in ``room`` any more: the sweep may forget it ``forget_after`` from now.

        Writes nothing now: the time goes into the file with the next transaction.
        """
        self.loaded.discard(room)
        if room in self.with_rows:
            self.with_rows.discard(room)
            self.left[room] = time.time()

    def can_open(self, room: str) -> bool:
        return True  # the file holds any number; the hub caps the rooms in use

    def healthy(self) -> bool:
        """False from a failed commit until the next one succeeds, and for good once in doubt."""
        return self.last_commit_ok and self.in_doubt is None and not self.closed

    def watch(self, observer: Observer) -> None:
        pass  # only this process changes the file: nothing to observe

    def share_users(self, room: str, here: int) -> None:
        pass

    async def close(self) -> None:
        """Finish the queued commits, close the database and release the file.

        The caller bounds the wait: if the disk hangs, the worker thread stays
        stuck, and being a daemon it does not hold up the process's exit.
        """
        if self.closed:
            return
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        # Whoever is in a room now was in it until now: the file keeps that.
        now = time.time()
        self.left |= dict.fromkeys(self.with_rows, now)
        if self.left and self.worker is not None:
            self._request_write()
        if self.committer is not None:
            await self.committer
        if self.worker is not None:
            await self.worker.call(self._release_file)
            self.worker.stop()

    # The event loop's side of group commit.

    async def _sweeping(self) -> None:
        """Offer the worker a sweep every interval, for when no commit comes to carry one."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            self._request_write()

    def _request_write(self) -> None:
        """Make a transaction soon even if nothing is committed: a sweep, rooms left."""
        self.write_wanted = True
        if self.committer is None:
            self.committer = asyncio.create_task(self._commit_queued())

    async def _commit_queued(self) -> None:
        """Commit what is queued, one transaction at a time, until nothing is."""
        assert self.worker is not None
        try:
            while (self.queued or self.write_wanted) and self.in_doubt is None:
                batch, self.queued = self.queued, []
                self.write_wanted = False
                self.committing = batch
                changes = [change for pending in batch for change in pending.changes]
                # Leaves and sweeps ride on a transaction that writes anyway,
                # or on one of their own: never on a join's read, which takes
                # no write lock.
                loaded: frozenset[str] | None = None
                left: dict[str, float] = {}
                if not changes or any(map(_may_write, changes)):
                    left, self.left = self.left, {}
                    if time.time() >= self.next_sweep:
                        # Taken now, in the loop's order of calls: a load
                        # queued before this write has marked its room already.
                        loaded = frozenset(self.loaded)
                write = functools.partial(self._write, changes, left, loaded)
                try:
                    outcomes, more = await self.worker.call(write)
                except Exception as exc:
                    self.left = left | self.left  # not written: later leaves win
                    # An error not SQLite's was raised before COMMIT ran
                    # (write() has nothing after it), so rolled back: every
                    # caller hears it as it is.
                    failure = self._failure(exc) if isinstance(exc, sqlite3.Error) else exc
                    for pending in batch:
                        _settle(pending, failure)
                    if not batch:
                        self._sweep_failed(failure)
                else:
                    self.last_commit_ok = True
                    self.with_rows.update(
                        change.room
                        for change in changes
                        if _may_write(change) and change.room in self.loaded
                    )
                    results = iter(outcomes)
                    for pending in batch:
                        _settle(pending, [next(results) for _ in pending.changes])
                    # A full sweep: the next batch goes at once.
                    self.write_wanted |= more
                self.committing = []
            # Queued behind a commit that ended in doubt: the store is done.
            for pending in self.queued:
                _settle(pending, StoreInDoubt(self.in_doubt))
            self.queued = []
        finally:
            # Cancelled (the loop is going away): nobody waits for an answer.
            for pending in [*self.committing, *self.queued]:
                pending.done.cancel()
            self.committing = []
            self.committer = None

    def _sweep_failed(self, failure: Exception) -> None:
        """A transaction nobody waited for failed: say so, at most once per interval.

        In doubt, the next commit stops the server, as after any commit.
        """
        if not isinstance(failure, StoreUnavailable | StoreInDoubt):
            log.error("state %s: sweep failed", self.name, exc_info=failure)
            return
        now = time.monotonic()
        if now >= self.sweep_warned_at:
            self.sweep_warned_at = now + LOG_INTERVAL
            log.warning("state %s: sweep not done: %s", self.name, failure)

    def _failure(self, exc: sqlite3.Error) -> StoreUnavailable | StoreInDoubt:
        """What a failed transaction means: certainly not applied, or in doubt for good."""
        code = getattr(exc, "sqlite_errorname", None) or "no SQLite error code"
        if code.startswith(_KNOWN_ROLLBACKS):
            self.last_commit_ok = False
            return StoreUnavailable(f"cannot commit to {self.name}: {exc}")
        self.in_doubt = (
            f"--state {self.name}: a commit failed ({one_line(str(exc))}, {code}) "
            "and may or may not be on disk"
        )
        return StoreInDoubt(self.in_doubt)

    # The worker thread's side.

    def _open_file(self) -> str:
        """Check, lock, then open the file; say whether it was created or loaded."""
        _check_path(self.path, self.name)
        self.lock = _hold_exclusively(self.path, self.name)
        try:
            # Only once the header says the file is ours (or empty) may SQLite
            # open it: opening can write, e.g. to roll back a hot journal.
            _check_header(self.lock, self.name)
            self.connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            return self._prepare(self.connection)
        except sqlite3.Error as exc:
            raise StoreError(_describe(exc, self.name)) from exc

    def _prepare(self, connection: sqlite3.Connection) -> str:
        connection.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
        connection.execute("PRAGMA fullfsync = ON")  # macOS: plain fsync stops at the drive cache
        # An empty file, or one whose creation was cut short (SQLite rolls
        # back its hot journal right here), gets the schema.
        how = "loaded"
        if connection.execute("PRAGMA page_count").fetchone()[0] == 0:
            self._create_schema(connection)
            how = "new file"
        else:
            version = _check_schema(connection, self.name)
            # Before any write: a refused file is left as it was.
            _check_range(connection, version, self.name)
            if version != SCHEMA_VERSION:
                self._migrate(connection, version)  # which logs its own line
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"--state {self.name}: SQLite cannot use WAL mode here ({mode})")
        self._epoch, meta_seq = connection.execute("SELECT epoch, seq FROM meta").fetchone()
        # A row's seq is never above meta's (they change together), unless
        # someone edited the file: go on above both, so no room goes back.
        (highest,) = connection.execute("SELECT coalesce(max(seq), 0) FROM counter").fetchone()
        self.seq = max(int(meta_seq), int(highest))
        return how

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        # Still in rollback-journal mode: this transaction lands in the main
        # file itself, so the application id is in its header from now on,
        # even if the process dies before the first WAL checkpoint.
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._create_tables(connection)
        connection.execute("COMMIT")
        # The new file's directory entry must be durable too; SQLite syncs the
        # directory for its journals, not for the database file we created.
        _fsync_directory(self.path.absolute().parent)

    def _create_tables(self, connection: sqlite3.Connection) -> None:
        """The tables of this layout and a new history, inside the caller's transaction."""
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.execute("INSERT INTO meta (id, epoch, seq) VALUES (0, ?, 0)", (new_epoch(),))
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate(self, connection: sqlite3.Connection, version: int) -> None:
        """Move the counters of schema 1 or 2 into this layout, in one transaction.

        Every value is kept, at seq 0 of a new epoch (the old layouts had no
        versions), and no session is known yet. The version number is in the
        same transaction, so a crash leaves either the old layout, migrated
        again at the next start, or the new one.
        """
        with _transaction(connection):
            rows = connection.execute(_COUNTERS_BY_VERSION[version]).fetchall()
            connection.execute("DROP TABLE counter")
            self._create_tables(connection)
            # A counter at 0 reads the same without a row. The others count
            # as used now: the old layouts did not say when.
            now = time.time()
            connection.executemany(
                "INSERT INTO counter (name, value, seq, used) VALUES (?, ?, 0, ?)",
                [(name, value, now) for name, value in rows if value != 0],
            )
        if version == _SINGLE_COUNTER_VERSION:
            ((_, value),) = rows
            kept = f"/ keeps its value {value}"
        else:
            kept = f"{sum(value != 0 for _, value in rows)} counter(s) keep their values"
        log.info(
            "state %s: migrated from schema %d to schema %d (versions and sessions); %s",
            self.name,
            version,
            SCHEMA_VERSION,
            kept,
        )

    def _summary(self) -> tuple[int, int, int]:
        """The value at ``/``, how many other counters and sessions the file holds, for the log."""
        connection = self._open_connection()
        (others,) = connection.execute(
            "SELECT count(*) FROM counter WHERE name != ?", (DEFAULT_ROOM,)
        ).fetchone()
        (sessions,) = connection.execute("SELECT count(*) FROM session").fetchone()
        return self._read_state(DEFAULT_ROOM).value, int(others), int(sessions)

    def _read_state(self, room: str, latest: int | None = None) -> RoomState:
        """The state of ``room``; without a row, 0 at ``latest`` (the last seq handed out)."""
        return self._read_row(room, latest)[0]

    def _read_row(self, room: str, latest: int | None = None) -> tuple[RoomState, bool]:
        """The state of ``room``, as :meth:`_read_state`, and whether it has a row."""
        connection = self._open_connection()
        row = connection.execute(
            "SELECT value, seq FROM counter WHERE name = ?", (room,)
        ).fetchone()
        if row is None:  # at 0: as new as anything the file holds
            return RoomState(0, self.seq if latest is None else latest, self._epoch), False
        return RoomState(int(row[0]), int(row[1]), self._epoch), True

    def _write(
        self, changes: list[Change], left: dict[str, float], loaded: frozenset[str] | None
    ) -> tuple[list[Outcome], bool]:
        """Apply every change in one transaction, with the rooms ``left`` and maybe a sweep.

        ``loaded``: the rooms someone is in here, which the sweep keeps, if
        this transaction is to sweep (None if not). Return the outcomes once
        it is committed, and whether the sweep found more than it may delete
        at once (so another should follow).
        """
        connection = self._open_connection()
        now = time.time()
        # A transaction that only reads (sessions that joined) needs no write
        # lock, so an operator's write in a sqlite3 shell does not hold up
        # joins: the caller offers a sweep only to one that writes, or to
        # one of its own, which is taken only if there is something to delete.
        writes = bool(left) or any(map(_may_write, changes))
        sweep = loaded is not None and (writes or self._anything_stale(connection, now))
        if loaded is not None and not sweep:
            self.next_sweep = now + self.sweep_interval  # nothing to do: look again later
        if not (changes or writes or sweep):
            return [], False
        seq = self.seq
        with _transaction(connection, "BEGIN IMMEDIATE" if writes or sweep else "BEGIN"):
            outcomes = []
            for change in changes:
                outcome = self._apply(connection, change, seq, now)
                seq = max(seq, outcome.state.seq)
                outcomes.append(outcome)
            connection.executemany(_TOUCH, [(when, room) for room, when in left.items()])
            full = False
            if loaded is not None and sweep:
                full, forgotten = self._sweep(connection, now, loaded)
                if forgotten:
                    seq += 1  # a forgotten room reads as 0 at the latest seq: past its own
            if seq != self.seq:
                connection.execute("UPDATE meta SET seq = ?", (seq,))
        self.seq = seq
        if sweep:
            # Caught up: wait a period. A full batch: the next transaction goes on.
            self.next_sweep = now if full else now + self.sweep_interval
        return outcomes, full

    def _apply(
        self, connection: sqlite3.Connection, change: Change, seq: int, now: float
    ) -> Outcome:
        """Apply one room's change inside the open transaction, as :class:`MemoryStore` does.

        ``seq`` is the last one handed out so far; a change of the value takes the next.
        """
        room = change.room
        state = self._read_state(room, seq)
        value, applied, done = apply_change(
            change, state.value, lambda session: self._last_done(connection, room, session)
        )
        if value != state.value:
            state = RoomState(value, seq + 1, self._epoch)
            # Back at 0 too: it is a counter someone uses, listed until forgotten.
            connection.execute(_SET_COUNTER, (room, state.value, state.seq, now))
        for session, (before, after) in done.items():
            if after != before:
                connection.execute(_SET_DONE, (room, session, after, now))
        return Outcome(state, applied, done)

    def _read_counters(self, prefix: str, after: str, limit: int) -> list[tuple[str, RoomState]]:
        connection = self._open_connection()
        query = "SELECT name, value, seq FROM counter WHERE name > ?"
        bounds: tuple[str, ...] = (after,)
        if prefix:
            # Room names are ASCII below DEL, so every name starting with
            # prefix sorts before prefix + DEL: the scan stops there.
            query += " AND name >= ? AND name < ?"
            bounds += (prefix, prefix + "\x7f")
        rows = connection.execute(f"{query} ORDER BY name LIMIT ?", (*bounds, limit)).fetchall()
        return [(name, RoomState(value, seq, self._epoch)) for name, value, seq in rows]

    def _reset(self, room: str) -> RoomState:
        """Delete ``room``'s row and give it the next seq, in one transaction."""
        connection = self._open_connection()
        seq = self.seq + 1
        with _transaction(connection):
            connection.execute("DELETE FROM counter WHERE name = ?", (room,))
            connection.execute("UPDATE meta SET seq = ?", (seq,))
        self.seq = seq
        return RoomState(0, seq, self._epoch)

    def _last_done(self, connection: sqlite3.Connection, room: str, session: str) -> int:
        row = connection.execute(
            "SELECT done FROM session WHERE room = ? AND session = ?", (room, session)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _anything_stale(self, connection: sqlite3.Connection, now: float) -> bool:
        """Whether a sweep would find a session or a counter to look at."""
        limits = (now - self.session_ttl, now - self.forget_after)
        return bool(connection.execute(_ANY_STALE, limits).fetchone()[0])

    def _sweep(
        self, connection: sqlite3.Connection, now: float, loaded: frozenset[str]
    ) -> tuple[bool, int]:
        """Forget the sessions and counters unused for too long, a bounded number of each.

        A counter of a room ``loaded`` (someone is in it) is marked used now
        instead. Return whether a batch was full, and how many counters went.
        """
        cursor = connection.execute(_SWEEP_SESSIONS, (now - self.session_ttl, SWEEP_LIMIT))
        sessions = cursor.rowcount
        stale = [
            name
            for (name,) in connection.execute(
                _STALE_COUNTERS, (now - self.forget_after, SWEEP_LIMIT)
            ).fetchall()
        ]
        kept = [(now, name) for name in stale if name in loaded]
        gone = [(name,) for name in stale if name not in loaded]
        connection.executemany("UPDATE counter SET used = ? WHERE name = ?", kept)
        connection.executemany("DELETE FROM counter WHERE name = ?", gone)
        return max(sessions, len(stale)) >= SWEEP_LIMIT, len(gone)

    def _open_connection(self) -> sqlite3.Connection:
        if self.connection is None:
            raise sqlite3.ProgrammingError("the store is not open")
        return self.connection

    def _release_file(self) -> None:
        if self.connection is not None:
            try:
                # The last connection to close checkpoints the WAL into the file.
                self.connection.close()
            except sqlite3.Error as exc:
                # Every commit is already durable in the WAL; the next start
                # replays it.
                log.warning("state %s: not closed cleanly: %s", self.name, exc)
            self.connection = None
        if self.lock is not None:
            os.close(self.lock)  # drops the flock with it
            self.lock = None


class _Worker:
    """One daemon thread that makes every call of the store, one at a time, in order.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so
    a commit stuck in fsync would keep a stopped server from ever exiting.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="sqlite-store", daemon=True)
        self.thread.start()

    async def call(self, function: Callable[[], _T]) -> _T:
        """Run ``function()`` on the thread; return what it returns, or raise what it raises."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # its caller stopped waiting before it started
            try:
                result = function()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        self.calls.put(run)
        # wrap_future hands the result to the loop, and drops it if the loop is closed.
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        """Let the thread end after the calls already queued."""
        self.calls.put(None)

    def run(self) -> None:
        while (call := self.calls.get()) is not None:
            call()


def _may_write(change: Change) -> bool:
    """Whether a change may write (a value, or an op); lookups only read."""
    return bool(change.delta or change.ops or change.set_to is not None)


def _settle(pending: _Pending, outcome: list[Outcome] | Exception) -> None:
    """Give one ``commit`` its answer, unless its caller stopped waiting."""
    if pending.done.done():
        return
    if isinstance(outcome, Exception):
        pending.done.set_exception(outcome)
    else:
        pending.done.set_result(outcome)


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """A transaction around the block: committed if it returns, rolled back if it raises."""
    connection.execute(begin)
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise


def _rollback(connection: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after most errors (disk full, I/O). The
    # error that got us here is the one to report; a failed ROLLBACK after it
    # adds nothing (what never committed is discarded at the next start).
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _check_path(path: Path, name: str) -> None:
    """Refuse, before touching anything, a path SQLite could not keep the counters in."""
    try:
        info: os.stat_result | None = path.stat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise StoreError(f"--state {name}: {exc.strerror}") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            suggestion = path / "counter.sqlite"
            raise StoreError(f"--state {name}: is a directory; give a file, e.g. {suggestion}")
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"--state {name}: is not a regular file")
        if not _writable(path, info):
            raise StoreError(f"--state {name}: the file is read-only")
    directory = path.absolute().parent
    try:
        directory_info = directory.stat()
    except FileNotFoundError:
        raise StoreError(f"--state {name}: directory {directory} does not exist") from None
    except OSError as exc:
        raise StoreError(f"--state {name}: directory {directory}: {exc.strerror}") from None
    if not _writable(directory, directory_info):
        raise StoreError(
            f"--state {name}: directory {directory} is read-only "
            f"(SQLite creates {path.name}-wal and {path.name}-shm next to the file)"
        )


def _writable(path: Path, info: os.stat_result) -> bool:
    # root passes every access check, so the write bits count too: whoever
    # made a file or directory read-only (chmod a-w) meant it.
    return os.access(path, os.W_OK) and info.st_mode & 0o222 != 0


def _hold_exclusively(path: Path, name: str) -> int:
    """Open (creating it empty if missing) and flock the database file itself.

    The lock lives on the file the counters live in, not on a sidecar: there is
    no second file to create next to someone else's data or to clean up, and
    unlinking a lock file races with the next server. The kernel drops a flock
    when its process dies, even by kill -9, so a crash leaves no stale lock.
    On a local file system flock() is separate from the fcntl() locks SQLite
    takes, so it does not get in SQLite's way (a sqlite3 shell can still read
    the file while the server runs).
    """
    try:
        # Read-only suffices for flock, and this descriptor never writes.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"--state {name}: cannot open: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"--state {name}: in use by another running server") from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"--state {name}: cannot lock: {exc.strerror}") from None
    return fd


def _check_header(fd: int, name: str) -> None:
    """Accept an empty file or a counter-sync database, by reading its header only."""
    if os.fstat(fd).st_size == 0:
        return
    header = os.pread(fd, _HEADER_SIZE, 0)
    if len(header) < _HEADER_SIZE or not header.startswith(_SQLITE_MAGIC):
        raise StoreError(f"--state {name}: not a SQLite database; refusing to touch it")
    offset = _APPLICATION_ID_OFFSET
    application_id = int.from_bytes(header[offset : offset + 4], "big")
    if application_id != APPLICATION_ID:
        raise StoreError(
            f"--state {name}: a SQLite database but not a counter-sync one "
            f"(application_id {application_id:#x}); refusing to touch it"
        )


def _check_schema(connection: sqlite3.Connection, name: str) -> int:
    """Check that our own file is whole and in a layout this code knows; return its version."""
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version not in _TABLES_BY_VERSION:
        known = ", ".join(str(each) for each in sorted(_TABLES_BY_VERSION))
        raise StoreError(f"--state {name}: schema version {version}; this server knows {known}")
    for table, expected in _TABLES_BY_VERSION[version].items():
        columns = [
            row[0] for row in connection.execute("SELECT name FROM pragma_table_info(?)", (table,))
        ]
        if columns != expected:
            raise StoreError(
                f"--state {name}: marked as counter-sync schema {version} "
                f"but its {table} table is missing or not in that layout"
            )
    # Schema 1 always had its one row, and this layout its meta row: without
    # them there is nothing to migrate, or no history to go on with.
    row_check = {
        _SINGLE_COUNTER_VERSION: "SELECT 1 FROM counter WHERE id = 0",
        SCHEMA_VERSION: "SELECT 1 FROM meta WHERE id = 0 AND typeof(epoch) = 'text'",
    }.get(version)
    if row_check is not None and connection.execute(row_check).fetchone() is None:
        table = "counter" if version == _SINGLE_COUNTER_VERSION else "meta"
        raise StoreError(f"--state {name}: marked as counter-sync but its {table} row is missing")
    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        if all(problem.startswith("CHECK constraint failed") for problem in problems):
            # Whole, but a value was edited past the schema's CHECK: say which.
            _check_range(connection, version, name)
        raise StoreError(f"--state {name}: the database is corrupt ({one_line(problems[0])})")
    return version


def _check_range(connection: sqlite3.Connection, version: int, name: str) -> None:
    """Refuse a file holding a value no client could be shown exactly (say, edited by hand)."""
    row = connection.execute(
        f"SELECT name, value FROM ({_COUNTERS_BY_VERSION[version]}) "
        "WHERE typeof(value) != 'integer' OR value NOT BETWEEN ? AND ? LIMIT 1",
        (-MAX_VALUE, MAX_VALUE),
    ).fetchone()
    if row is not None:
        room, value = row
        raise StoreError(
            f"--state {name}: counter {room!r} holds {value!r}, beyond ±{MAX_VALUE}; "
            "refusing to touch it"
        )


def _describe(exc: sqlite3.Error, name: str) -> str:
    """One line for the operator about an error SQLite raised at start-up."""
    code = getattr(exc, "sqlite_errorname", None) or ""
    if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return f"--state {name}: the database is corrupt ({one_line(str(exc))})"
    return f"--state {name}: cannot open the database ({one_line(str(exc))})"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
