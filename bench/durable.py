"""Durable actions per second: group commit in the real server vs one commit per action.

    python -m bench.durable [--clients 8] [--actions 100000] [--single 2000]

Group commit: ``server.py --state FILE --rate 0`` runs as its own process and
this one opens ``--clients`` connections that pipeline ``plus`` actions,
``--actions`` in all. The clock stops when a client is shown the final value:
the server broadcasts a value only once it is committed, so that is when the
last action is durable. The file is read back afterwards to check.

One commit per action: the same store class on a fresh file (so the same
SQLite settings: WAL, ``synchronous=FULL``), awaited once per action, one
transaction each: what the server would do without coalescing.

Both run on this machine's disk, in a temporary directory next to this file's
repository unless ``--dir`` says otherwise: fsync costs what that disk costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from bench.flags import Flag, parse, positive
from counter_sync.sqlite_store import SqliteStore
from counter_sync.store import Change
from testkit.processes import ROOT, ServerProcess

__all__ = ["main"]

PLUS = json.dumps({"action": "plus"})
SEND_BATCH = 100  # sends between yields, so the readers get to run

FLAGS = (
    Flag("--clients", "connections sending actions", positive(int), 8),
    Flag("--actions", "actions with group commit", positive(int), 100_000),
    Flag("--single", "actions, one commit each", positive(int), 2_000),
    Flag("--dir", "where the files are made", Path, ROOT),
)


async def group_commit(directory: Path, clients: int, actions: int) -> float:
    """Seconds for the real server to commit ``actions`` sent over ``clients`` connections."""
    state = directory / "group.sqlite"
    process = ServerProcess("--rate", "0", "--state", str(state))
    port = process.port
    share, extra = divmod(actions, clients)
    done = asyncio.Event()

    async def send(websocket: ClientConnection, count: int) -> None:
        for sent in range(count):
            await websocket.send(PLUS)
            if sent % SEND_BATCH == 0:
                await asyncio.sleep(0)

    async def watch(websocket: ClientConnection) -> None:
        async for message in websocket:
            event = json.loads(message)
            if event["type"] == "state" and event["value"] == actions:
                done.set()

    async with contextlib.AsyncExitStack() as stack:
        websockets = [
            await stack.enter_async_context(connect(f"ws://127.0.0.1:{port}/", compression=None))
            for _ in range(clients)
        ]
        for websocket in websockets:  # the connect sequence: users, then state 0
            await websocket.recv()
            await websocket.recv()
        watchers = [asyncio.create_task(watch(websocket)) for websocket in websockets]
        started = time.perf_counter()
        await asyncio.gather(
            *(
                send(websocket, share + (index < extra))
                for index, websocket in enumerate(websockets)
            )
        )
        async with asyncio.timeout(120):
            await done.wait()
        elapsed = time.perf_counter() - started
        for watcher in watchers:
            watcher.cancel()

    returncode, log = process.stop()
    if returncode != 0:
        raise SystemExit(f"server.py failed:\n{log}")
    with contextlib.closing(sqlite3.connect(state)) as db:
        row = db.execute("SELECT value FROM counter WHERE name = '/'").fetchone()
        stored = row[0] if row else 0  # a counter at 0 has no row
    if stored != actions:
        raise SystemExit(f"the file holds {stored}, expected {actions}")
    return elapsed


async def commit_per_action(directory: Path, actions: int) -> float:
    """Seconds for the same store to commit ``actions`` one transaction each."""
    store = SqliteStore(directory / "single.sqlite")
    await store.open()
    started = time.perf_counter()
    for _ in range(actions):
        await store.commit([Change("/", delta=1)])
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed


def main(argv: Sequence[str] | None = None) -> None:
    args = parse("python -m bench.durable", __doc__.split("\n\n")[0], FLAGS, argv)

    with tempfile.TemporaryDirectory(prefix="durable-bench-", dir=args.dir) as name:
        directory = Path(name)
        group = asyncio.run(group_commit(directory, args.clients, args.actions))
        single = asyncio.run(commit_per_action(directory, args.single))

    group_rate = args.actions / group
    single_rate = args.single / single
    print(
        f"group commit (server.py --state, {args.clients} connections): "
        f"{args.actions:,} actions in {group:.2f} s = {group_rate:,.0f} durable actions/s"
    )
    print(
        f"one commit per action (one SqliteStore.commit each):  "
        f"{args.single:,} actions in {single:.2f} s = {single_rate:,.0f} durable actions/s"
    )
    print(f"ratio: {group_rate / single_rate:.1f}x")


if __name__ == "__main__":
    main()
