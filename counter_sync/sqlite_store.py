"""Keep the counters in a SQLite file so they survive restarts: ``--state PATH``.

One file holds every counter, one row per room (``"/"`` and each named
counter); a room that has never changed, or is back at 0, has no row and
reads as 0. What the store promises, in the order a change goes through it:

* Write-ahead. :meth:`SqliteStore.add` returns only after its transaction is
  committed with ``synchronous=FULL`` (the WAL is fsynced), and the hub
  broadcasts a value only after ``add`` returned it. A value anyone was shown
  is on disk.
* Group commit, across rooms. Each room's flush calls ``add`` with the net
  change of every action gathered since its previous one. The adds of every
  room that flushes in the same event-loop turn, or while a commit waits for
  the disk, go into one transaction: one fsync for all of them.
* Off the event loop. A commit blocks in fsync, and a sqlite3 connection
  belongs to the thread that opened it, so one worker thread owns the
  connection and makes every SQLite call; the loop only awaits it.
* Honest failures. A commit SQLite certainly rolled back (disk full, database
  locked) raises :exc:`~counter_sync.store.StoreUnavailable`: nothing of it
  counts, and the store carries on. Any other failure of a commit (an I/O
  error, say fsync returning EIO) may have left it on disk, so it raises
  :exc:`~counter_sync.store.StoreInDoubt`, and so does every later ``add``:
  only a restart, which reads the file afresh, can tell what it holds.

At start-up the file is checked before SQLite may write to it: a file that is
not a counter-sync database, is corrupt, read-only, held by another server, or
holds a value beyond ±MAX_VALUE is refused with one line for the operator
(:exc:`~counter_sync.store.StoreError`) and left as it was. A file of the
single-counter version (schema 1) is migrated in one transaction: its value
becomes the counter at ``/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import sqlite3
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from counter_sync.config import MAX_VALUE
from counter_sync.store import (
    DEFAULT_ROOM,
    Observer,
    OutOfRange,
    StoreError,
    StoreInDoubt,
    StoreUnavailable,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger("counter-sync")

# "CSYN" in the database header: four bytes at a fixed offset tell a foreign
# SQLite file from ours without letting SQLite open it (and maybe write to it).
APPLICATION_ID = 0x4353594E
SCHEMA_VERSION = 2  # PRAGMA user_version for the layout below
SINGLE_COUNTER_VERSION = 1  # the layout before rooms: one row, id 0
# Seconds a commit waits for another process's write lock (say, an operator's
# sqlite3 shell) before the flush fails with StoreUnavailable.
BUSY_TIMEOUT = 5.0

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
APPLICATION_ID_OFFSET = 68
# One row per counter that is not 0. The CHECK is the range rule itself: a
# change that would leave ±MAX_VALUE fails its statement, not the whole
# transaction, so the other rooms' changes in it still commit. WITHOUT ROWID:
# the name is the key, so the table is one b-tree instead of two.
SCHEMA = f"""
CREATE TABLE counter (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
        CHECK (typeof(value) = 'integer' AND value BETWEEN -{MAX_VALUE} AND {MAX_VALUE})
) WITHOUT ROWID
"""
# The rows of each layout as (name, value), for the checks before migrating.
COUNTERS_BY_VERSION = {
    SINGLE_COUNTER_VERSION: f"SELECT '{DEFAULT_ROOM}' AS name, value FROM counter WHERE id = 0",
    SCHEMA_VERSION: "SELECT name, value FROM counter",
}
ADD = """
INSERT INTO counter (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = value + excluded.value
RETURNING value
"""
# Errors after which SQLite has certainly rolled the transaction back: it
# could not write the WAL (disk full) or never got the write lock.
KNOWN_ROLLBACKS = ("SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED")


@dataclasses.dataclass
class Change:
    """One room's ``add``, waiting for the transaction that carries it."""

    room: str
    delta: int
    done: asyncio.Future[int]


class SqliteStore:
    """Every counter in one SQLite file, in WAL mode, held by this process alone."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)  # as the operator wrote it, for messages
        # One thread: it owns the connection and runs the calls one at a time.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        # Touched on the worker thread only.
        self.connection: sqlite3.Connection | None = None
        self.lock: int | None = None  # descriptor of the file, holding the flock
        # Touched on the event loop only.
        self.queued: list[Change] = []  # for the next transaction
        self.committer: asyncio.Task[None] | None = None
        self.last_commit_ok = True
        self.in_doubt: str | None = None  # why, once a commit's outcome is unknown
        self.closed = False

    async def open(self) -> None:
        """Open (or create, empty) the file, migrating a single-counter one.

        Raise :exc:`StoreError` with one line if the file cannot be ours.
        """
        loop = asyncio.get_running_loop()
        try:
            how = await loop.run_in_executor(self.worker, self.open_file)
            value, others = await loop.run_in_executor(self.worker, self.summary)
        except BaseException:
            await loop.run_in_executor(self.worker, self.release_file)
            self.worker.shutdown()
            raise
        log.info("state %s: value %d at /, %d other counter(s) (%s)", self.name, value, others, how)

    async def load(self, room: str) -> int:
        """Read the value of ``room``; a room without a row is at 0 and gets none."""
        if self.in_doubt is not None or self.closed:
            # Once in doubt, the server is stopping: nobody new joins it.
            raise StoreUnavailable(self.in_doubt or f"{self.name} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.worker, self.read_value, room)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read {self.name}: {exc}") from exc

    def release(self, room: str) -> None:
        pass  # nothing is kept per room outside the file

    def has_room_for(self, room: str) -> bool:
        return True  # the file holds any number; the hub caps the rooms in use

    async def add(self, room: str, delta: int) -> int:
        """Commit ``delta`` to ``room`` durably, in the next group transaction.

        Return the room's new value. Raise :exc:`OutOfRange` if the change would
        take it beyond ±MAX_VALUE (not applied), :exc:`StoreUnavailable` if the
        transaction was rolled back (nothing of it is counted), and
        :exc:`StoreInDoubt` if it failed in a way that may have left it on disk.
        """
        if self.in_doubt is not None:
            raise StoreInDoubt(self.in_doubt)  # the store is done: only a restart can tell
        if self.closed:
            raise StoreUnavailable(f"{self.name} is closed")
        if abs(delta) > 2 * MAX_VALUE:
            # No value in range can absorb it, and past 2**63 sqlite3 could not
            # even bind it: it would fail the whole batch, not this change.
            raise OutOfRange
        change = Change(room, delta, asyncio.get_running_loop().create_future())
        self.queued.append(change)
        if self.committer is None:
            # A task starts on the next loop turn: every room flushing in this
            # one has queued its change by then.
            self.committer = asyncio.create_task(self.commit_queued())
        return await change.done

    def healthy(self) -> bool:
        """False from a failed commit until the next one succeeds, and for good once in doubt."""
        return self.last_commit_ok and self.in_doubt is None and not self.closed

    def watch(self, observer: Observer) -> None:
        pass  # only this process changes the file: nothing to observe

    def share_users(self, room: str, here: int) -> None:
        pass

    async def close(self) -> None:
        """Finish the queued commits, close the database and release the file."""
        if self.closed:
            return
        self.closed = True
        if self.committer is not None:
            await self.committer
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.worker, self.release_file)
        self.worker.shutdown()

    # The event loop's side of group commit.

    async def commit_queued(self) -> None:
        """Commit what is queued, one transaction at a time, until nothing is."""
        loop = asyncio.get_running_loop()
        batch: list[Change] = []
        try:
            while self.queued and self.in_doubt is None:
                batch, self.queued = self.queued, []
                changes = [(change.room, change.delta) for change in batch]
                try:
                    values = await loop.run_in_executor(self.worker, self.commit, changes)
                except sqlite3.Error as exc:
                    self.fail(batch, exc)
                except Exception as exc:
                    # Not SQLite's: raised before COMMIT ran (commit() has
                    # nothing after it), so rolled back. Every caller hears it.
                    for change in batch:
                        settle(change, exc)
                else:
                    self.last_commit_ok = True
                    for change, value in zip(batch, values, strict=True):
                        settle(change, OutOfRange() if value is None else value)
                batch = []
            # Queued behind a commit that ended in doubt: the store is done.
            for change in self.queued:
                settle(change, StoreInDoubt(self.in_doubt))
            self.queued = []
        finally:
            # Cancelled (the loop is going away): nobody waits for an answer.
            for change in [*batch, *self.queued]:
                change.done.cancel()
            self.committer = None

    def fail(self, batch: list[Change], exc: sqlite3.Error) -> None:
        """Tell every change of a failed transaction whether it certainly did not apply."""
        code = getattr(exc, "sqlite_errorname", None) or "no SQLite error code"
        if code.startswith(KNOWN_ROLLBACKS):
            self.last_commit_ok = False
            reason = f"cannot commit to {self.name}: {exc}"
            for change in batch:
                settle(change, StoreUnavailable(reason))
            return
        self.in_doubt = (
            f"--state {self.name}: a commit failed ({one_line(str(exc))}, {code}) "
            "and may or may not be on disk"
        )
        for change in batch:
            settle(change, StoreInDoubt(self.in_doubt))

    # The worker thread's side.

    def open_file(self) -> str:
        """Check, lock, then open the file; say whether it was created or loaded."""
        check_path(self.path, self.name)
        self.lock = hold_exclusively(self.path, self.name)
        try:
            # Only once the header says the file is ours (or empty) may SQLite
            # open it: opening can write, e.g. to roll back a hot journal.
            check_header(self.lock, self.name)
            self.connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            return self.prepare(self.connection)
        except sqlite3.Error as exc:
            raise StoreError(describe(exc, self.name)) from exc

    def prepare(self, connection: sqlite3.Connection) -> str:
        connection.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
        connection.execute("PRAGMA fullfsync = ON")  # macOS: plain fsync stops at the drive cache
        # An empty file, or one whose creation was cut short (SQLite rolls
        # back its hot journal right here), gets the schema.
        how = "loaded"
        if connection.execute("PRAGMA page_count").fetchone()[0] == 0:
            self.create_schema(connection)
            how = "new file"
        else:
            version = check_schema(connection, self.name)
            # Before any write: a refused file is left as it was.
            check_range(connection, version, self.name)
            if version == SINGLE_COUNTER_VERSION:
                self.migrate(connection)  # which logs its own line
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"--state {self.name}: SQLite cannot use WAL mode here ({mode})")
        return how

    def create_schema(self, connection: sqlite3.Connection) -> None:
        # Still in rollback-journal mode: this transaction lands in the main
        # file itself, so the application id is in its header from now on,
        # even if the process dies before the first WAL checkpoint.
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute(SCHEMA)
        connection.execute("COMMIT")
        # The new file's directory entry must be durable too; SQLite syncs the
        # directory for its journals, not for the database file we created.
        fsync_directory(self.path.absolute().parent)

    def migrate(self, connection: sqlite3.Connection) -> None:
        """Turn the single counter of schema 1 into the row of ``/``, in one transaction.

        The version number is in the same transaction, so a crash leaves
        either the old layout, migrated again at the next start, or the new one.
        """
        try:
            connection.execute("BEGIN IMMEDIATE")
            (value,) = connection.execute("SELECT value FROM counter WHERE id = 0").fetchone()
            connection.execute("ALTER TABLE counter RENAME TO single_counter")
            connection.execute(SCHEMA)
            if value != 0:  # 0 has no row, as for every counter
                connection.execute(
                    "INSERT INTO counter (name, value) VALUES (?, ?)", (DEFAULT_ROOM, value)
                )
            connection.execute("DROP TABLE single_counter")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            rollback(connection)
            raise
        log.info(
            "state %s: migrated from one counter (schema %d) to named counters (schema %d); "
            "/ keeps its value %d",
            self.name,
            SINGLE_COUNTER_VERSION,
            SCHEMA_VERSION,
            value,
        )

    def summary(self) -> tuple[int, int]:
        """The value at ``/`` and how many other counters the file holds, for the log."""
        connection = self.open_connection()
        (others,) = connection.execute(
            "SELECT count(*) FROM counter WHERE name != ?", (DEFAULT_ROOM,)
        ).fetchone()
        return self.read_value(DEFAULT_ROOM), int(others)

    def read_value(self, room: str) -> int:
        connection = self.open_connection()
        row = connection.execute("SELECT value FROM counter WHERE name = ?", (room,)).fetchone()
        return 0 if row is None else int(row[0])

    def commit(self, changes: list[tuple[str, int]]) -> list[int | None]:
        """Apply every change in one transaction; the new values, None where out of range."""
        connection = self.open_connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            values = [self.apply(connection, room, delta) for room, delta in changes]
            connection.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after most errors (disk full, I/O).
            rollback(connection)
            raise
        return values

    def apply(self, connection: sqlite3.Connection, room: str, delta: int) -> int | None:
        """Add ``delta`` to ``room`` inside the open transaction; None if out of range."""
        try:
            ((value,),) = connection.execute(ADD, (room, delta)).fetchall()
        except sqlite3.IntegrityError:
            # The CHECK failed: SQLite undid this statement alone, and the
            # transaction goes on with the other rooms' changes.
            return None
        if value == 0:  # a counter back at 0 takes no room in the file
            connection.execute("DELETE FROM counter WHERE name = ?", (room,))
        return int(value)

    def open_connection(self) -> sqlite3.Connection:
        if self.connection is None:
            raise sqlite3.ProgrammingError("the store is not open")
        return self.connection

    def release_file(self) -> None:
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


def settle(change: Change, outcome: int | Exception | None) -> None:
    """Give one ``add`` its answer, unless its caller stopped waiting."""
    if change.done.done():
        return
    if outcome is None:
        change.done.set_exception(OutOfRange())
    elif isinstance(outcome, Exception):
        change.done.set_exception(outcome)
    else:
        change.done.set_result(outcome)


def rollback(connection: sqlite3.Connection) -> None:
    # The error that got us here is the one to report; a failed ROLLBACK after
    # it adds nothing (what never committed is discarded at the next start).
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def check_path(path: Path, name: str) -> None:
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
        if not writable(path, info):
            raise StoreError(f"--state {name}: the file is read-only")
    directory = path.absolute().parent
    try:
        directory_info = directory.stat()
    except FileNotFoundError:
        raise StoreError(f"--state {name}: directory {directory} does not exist") from None
    except OSError as exc:
        raise StoreError(f"--state {name}: directory {directory}: {exc.strerror}") from None
    if not writable(directory, directory_info):
        raise StoreError(
            f"--state {name}: directory {directory} is read-only "
            f"(SQLite creates {path.name}-wal and {path.name}-shm next to the file)"
        )


def writable(path: Path, info: os.stat_result) -> bool:
    # root passes every access check, so the write bits count too: whoever
    # made a file or directory read-only (chmod a-w) meant it.
    return os.access(path, os.W_OK) and info.st_mode & 0o222 != 0


def hold_exclusively(path: Path, name: str) -> int:
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


def check_header(fd: int, name: str) -> None:
    """Accept an empty file or a counter-sync database, by reading its header only."""
    if os.fstat(fd).st_size == 0:
        return
    header = os.pread(fd, HEADER_SIZE, 0)
    if len(header) < HEADER_SIZE or not header.startswith(SQLITE_MAGIC):
        raise StoreError(f"--state {name}: not a SQLite database; refusing to touch it")
    offset = APPLICATION_ID_OFFSET
    application_id = int.from_bytes(header[offset : offset + 4], "big")
    if application_id != APPLICATION_ID:
        raise StoreError(
            f"--state {name}: a SQLite database but not a counter-sync one "
            f"(application_id {application_id:#x}); refusing to touch it"
        )


def check_schema(connection: sqlite3.Connection, name: str) -> int:
    """Check that our own file is whole and in a layout this code knows; return its version."""
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version not in COUNTERS_BY_VERSION:
        raise StoreError(
            f"--state {name}: schema version {version}; this server knows "
            f"{SINGLE_COUNTER_VERSION} and {SCHEMA_VERSION}"
        )
    columns = [
        row[0] for row in connection.execute("SELECT name FROM pragma_table_info('counter')")
    ]
    expected = ["id", "value"] if version == SINGLE_COUNTER_VERSION else ["name", "value"]
    # Schema 1 always had its one row; without it there is nothing to migrate.
    if columns != expected or (
        version == SINGLE_COUNTER_VERSION
        and connection.execute("SELECT 1 FROM counter WHERE id = 0").fetchone() is None
    ):
        raise StoreError(f"--state {name}: marked as counter-sync but holds no counter table")
    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        if all(problem.startswith("CHECK constraint failed") for problem in problems):
            # Whole, but a value was edited past the schema's CHECK: say which.
            check_range(connection, version, name)
        raise StoreError(f"--state {name}: the database is corrupt ({one_line(problems[0])})")
    return version


def check_range(connection: sqlite3.Connection, version: int, name: str) -> None:
    """Refuse a file holding a value no client could be shown exactly (say, edited by hand)."""
    row = connection.execute(
        f"SELECT name, value FROM ({COUNTERS_BY_VERSION[version]}) "
        "WHERE typeof(value) != 'integer' OR value NOT BETWEEN ? AND ? LIMIT 1",
        (-MAX_VALUE, MAX_VALUE),
    ).fetchone()
    if row is not None:
        room, value = row
        raise StoreError(
            f"--state {name}: counter {room!r} holds {value!r}, beyond ±{MAX_VALUE}; "
            "refusing to touch it"
        )


def describe(exc: sqlite3.Error, name: str) -> str:
    """One line for the operator about an error SQLite raised at start-up."""
    code = getattr(exc, "sqlite_errorname", None) or ""
    if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return f"--state {name}: the database is corrupt ({one_line(str(exc))})"
    return f"--state {name}: cannot open the database ({one_line(str(exc))})"


def one_line(text: str) -> str:
    # SQLite's reports can span lines (quick_check does); main() prints one.
    return " ".join(text.split())


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
