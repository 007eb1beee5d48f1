"""The load generator: worker processes holding the listeners and the driver, and their control.

On a two-core machine a single-process generator would compete with the
server for one event loop's worth of CPU and become the bottleneck, so the
listeners are split across several processes (:mod:`bench.listeners`).
One more process holds the driver, the single connection that sends actions.

The bench's main process steers the workers over pipes, one command at a
time, and every command carries its own timeout.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, Self

from bench.listeners import Reply, Worker, worker_main
from bench.proc import CpuWatch

__all__ = ["JoinResult", "LoadGen", "LoadGenError", "Progress", "Usage", "run_each", "shares"]

# How long the main process waits for a reply beyond the command's own timeout.
REPLY_MARGIN = 15.0


class LoadGenError(RuntimeError):
    """A worker failed, died, or did not answer in time."""


def shares(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares as even as can be, the larger first: 7 in 3 is [3, 2, 2]."""
    return [total // parts + (index < total % parts) for index in range(parts)]


@dataclass
class Progress:
    """How far the listeners got towards a target, across every worker."""

    reached: int
    open: int
    last: float | None  # the latest time a listener reached it
    frames: int
    payload_bytes: int  # of those frames: their size, as the listeners saw it
    errors: int

    @property
    def payload_bytes_per_frame(self) -> float | None:
        """The frames' mean payload size; None when none came."""
        return self.payload_bytes / self.frames if self.frames else None


@dataclass
class JoinResult:
    """What the join storm saw, across every worker.

    Each time runs from the first connect; it is None unless every
    connection got there (all handshakes done; all first messages; all saw
    users == N, which a server that speaks no protocol is not asked for).
    """

    connected: int
    failed: int
    reached: int
    seconds: float | None
    handshakes_seconds: float | None
    first_message_seconds: float | None
    first_messages: int
    errors: list[str]


class LoadGen:
    """Controls `workers` listener processes and one driver process.

    `kind` is the Worker class every process runs: a bench with commands of
    its own (rooms, say) passes a subclass, defined at module level so that
    the spawned processes can import it.
    """

    def __init__(self, *, workers: int, host: str, kind: type[Worker] = Worker) -> None:
        self.workers = workers
        self.host = host
        self.kind = kind
        self.number = 0
        self.commands: list[Connection] = []
        self.replies: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def start(self) -> None:
        """Start the processes; fail early if picows is not installed."""
        try:
            import picows  # noqa: F401
        except ImportError as exc:
            raise LoadGenError(
                "the load generator needs picows: pip install picows uvloop"
            ) from exc
        context = multiprocessing.get_context("spawn")
        loopback = self.host.startswith("127.")
        for index in range(self.workers + 1):
            inbox, command = context.Pipe(duplex=False)
            reply, outbox = context.Pipe(duplex=False)
            source_ip = f"127.0.1.{index + 1}" if loopback else None
            process = context.Process(
                target=worker_main,
                args=(inbox, outbox, source_ip, self.kind),
                daemon=True,
                name=f"loadgen-{index}",
            )
            process.start()
            inbox.close()
            outbox.close()
            self.commands.append(command)
            self.replies.append(reply)
            self.processes.append(process)

    def close(self) -> None:
        """Ask every worker to stop; kill those that do not within a few seconds."""
        for conn in self.commands:
            with contextlib.suppress(OSError):
                conn.send((0, "stop", {}))
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in [*self.commands, *self.replies]:
            conn.close()
        self.commands, self.replies, self.processes = [], [], []

    def healthy(self) -> bool:
        return bool(self.processes) and all(p.is_alive() for p in self.processes)

    def restart(self) -> None:
        """Stop every process and start fresh ones: no connection, no state left."""
        self.close()
        self.start()

    def ensure_healthy(self) -> None:
        """Start the processes, or restart them all if one of them has died."""
        if not self.healthy():
            self.restart()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def listener_ids(self) -> range:
        return range(self.workers)

    @property
    def driver_id(self) -> int:
        return self.workers

    def ask(self, calls: dict[int, tuple[str, dict[str, Any]]], limit: float) -> dict[int, Reply]:
        """Send each worker its command and collect every reply, or raise.

        `limit` is the command's own time bound; a worker gets REPLY_MARGIN
        more to answer before it counts as lost.
        """
        # Numbered, so that a late reply to a command that timed out, or to
        # one whose sibling failed, is never taken for the answer to this one.
        self.number += 1
        for index, (name, kwargs) in calls.items():
            try:
                self.commands[index].send((self.number, name, kwargs))
            except OSError as exc:
                raise LoadGenError(f"worker {index} is gone: {exc}") from exc
        pending = {self.replies[index]: index for index in calls}
        replies: dict[int, Reply] = {}
        deadline = time.monotonic() + limit + REPLY_MARGIN
        while pending:
            ready = wait(list(pending), max(0.0, deadline - time.monotonic()))
            if not ready:
                names = sorted(calls[i][0] for i in pending.values())
                raise LoadGenError(f"workers did not answer {names} in time")
            for conn in ready:
                assert isinstance(conn, Connection)
                try:
                    number, reply = conn.recv()
                except (EOFError, OSError) as exc:
                    raise LoadGenError(f"worker {pending[conn]} died") from exc
                if number != self.number:
                    continue
                index = pending.pop(conn)
                if "error" in reply:
                    raise LoadGenError(f"worker {index}: {reply['error']}")
                replies[index] = reply
        return replies

    def each(self, name: str, limit: float, /, **kwargs: Any) -> list[Reply]:
        """The same command to every listener worker (`kwargs` are its arguments)."""
        calls = {i: (name, kwargs) for i in self.listener_ids}
        replies = self.ask(calls, limit)
        # In worker order, not arrival order: callers pair replies across calls.
        return [replies[i] for i in self.listener_ids]

    def drive(self, name: str, limit: float, /, **kwargs: Any) -> Reply:
        """A command for the driver process."""
        return self.ask({self.driver_id: (name, kwargs)}, limit)[self.driver_id]

    def split(self, total: int) -> list[int]:
        """`total` in shares, one per listener process."""
        return shares(total, self.workers)

    # --- the steps the phases are made of ---

    def join_storm(
        self, url: str, count: int, timeout: float, *, protocol: bool = True
    ) -> JoinResult:
        """`count` listeners connect at once; time until every handshake completed, and more.

        With `protocol`, also until every listener got its first message and
        saw users == count. Without (a server that only completes
        handshakes), the storm ends with the last handshake.
        """
        start_at = time.monotonic() + 0.3
        calls = {
            i: (
                "connect",
                {
                    "url": url,
                    "count": n,
                    "start_at": start_at,
                    "expect_users": count,
                    "limit": timeout,
                },
            )
            for i, n in zip(self.listener_ids, self.split(count), strict=True)
        }
        connected = list(self.ask(calls, timeout + 1).values())
        started = min(r["started"] for r in connected)
        opened = sum(r["connected"] for r in connected)
        handshakes = [r["handshakes_last"] for r in connected if r["handshakes_last"] is not None]
        result = JoinResult(
            connected=opened,
            failed=sum(r["failed"] for r in connected),
            reached=0,
            seconds=None,
            handshakes_seconds=max(handshakes) - started if opened == count else None,
            first_message_seconds=None,
            first_messages=0,
            errors=[e for r in connected for e in r["errors"]],
        )
        if not protocol:
            return result
        spent = time.monotonic() - started
        waited = self.wait("users", max(0.1, timeout - spent))
        # Seeing users == count implies a first message: once this wait is
        # over, every listener that will have one within the timeout has it.
        firsts = self.each("firsts", 5)
        result.first_messages = sum(r["count"] for r in firsts)
        last_first = max((r["last"] for r in firsts if r["last"] is not None), default=None)
        if result.first_messages == count and last_first is not None:
            result.first_message_seconds = last_first - started
        result.reached = waited.reached
        if waited.reached == count and waited.last is not None:
            result.seconds = waited.last - started
        return result

    def connect_driver(self, url: str, *, listeners: int, timeout: float) -> int:
        """Open the driver's connection; once all `listeners` saw it join, its first value."""
        value = int(self.drive("driver_connect", timeout, url=url, limit=timeout)["value"])
        self.expect(users=listeners + 1)
        self.wait("users", timeout)
        return value

    def expect(
        self, *, users: int | None = None, value: int | None = None, record: bool = False
    ) -> None:
        self.each("expect", 5, users=users, value=value, record=record)

    def wait(self, what: str, timeout: float) -> Progress:
        """Wait until every open listener reached its `what` ("users"/"value") target."""
        replies = self.each("wait", timeout, what=what, limit=timeout)
        return Progress(
            reached=sum(r["reached"] for r in replies),
            open=sum(r["open"] for r in replies),
            last=max((r["last"] for r in replies if r["last"] is not None), default=None),
            frames=sum(r["frames"] for r in replies),
            payload_bytes=sum(r["payload_bytes"] for r in replies),
            errors=sum(r["errors"] for r in replies),
        )

    def steady(
        self, start_value: int, *, rate: float, count: int, timeout: float
    ) -> tuple[list[tuple[int, float]], Progress]:
        """The driver sends `count` actions at `rate` a second, from `start_value` on.

        Returns each send as (the value it makes, when it was sent), for
        :meth:`delays`, and how far the listeners got once every open one
        has the last value or `timeout` is up.
        """
        self.expect(value=start_value + count, record=True)
        sends = self.drive(
            "steady", count / rate + timeout, start_value=start_value, rate=rate, count=count
        )["sends"]
        return [(int(value), float(at)) for value, at in sends], self.wait("value", timeout)

    def delays(self, sends: list[tuple[int, float]], timeout: float) -> tuple[list[float], int]:
        """Per listener and send: seconds until it showed a value including it; and the misses."""
        replies = self.each("delays", timeout, sends=sends)
        return [d for r in replies for d in r["delays"]], sum(r["missing"] for r in replies)

    def fill(self, url: str, count: int, concurrency: int, timeout: float) -> Reply:
        """Open `count` idle connections, `concurrency` handshakes in flight over all workers."""
        gates = self.split(concurrency)
        calls = {
            i: ("fill", {"url": url, "count": n, "concurrency": max(1, g), "limit": timeout})
            for i, n, g in zip(self.listener_ids, self.split(count), gates, strict=True)
        }
        replies = list(self.ask(calls, timeout + 1).values())
        return {
            "connected": sum(r["connected"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": [e for r in replies for e in r["errors"]],
        }

    def count_open(self) -> int:
        return sum(r["open"] for r in self.each("count_open", 5))

    def arm(self, value: int) -> None:
        """Every idle connection notes when it first sees a value >= `value`."""
        self.each("arm", 5, value=value)

    def armed_delays(self, sent_at: float, timeout: float) -> tuple[list[float], int, int]:
        """Per idle connection, seconds from `sent_at` until it saw the armed value.

        Returns the delays, how many open connections had not seen it by
        `timeout`, and the frames that were no event.
        """
        replies = self.each("armed_delays", timeout, sent_at=sent_at, limit=timeout)
        delays = [d for r in replies for d in r["delays"]]
        return delays, sum(r["missing"] for r in replies), sum(r["errors"] for r in replies)

    def cpu(self) -> list[float]:
        """CPU seconds used so far by each listener worker."""
        return [r["cpu"] for r in self.each("cpu", 5)]

    def reset(self) -> None:
        calls: dict[int, tuple[str, dict[str, Any]]] = {
            i: ("reset", {}) for i in [*self.listener_ids, self.driver_id]
        }
        self.ask(calls, 10)


class Watched(Protocol):
    """A process whose CPU a phase measures: a server under test, or a floor."""

    @property
    def pid(self) -> int: ...


class Usage:
    """CPU used by the server and by each load generator worker over a phase."""

    def __init__(self, server: Watched, load: LoadGen) -> None:
        self.load = load
        self.server = CpuWatch(server.pid)
        self.loadgen_cpu = load.cpu()

    def server_seconds(self) -> float:
        return self.server.seconds()

    def stop(self) -> Reply:
        wall = time.monotonic() - self.server.started
        server = self.server_seconds()
        loadgen = [b - a for a, b in zip(self.loadgen_cpu, self.load.cpu(), strict=True)]
        return {
            "wall_seconds": wall,
            "server_cpu_seconds": server,
            "server_kernel_share": self.server.kernel_share(),
            "server_busy": server / wall,
            "loadgen_busy": max(loadgen) / wall,
        }


def run_each(
    load: LoadGen,
    names: Sequence[str],
    measure: Callable[[str], Any],
    results: dict[str, Any],
    save: Callable[[], None],
) -> bool:
    """``results[name] = measure(name)`` for each name in turn, calling ``save`` after each.

    Saving after each, an interrupted run keeps what it measured. The
    processes are (re)started before each name if one has died, a server
    that broke them, say, and closed at the end. Returns False, having
    said why, when the load generator itself failed.
    """
    try:
        for name in names:
            load.ensure_healthy()
            results[name] = measure(name)
            save()
    except LoadGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    finally:
        load.close()
    return True
