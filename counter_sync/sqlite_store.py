"""Keep the counter in a SQLite file so it survives restarts: ``--state PATH``.

What the store promises, in the order a change goes through it:

* Write-ahead. :meth:`SqliteStore.add` returns only after its transaction is
  committed with ``synchronous=FULL`` (the WAL is fsynced), and the hub
  broadcasts a value only after ``add`` returned it. A value anyone was shown
  is on disk.
* Group commit. The hub calls ``add`` once per flush with the net change of
  every action gathered since the previous one; while a commit waits for the
  disk, new actions gather for the next. One fsync covers many actions.
* Off the event loop. A commit blocks in fsync, and a sqlite3 connection
  belongs to the thread that opened it, so one worker thread owns the
  connection and makes every SQLite call; the loop only awaits it.

At start-up the file is checked before SQLite may write to it: a file that is
not a counter-sync database, is corrupt, read-only, or held by another server
is refused with one line for the operator (:exc:`counter_sync.store.StoreError`) and left
as it was.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from counter_sync.store import DEFAULT_ROOM, Observer, StoreError, StoreUnavailable

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger("counter-sync")

# "CSYN" in the database header: four bytes at a fixed offset tell a foreign
# SQLite file from ours without letting SQLite open it (and maybe write to it).
APPLICATION_ID = 0x4353594E
SCHEMA_VERSION = 1  # PRAGMA user_version for the layout below
# Seconds a commit waits for another process's write lock (say, an operator's
# sqlite3 shell) before the flush fails with StoreUnavailable.
BUSY_TIMEOUT = 5.0

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
APPLICATION_ID_OFFSET = 68
# One row. Past 2**63 SQLite would turn the value into an inexact REAL; the
# CHECK makes that commit fail instead.
SCHEMA = """
CREATE TABLE counter (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    value INTEGER NOT NULL CHECK (typeof(value) = 'integer')
)
"""


class SqliteStore:
    """The counter in one SQLite file, in WAL mode, held by this process alone."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)  # as the operator wrote it, for messages
        # One thread: it owns the connection and runs the calls one at a time.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        # Touched on the worker thread only.
        self.connection: sqlite3.Connection | None = None
        self.lock: int | None = None  # descriptor of the file, holding the flock
        self.last_commit_ok = True
        self.closed = False
        self.value = 0

    async def open(self) -> None:
        """Open (or create, with value 0) the file and read the stored value.

        Raise :exc:`StoreError` with one line if the file cannot be ours.
        """
        loop = asyncio.get_running_loop()
        try:
            value, created = await loop.run_in_executor(self.worker, self.open_file)
        except BaseException:
            self.worker.shutdown()
            raise
        log.info("state %s: value %d (%s)", self.name, value, "new file" if created else "loaded")
        self.value = value

    async def load(self, room: str) -> int:
        if room != DEFAULT_ROOM:
            raise StoreUnavailable("named counters are not kept in --state files yet")
        return self.value

    def release(self, room: str) -> None:
        pass

    def has_room_for(self, room: str) -> bool:
        return room == DEFAULT_ROOM

    async def add(self, room: str, delta: int) -> int:
        """Commit ``delta`` in one durable transaction; return the new value.

        Raise :exc:`StoreUnavailable` if the transaction did not commit; it was
        rolled back, so nothing of ``delta`` is counted.
        """
        loop = asyncio.get_running_loop()
        try:
            value = await loop.run_in_executor(self.worker, self.commit, delta)
        except sqlite3.Error as exc:
            self.last_commit_ok = False
            raise StoreUnavailable(f"cannot commit to {self.name}: {exc}") from exc
        self.last_commit_ok = True
        return value

    def healthy(self) -> bool:
        """False from a failed commit until the next one succeeds."""
        return self.last_commit_ok and not self.closed

    def watch(self, observer: Observer) -> None:
        pass  # only this process changes the file: nothing to observe

    def share_users(self, room: str, here: int) -> None:
        pass

    async def close(self) -> None:
        """Close the database and release the file for the next server."""
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.worker, self.release_file)
        self.worker.shutdown()

    # The worker thread's side.

    def open_file(self) -> tuple[int, bool]:
        """Check, lock, then open the file; tell whether it was created."""
        check_path(self.path, self.name)
        self.lock = hold_exclusively(self.path, self.name)
        try:
            # Only once the header says the file is ours (or empty) may SQLite
            # open it: opening can write, e.g. to roll back a hot journal.
            check_header(self.lock, self.name)
            self.connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            return self.prepare(self.connection)
        except sqlite3.Error as exc:
            self.release_file()
            raise StoreError(describe(exc, self.name)) from exc
        except BaseException:
            self.release_file()
            raise

    def prepare(self, connection: sqlite3.Connection) -> tuple[int, bool]:
        connection.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
        connection.execute("PRAGMA fullfsync = ON")  # macOS: plain fsync stops at the drive cache
        # An empty file, or one whose creation was cut short (SQLite rolls
        # back its hot journal right here), gets the schema.
        created = connection.execute("PRAGMA page_count").fetchone()[0] == 0
        if created:
            self.create_schema(connection)
        else:
            check_schema(connection, self.name)
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"--state {self.name}: SQLite cannot use WAL mode here ({mode})")
        (value,) = connection.execute("SELECT value FROM counter WHERE id = 0").fetchone()
        return int(value), created

    def create_schema(self, connection: sqlite3.Connection) -> None:
        # Still in rollback-journal mode: this transaction lands in the main
        # file itself, so the application id is in its header from now on,
        # even if the process dies before the first WAL checkpoint.
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute(SCHEMA)
        connection.execute("INSERT INTO counter (id, value) VALUES (0, 0)")
        connection.execute("COMMIT")
        # The new file's directory entry must be durable too; SQLite syncs the
        # directory for its journals, not for the database file we created.
        fsync_directory(self.path.absolute().parent)

    def commit(self, delta: int) -> int:
        connection = self.connection
        if connection is None:
            raise sqlite3.ProgrammingError("the store is not open")
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("UPDATE counter SET value = value + ? WHERE id = 0", (delta,))
            (value,) = connection.execute("SELECT value FROM counter WHERE id = 0").fetchone()
            connection.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after some errors (disk full, I/O).
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return int(value)

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


def check_path(path: Path, name: str) -> None:
    """Refuse, before touching anything, a path SQLite could not keep the counter in."""
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

    The lock lives on the file the counter lives in, not on a sidecar: there is
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


def check_schema(connection: sqlite3.Connection, name: str) -> None:
    """Check that our own file is whole and in the layout this code knows."""
    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise StoreError(f"--state {name}: the database is corrupt ({one_line(problems[0])})")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"--state {name}: schema version {version}; this server knows {SCHEMA_VERSION}"
        )
    tables = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'counter'").fetchall()
    row = None
    if tables:
        row = connection.execute("SELECT typeof(value) FROM counter WHERE id = 0").fetchone()
    if row != ("integer",):
        raise StoreError(f"--state {name}: marked as counter-sync but holds no counter value")


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
