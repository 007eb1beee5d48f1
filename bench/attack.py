"""Issue 9, "Hard to break": rerun every attack that once broke the server, and measure it.

Each attack runs against a real ``python server.py`` (started with
``testkit.processes.ServerProcess``), and the load comes from separate processes:
this one only steers them and watches the server from outside (RSS and open
files from /proc, kernel socket memory from ``ss``, its log). Every attacker
connects from its own loopback address, because the server's caps are per
client address and Linux routes all of 127.0.0.0/8 to the loopback device.

    python3 -m bench.attack                      # every attack, a few minutes
    python3 -m bench.attack --only flood,stall   # some of them
    python3 -m bench.attack --help               # every flag, with its default

It prints one table, each figure next to its target with PASS or FAIL, and a
table of memory per connection; it writes the figures and every detail to
``bench/results/attack.json`` and each server's log to
``bench/results/attack-logs/`` (both ignored by git). The exit status is 1 when
a target failed. ``bench/README.md`` says what each attack does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import inspect
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from bench.loadgen import LoadGen, LoadGenError, Progress, raise_fd_limit
from bench.measure import percentile
from bench.servers import REPO_ROOT, cpu_seconds, rss_bytes, wait_idle
from counter_sync.config import MAX_PENDING_PER_IP, MAX_USERS_PER_IP, PING_INTERVAL, PING_TIMEOUT
from testkit.processes import TIMEOUT, ServerProcess
from testkit.rawclient import (
    HOST,
    SMALL_RCVBUF,
    RawClient,
    bound_socket,
    client_frame,
    connected_socket,
    raw_websocket,
    tcp_open,
)

__all__ = ["main"]

Report = dict[str, Any]

# Who attacks from where. To the server each address is another host.
SILENT_SOURCE = "127.0.0.1"  # the attacks 3 and 4 come from here
LEGIT_SOURCE = "127.0.0.2"
HEALTH_SOURCE = "127.0.0.3"
FLOOD_SOURCE = "127.0.0.4"
STALL_SOURCE = "127.0.0.5"
STALL_DRIVER_SOURCE = "127.0.0.6"
GARBAGE_SOURCE = "127.0.0.7"
PIPELINE_SOURCE = "127.0.0.8"
FILL_SOURCE_ALL = "127.0.0.9"  # in the all-at-once run, apart from the silent sockets
LEGIT_NETWORK = "127.0.2."  # attack 3b: ten legitimate clients, ten addresses
BOUND_NETWORK = "127.0.3."  # attack 8: 50 connections per address
# (The load generator's listeners and driver use 127.0.1.x: see bench/loadgen.py.)

# The stalled-reader attack's keepalive, as the issue states it.
STALL_PING_INTERVAL = 1.0
STALL_PING_TIMEOUT = 1.0
STALL_SNAPSHOT = 1.5  # seconds after it stopped reading: the kernel's share is read then
STALL_ROOM = "/c/stalled"  # all-at-once: its driver's actions stay out of the latency room

PINGS_PER_WRITE = 10_000
# Open files one attacking process keeps below its limit, for itself.
SOCKETS_PER_PROCESS = 10_000
SAMPLE_PERIOD = 0.05  # seconds between two readings of the server's RSS and open files
PLUS = json.dumps({"action": "plus"})
MIB = 1024 * 1024

# What a pipelined client sends in one packet: two requests, the second one
# before the first is answered.
PIPELINED = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
)


PING = client_frame(0x9, b"ping")
UNSOLICITED_PONG = client_frame(0xA, b"")
EMPTY_TEXT = client_frame(0x1, b"")  # the smallest frames there are
EMPTY_PING = client_frame(0x9, b"")
PROBE_PERIOD = 0.1  # seconds between a stalled client's pongs
# Every kind of bad message the server answers with an error and a warning.
GARBAGE = b"".join(
    client_frame(opcode, payload)
    for opcode, payload in (
        (0x1, b"not json"),
        (0x2, b"\x00\xff binary"),
        (0x1, b"[1, 2, 3]"),
        (0x1, b'{"action": "jump"}'),
        (0x1, b'{"no": "action"}'),
        (0x1, b"[" * 100),
    )
)
GARBAGE_MESSAGES = 6
ERROR_MARK = b'"type": "error"'  # in every error event the server sends


# --------------------------------------------------------------------------
# In the attacking processes
# --------------------------------------------------------------------------


class Channel:
    """An attacker's end of its pipe: report "ready" and "done", hear "go" and "stop"."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.heard: set[str] = set()

    def send(self, kind: str, **report: Any) -> None:
        self.conn.send((kind, report))

    def ready(self, **report: Any) -> None:
        self.send("ready", **report)

    def done(self, **report: Any) -> None:
        self.send("done", **report)

    def heard_of(self, word: str, wait: float = 0.0) -> bool:
        """Whether the main process has said ``word``, waiting up to ``wait`` seconds for it."""
        deadline = time.monotonic() + wait
        while word not in self.heard:
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                return False
            self.heard.add(self.conn.recv())
        return True

    async def hear(self, word: str, limit: float) -> bool:
        """:meth:`heard_of` for a coroutine: the event loop keeps running meanwhile."""
        deadline = time.monotonic() + limit
        while not self.heard_of(word):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def run_child(conn: Connection, attack: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Entry point of an attacking process: run ``attack``, report a failure instead of dying."""
    raise_fd_limit()
    channel = Channel(conn)
    try:
        outcome = attack(channel, **kwargs)
        if inspect.iscoroutine(outcome):
            asyncio.run(outcome)
    except Exception as exc:
        with contextlib.suppress(OSError):
            channel.send("error", error=f"{type(exc).__name__}: {exc}")


def describe(result: object) -> str:
    """One word for how a connection attempt ended: "in", an HTTP status, or the error."""
    if isinstance(result, ClientConnection):
        return "in"
    if isinstance(result, InvalidStatus):
        return str(result.response.status_code)
    return type(result).__name__


# --- Attack 1: the ping flood ----------------------------------------------------


def flood_pings(
    channel: Channel, *, port: int, source: str, pings: int, repeat: bool, limit: float
) -> None:
    """Send ``pings`` ping frames as fast as the server takes them, and never read.

    With ``repeat``, connect again after each drop and flood again, until told
    to stop. Each flood reports how many pings went out and how it ended.
    """
    deadline = time.monotonic() + limit
    sock = raw_websocket(port, source, rcvbuf=SMALL_RCVBUF)
    channel.ready(port=sock.getsockname()[1], started=time.monotonic())
    floods = [flood_one(sock, pings, channel, deadline)]
    while repeat and not channel.heard_of("stop") and time.monotonic() < deadline:
        try:
            sock = raw_websocket(port, source, rcvbuf=SMALL_RCVBUF)
        except OSError:
            time.sleep(0.1)  # refused or reset under load: try again
            continue
        floods.append(flood_one(sock, pings, channel, deadline))
    channel.heard_of("stop", max(0.0, deadline - time.monotonic()))
    channel.done(floods=floods)


def flood_one(sock: socket.socket, pings: int, channel: Channel, deadline: float) -> Report:
    """One connection's flood; it ends when the server drops it, or at stop or the deadline."""
    with sock:
        started = time.monotonic()
        sent, reset_at = send_pings(sock, pings * len(PING), channel, deadline)
        sent_at = time.monotonic()
        # Everything sent: keep the connection, unread, until the server drops it.
        while reset_at is None and time.monotonic() < deadline and not channel.heard_of("stop"):
            if not tcp_open(sock):
                reset_at = time.monotonic()
            else:
                time.sleep(0.02)
    return {
        "started": started,
        "pings_sent": sent // len(PING),
        "seconds_sending": sent_at - started,
        "dropped_after": None if reset_at is None else reset_at - started,
    }


def send_pings(
    sock: socket.socket, total: int, channel: Channel, deadline: float
) -> tuple[int, float | None]:
    """Write ``total`` bytes of pings without blocking; return bytes sent and when a reset came."""
    sock.setblocking(False)
    batch = PING * PINGS_PER_WRITE
    sent = 0
    while sent < total and time.monotonic() < deadline and not channel.heard_of("stop"):
        _, writable, _ = select.select([], [sock], [], 0.05)
        if not writable:
            if not tcp_open(sock):
                return sent, time.monotonic()
            continue
        offset = sent % len(batch)  # the batch holds whole frames: offsets stay aligned
        try:
            sent += sock.send(batch[offset : offset + total - sent])
        except (ConnectionResetError, BrokenPipeError):
            return sent, time.monotonic()
        except BlockingIOError:
            continue
    return sent, None


# --- Attack 2: stalled readers ---------------------------------------------------


def stall(port: int, source: str, path: str) -> tuple[socket.socket, float]:
    """A client that has done its handshake and will read nothing more, and since when."""
    return raw_websocket(port, source, path=path, rcvbuf=SMALL_RCVBUF), time.monotonic()


def stalled_readers(
    channel: Channel,
    *,
    port: int,
    source: str,
    count: int,
    path: str,
    repeat: bool,
    limit: float,
) -> None:
    """``count`` clients that stop reading right after the handshake, for good.

    The server's log times the drops. With ``repeat`` a dropped client
    connects again and stalls again; to find out that it was dropped, it
    sends an unsolicited pong now and then, because the server's reset does
    not reach a client whose window is closed (it is out of window), but its
    kernel's answer to a segment for a socket that is gone does. Without
    ``repeat`` a client sends nothing at all.
    """
    deadline = time.monotonic() + limit
    stalled = [stall(port, source, path) for _ in range(count)]
    channel.ready(ports=[sock.getsockname()[1] for sock, _ in stalled], stopped_at=stalled[0][1])
    noticed: list[float] = []
    while stalled and time.monotonic() < deadline and not channel.heard_of("stop", PROBE_PERIOD):
        still = []
        for sock, since in stalled:
            if still_there(sock) if repeat else tcp_open(sock):
                still.append((sock, since))
                continue
            noticed.append(time.monotonic() - since)
            sock.close()
            if repeat:
                with contextlib.suppress(OSError):  # refused under load: one fewer for now
                    still.append(stall(port, source, path))
        stalled = still
    for sock, _ in stalled:
        sock.close()
    channel.heard_of("stop", max(0.0, deadline - time.monotonic()))
    channel.done(noticed=noticed, still_open=len(stalled))


def still_there(sock: socket.socket) -> bool:
    """Send an unsolicited pong (RFC 6455 allows it); False once the server has reset us."""
    with contextlib.suppress(BlockingIOError):
        try:
            sock.send(UNSOLICITED_PONG, socket.MSG_DONTWAIT)
        except OSError:
            return False
    return tcp_open(sock)


async def one_at_a_time(
    channel: Channel,
    *,
    port: int,
    source: str,
    path: str,
    updates: int,
    pace: float,
    reconnect: bool,
    limit: float,
) -> None:
    """Send ``plus`` and wait to see its value before the next one, ``updates`` times.

    One update per broadcast: a burst would be coalesced into a few. ``pace``
    caps the updates per second (0: as fast as the server answers). It notes
    every user count it sees with the updates sent by then, and every 50th
    update's time, so the main process can tell when the buffers filled.
    With ``reconnect``, a drop (a starved client misses its pongs too) costs
    a new connection instead of the attack.
    """
    deadline = time.monotonic() + limit
    client = await open_client(port, source, path)
    value = await next_value(client, None)
    channel.ready(value=value)
    users: list[tuple[float, int, int]] = []  # when, how many users, updates sent by then
    timeline: list[tuple[float, int]] = []  # when, updates sent
    if not await channel.hear("go", limit):
        raise TimeoutError("no go")
    started = time.monotonic()
    sent = drops = 0
    while sent < updates and time.monotonic() < deadline and not channel.heard_of("stop"):
        if pace:
            await asyncio.sleep(max(0.0, started + sent / pace - time.monotonic()))
        try:
            await client.send(PLUS)
            sent += 1
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                value = await next_value(client, users, at_least=value + 1, sent=sent)
        except ConnectionClosed:
            if not reconnect:
                raise
            drops += 1
            client = await open_client(port, source, path)
            value = await next_value(client, None)
        if sent % 50 == 0:
            timeline.append((time.monotonic(), sent))
    seconds = time.monotonic() - started
    # Stay, and keep reading: leaving would change the user count the others wait for.
    with contextlib.suppress(ConnectionClosed):
        await follow_users(client, users, sent, channel, deadline)
    client.transport.abort()
    channel.done(
        sent=sent,
        seconds=seconds,
        value=value,
        users=users,
        started=started,
        timeline=timeline,
        drops=drops,
    )


async def follow_users(
    client: ClientConnection,
    users: list[tuple[float, int, int]],
    sent: int,
    channel: Channel,
    deadline: float,
) -> None:
    """Note the user counts that arrive until told to stop."""
    while time.monotonic() < deadline and not channel.heard_of("stop"):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                event = json.loads(await client.recv())
                if event["type"] == "users":
                    users.append((time.monotonic(), event["count"], sent))


async def next_value(
    client: ClientConnection,
    users: list[tuple[float, int, int]] | None,
    *,
    at_least: int | None = None,
    sent: int = 0,
) -> int:
    """Read events until a state of at least ``at_least``; note each user count on the way.

    An error event (the action was not counted: a rate limit, say) ends the
    wait too, with the value it would have replaced, so the driver goes on.
    """
    while True:
        event = json.loads(await client.recv())
        if event["type"] == "users" and users is not None:
            users.append((time.monotonic(), event["count"], sent))
        elif event["type"] == "state" and (at_least is None or event["value"] >= at_least):
            return int(event["value"])
        elif event["type"] == "error" and at_least is not None:
            return at_least - 1


# --- Attack 3: silent sockets ------------------------------------------------------


async def silent_sockets(
    channel: Channel,
    *,
    port: int,
    source: str,
    count: int,
    concurrency: int,
    connect_timeout: float,
    limit: float,
) -> None:
    """Open ``count`` TCP connections that never send a byte, and hold them until told to stop."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> socket.socket:
        async with gate, asyncio.timeout(connect_timeout):
            return await connected_socket(port, source)

    started = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    sockets = [result for result in results if isinstance(result, socket.socket)]
    failed = Counter(describe(result) for result in results if isinstance(result, BaseException))
    channel.ready(
        attempted=count,
        connected=len(sockets),
        failed=dict(failed),
        seconds=time.monotonic() - started,
        open_now=sum(tcp_open(sock) for sock in sockets),
    )
    await channel.hear("stop", limit)
    still_open = sum(tcp_open(sock) for sock in sockets)
    for sock in sockets:
        sock.close()
    channel.done(still_open=still_open, closed_by_server=len(sockets) - still_open)


async def open_client(port: int, source: str, path: str = "/") -> ClientConnection:
    """A library client from ``source`` that has read its first event (the user count)."""
    async with asyncio.timeout(TIMEOUT):
        sock = await connected_socket(port, source)
        try:
            client = await connect(f"ws://{HOST}:{port}{path}", sock=sock, compression=None)
            await client.recv()
        except BaseException:
            sock.close()
            raise
    return client


async def legit_clients(
    channel: Channel, *, port: int, sources: Sequence[str], health_source: str | None
) -> None:
    """Ordinary clients, one per entry of ``sources``, each timed from connect to its first event.

    They connect together and are held until all are in, then closed; with
    ``health_source``, one ``GET /healthz`` from there follows.
    """

    async def timed(source: str) -> tuple[Report, ClientConnection | None]:
        started = time.monotonic()
        try:
            client = await open_client(port, source)
        except Exception as exc:
            return {"source": source, "error": describe(exc)}, None
        return {"source": source, "seconds": time.monotonic() - started}, client

    results = await asyncio.gather(*(timed(source) for source in sources))
    for _, client in results:
        if client is not None:
            client.transport.abort()
    health = None if health_source is None else await health_check(port, health_source)
    channel.done(clients=[report for report, _ in results], health=health)


async def health_check(port: int, source: str) -> Report:
    """``GET /healthz`` from ``source``: the status and how long the status line took."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status_line = await reader.readline()
            seconds = time.monotonic() - started
            body = (await reader.read()).partition(b"\r\n\r\n")[2]
            writer.close()
    except (OSError, TimeoutError) as exc:
        return {"error": describe(exc)}
    status = status_line.split()
    return {
        "status": int(status[1]) if len(status) > 1 else None,
        "seconds": seconds,
        "body": body.decode(errors="replace").strip(),
    }


# --- Attack 4: one address fills the server ----------------------------------------


async def fill_connections(
    channel: Channel,
    *,
    port: int,
    source: str,
    count: int,
    concurrency: int,
    limit: float,
) -> None:
    """``count`` WebSocket clients from one address, held open: how many got in, how refused."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> ClientConnection:
        async with gate:
            return await open_client(port, source)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    clients = [result for result in results if isinstance(result, ClientConnection)]
    # They read what they are sent, as live clients do: the attack is their number.
    readers = [asyncio.create_task(read_all(client)) for client in clients]
    channel.ready(outcomes=dict(Counter(describe(result) for result in results)))
    await channel.hear("stop", limit)
    still_open = sum(client.state is State.OPEN for client in clients)
    for client, reader in zip(clients, readers, strict=True):
        reader.cancel()
        client.transport.abort()
    channel.done(still_open=still_open)


async def read_all(client: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in client:
            pass


# --- Attack 5: pipelined requests ----------------------------------------------------


def pipelined_requests(
    channel: Channel, *, port: int, source: str, tries: int, limit: float
) -> None:
    """``tries`` connections, each sending two requests in one packet, then reading to the end."""
    deadline = time.monotonic() + limit
    first = second = done = 0
    failures: Counter[str] = Counter()
    while done < tries and time.monotonic() < deadline and not channel.heard_of("stop"):
        try:
            response = exchange(port, source, PIPELINED[done % len(PIPELINED)])
        except OSError as exc:
            failures[describe(exc)] += 1
            response = b""
        done += 1
        first += response.startswith(b"HTTP/1.1 200")
        second += response.count(b"HTTP/1.1 ") > 1
    channel.done(tries=done, first_answered=first, both_answered=second, failures=dict(failures))


def exchange(port: int, source: str, request: bytes) -> bytes:
    """Send ``request`` in one write and read until the server closes the connection."""
    with bound_socket(source) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5)
        sock.connect((HOST, port))
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# --- Attack 6: garbage ---------------------------------------------------------------


async def garbage_senders(
    channel: Channel, *, port: int, source: str, clients: int, seconds: float
) -> None:
    """``clients`` connections sending bad messages as fast as the server reads them.

    They read the replies (error events), so the server keeps reading them:
    every message is handled and may cost a warning.
    """
    opened = []
    for _ in range(clients):  # one at a time: under the per-address cap on handshakes
        opened.append(await RawClient.connect(port, source=source))
    channel.ready(connected=len(opened))
    stop_at = time.monotonic() + seconds
    reports = await asyncio.gather(
        *(send_garbage(client.reader, client.writer, stop_at) for client in opened),
        return_exceptions=True,
    )
    for client in opened:
        client.abort()
    counts = [report for report in reports if isinstance(report, dict)]
    channel.done(
        connected=len(opened),
        messages_sent=sum(report["sent"] for report in counts),
        error_replies=sum(report["errors"] for report in counts),
        failed=[describe(report) for report in reports if isinstance(report, BaseException)],
    )


async def send_garbage(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop_at: float
) -> dict[str, int]:
    """Write garbage until ``stop_at`` while a task reads the replies."""
    tally = Tally()
    replies = asyncio.create_task(count_errors(reader, tally))
    batch = GARBAGE * 20
    sent = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(max(0.0, stop_at - time.monotonic())):
            while True:
                writer.write(batch)
                sent += 20 * GARBAGE_MESSAGES
                await writer.drain()
    replies.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await replies
    return {"sent": sent, "errors": tally.errors}


@dataclass
class Tally:
    """What a reading task has counted so far (it is cancelled, so it cannot return it)."""

    errors: int = 0


async def count_errors(reader: asyncio.StreamReader, tally: Tally) -> None:
    """Read replies until cancelled, counting the error events."""
    tail = b""
    while chunk := await reader.read(65536):
        data = tail + chunk
        tally.errors += data.count(ERROR_MARK)
        # Keep less than one mark: one split across two reads is counted once.
        tail = data[-(len(ERROR_MARK) - 1) :]


# --- Attack 8: the most memory one connection can cost -----------------------------


def smallest_frames(
    channel: Channel,
    *,
    port: int,
    sources: Sequence[str],
    per_source: int,
    frame: bytes,
    limit: float,
) -> None:
    """Connections that each send as many copies of ``frame`` as the kernel takes, never reading.

    The smallest frames a client can send (6 bytes: header and mask) cost
    the server the most per byte: each becomes an object when parsed.
    """
    deadline = time.monotonic() + limit
    sockets = [
        raw_websocket(port, source, rcvbuf=SMALL_RCVBUF)
        for source in sources
        for _ in range(per_source)
    ]
    blob = frame * (256 * 1024 // len(frame))
    sent = 0
    for sock in sockets:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sent += sock.send(blob)
    channel.ready(connected=len(sockets), bytes_sent=sent)
    channel.heard_of("stop", max(0.0, deadline - time.monotonic()))
    still_open = sum(tcp_open(sock) for sock in sockets)
    for sock in sockets:
        sock.close()
    channel.done(still_open=still_open)


# --------------------------------------------------------------------------
# In the main process: the attackers, the server, and what is seen of it
# --------------------------------------------------------------------------


class AttackError(RuntimeError):
    """An attacking process failed, died, or did not report in time."""


class Attacker:
    """One attacking process, steered over a pipe: its "ready", "go", "stop" and report."""

    def __init__(self, attack: Callable[..., Any], **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = attack.__name__
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=run_child, args=(child, attack, kwargs), daemon=True, name=self.name
        )
        self.process.start()
        child.close()

    def tell(self, word: str) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(word)

    def expect(self, kind: str, timeout: float) -> Report:
        """The next report of ``kind`` ("ready" or "done"), or :exc:`AttackError`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not self.conn.poll(remaining):
                    raise AttackError(f"{self.name}: no {kind} report within {timeout:g} s")
                got, report = self.conn.recv()
            except (EOFError, OSError) as exc:
                raise AttackError(f"{self.name} died") from exc
            if got == "error":
                raise AttackError(f"{self.name}: {report['error']}")
            if got == kind:
                return dict(report)

    def ready(self, timeout: float) -> Report:
        return self.expect("ready", timeout)

    def result(self, timeout: float) -> Report:
        return self.expect("done", timeout)

    def finish(self, timeout: float) -> Report:
        """Tell it to stop, and return its final report."""
        self.tell("stop")
        return self.result(timeout)

    def close(self) -> None:
        """Kill it if it still runs: every attack ends with its processes gone."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def waiting_seconds(pid: int) -> float:
    """Seconds the process's threads were runnable but waiting for a CPU (schedstat field 2).

    Next to its CPU seconds this tells a server that was busy from one that
    other processes kept off the CPU: on one machine the attackers compete.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            total += int(f.read().split()[1])
    return total / 1e9


class Sampler:
    """Reads the server's RSS and open files every SAMPLE_PERIOD, in a thread, for the peaks.

    RSS is read often because it is the peak that matters: a server that
    queues a flood and frees it later still needed the memory.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []  # when, RSS, open files
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_PERIOD):
            with contextlib.suppress(OSError, RuntimeError):  # the server has exited
                self.samples.append((time.monotonic(), rss_bytes(self.pid), open_files(self.pid)))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def peak_rss(self, since: float = 0.0) -> int:
        return max((rss for t, rss, _ in self.samples if t >= since), default=0)

    def peak_files(self) -> int:
        return max((files for _, _, files in self.samples), default=0)


SKMEM = re.compile(r"skmem:\(([^)]*)\)")


def kernel_memory(port: int, peers: Sequence[str] = ()) -> Report:
    """What the kernel holds for the server's TCP connections (``ss -tm``); RSS leaves it out.

    Per socket ``ss`` shows r (bytes received that the server has not read),
    w (bytes queued to send) and f (memory reserved ahead); their sum is what
    the kernel charges the socket. ``peers`` (``"ip:port"``) get their own entry.
    """
    command = ["ss", "-tmnH", "state", "connected", "(", "sport", "=", f":{port}", ")"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": describe(exc)}
    sockets = parse_skmem(out)
    total = {key: sum(s.get(key, 0) for s in sockets.values()) for key in ("r", "w", "f")}
    return {
        "sockets": len(sockets),
        "received_unread_bytes": total["r"],
        "queued_to_send_bytes": total["w"],
        "charged_bytes": sum(total.values()),
        "peers": {peer: sockets[peer] for peer in peers if peer in sockets},
        "sockstat_tcp_mem_bytes": sockstat_tcp_bytes(),
    }


def parse_skmem(out: str) -> dict[str, dict[str, int]]:
    """``ss -tmnH`` output into {peer: {"r": ..., "w": ..., "f": ...}}, one entry per socket."""
    sockets: dict[str, dict[str, int]] = {}
    peer = ""
    for line in out.splitlines():
        if not line[:1].isspace():
            columns = line.split()
            peer = columns[4] if len(columns) >= 5 else ""
        elif match := SKMEM.search(line):
            sockets[peer] = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", match.group(1))}
    return sockets


def sockstat_tcp_bytes() -> int | None:
    """All TCP memory of the machine (/proc/net/sockstat, both ends of every loopback pair)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                values = line.split()
                return int(values[values.index("mem") + 1]) * resource.getpagesize()
    return None


LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def log_stats(lines: Sequence[str]) -> Report:
    """Lines, bytes, and lines per level of a stretch of the server's log."""
    levels = Counter(match.group(1) for line in lines if (match := LEVEL.match(line)))
    return {
        "lines": len(lines),
        "bytes": sum(len(line.encode()) for line in lines),
        "warnings": levels["WARNING"],
        "errors": levels["ERROR"] + levels["CRITICAL"],
        "tracebacks": sum(line.startswith("Traceback") for line in lines),
    }


def logged_at(line: str) -> float | None:
    """The time a text log line was written, in seconds (only differences mean anything)."""
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


CONNECTED = re.compile(r" INFO (\S+) connected to ")
ENDED = re.compile(r" INFO (\S+) (?:lost|disconnected): (.*)$")


def lifetimes(lines: Sequence[str], source: str) -> list[tuple[str, float, str]]:
    """Each connection from ``source`` that ended: its peer, seconds from join to drop, why.

    Both times come from the server's own log lines, so the figure is the
    server's view, to the millisecond, however busy this process was.
    """
    joined: dict[str, float] = {}
    ended = []
    prefix = f"{source}:"
    for line in lines:
        when = logged_at(line)
        if when is None:
            continue
        if (match := CONNECTED.search(line)) and match.group(1).startswith(prefix):
            joined[match.group(1)] = when
        elif (match := ENDED.search(line)) and match.group(1) in joined:
            peer = match.group(1)
            ended.append((peer, when - joined.pop(peer), match.group(2).strip()))
    return ended


class Subject:
    """The server under attack: ``python server.py``, its log in a file, its memory watched."""

    def __init__(
        self, name: str, log_dir: Path, *flags: str, open_files_limit: int | None = None
    ) -> None:
        self.name = name
        self.flags = flags
        self.process = ServerProcess(
            *flags, log_path=log_dir / f"{name}.log", open_files=open_files_limit, timeout=20
        )
        self.pid = self.process.pid
        self.port = self.process.port
        self.url = self.process.url
        wait_idle(self.pid, timeout=5)
        self.idle_rss = rss_bytes(self.pid)
        self.idle_files = open_files(self.pid)
        self.sampler = Sampler(self.pid)
        self.kernel: Report | None = None
        self.exit: Report | None = None

    def mark(self) -> int:
        """Where the log is now: :meth:`lines_since` a mark is what came after."""
        return len(self.process.lines)

    def lines_since(self, mark: int) -> list[str]:
        return self.process.lines[mark:]

    def wait_for_line(self, pattern: str, mark: int, timeout: float) -> str | None:
        """The first line after ``mark`` that matches ``pattern``, waiting up to ``timeout``."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = mark
        while True:
            lines = self.process.lines[seen:]
            seen += len(lines)
            for line in lines:
                if compiled.search(line):
                    return line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def snapshot_kernel(self, peers: Sequence[str] = ()) -> Report:
        """Read the kernel's side now; keep the largest reading for the memory table."""
        reading = kernel_memory(self.port, peers)
        if self.kernel is None or reading.get("charged_bytes", 0) >= self.kernel.get(
            "charged_bytes", 0
        ):
            self.kernel = reading
        return reading

    def stop(self) -> Report:
        """SIGTERM and wait (SIGKILL after 10 s); return the exit code and the log's counts."""
        if self.exit is None:
            self.sampler.stop()
            try:
                code: int | None = self.process.stop(10)[0]
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = None
            self.exit = {"exit_code": code, **log_stats(self.process.lines)}
        return self.exit

    def memory(self) -> Report:
        """RSS growth over the attack, against the connections held at the peak."""
        peak = self.sampler.peak_rss()
        connections = max(0, self.sampler.peak_files() - self.idle_files)
        kernel = self.kernel or {}
        charged = kernel.get("charged_bytes")
        return {
            "idle_rss_bytes": self.idle_rss,
            "peak_rss_bytes": peak,
            "growth_bytes": peak - self.idle_rss,
            "connections_at_peak": connections,
            "kib_per_connection": (peak - self.idle_rss) / 1024 / connections
            if connections
            else None,
            "kernel": kernel,
            "kernel_kib_per_socket": charged / 1024 / kernel["sockets"]
            if charged is not None and kernel.get("sockets")
            else None,
        }


# --------------------------------------------------------------------------
# Figures, targets, results
# --------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure; with a target, it passes or fails."""

    name: str
    value: Any
    target: str = ""
    passed: bool | None = None


def info(name: str, value: Any) -> Figure:
    return Figure(name, value)


def at_most(name: str, value: float | None, bound: float) -> Figure:
    return Figure(name, value, f"<= {fmt(bound)}", value is not None and value <= bound)


def below(name: str, value: float | None, bound: float) -> Figure:
    return Figure(name, value, f"< {fmt(bound)}", value is not None and value < bound)


def exactly(name: str, value: int | None, expected: int) -> Figure:
    return Figure(name, value, f"= {fmt(expected)}", value == expected)


def all_of(name: str, got: int, total: int) -> Figure:
    return Figure(name, f"{got}/{total}", f"{total}/{total}", got == total and total > 0)


def fmt(value: Any) -> str:
    """Numbers with three significant figures and thousands separators; the rest as is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return "n/a" if value is None else str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value >= 100):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


@dataclass
class Outcome:
    """What one attack measured: its figures, every detail, its server's memory."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: Report = field(default_factory=dict)
    memory: Report | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(f.passed is not False for f in self.figures)


@dataclass
class Run:
    """What every attack needs: the flags, the load generator's listeners, where logs go."""

    args: argparse.Namespace
    load: LoadGen
    log_dir: Path

    @property
    def timeout(self) -> float:
        return float(self.args.timeout)

    def serve(self, stack: contextlib.ExitStack, name: str, *flags: str, **kw: Any) -> Subject:
        """Start a server for one attack; it is stopped when the attack ends, however it ends."""
        subject = Subject(name, self.log_dir, *flags, **kw)
        stack.callback(subject.stop)
        return subject

    def attacker(
        self, stack: contextlib.ExitStack, attack: Callable[..., Any], **kw: Any
    ) -> Attacker:
        """Start an attacking process; it is killed when the attack ends if it still runs."""
        attacker = Attacker(attack, **kw)
        stack.callback(attacker.close)
        return attacker


# --- Pieces the attacks share ----------------------------------------------------------


def join_listeners(run: Run, subject: Subject, *, count: int, driver: bool) -> int:
    """``count`` listeners from the load generator (and its driver): wait until all are in.

    Returns the value the driver was given (0 without a driver).
    """
    join = run.load.join_storm(subject.url, count, run.timeout)
    if join.connected < count:
        raise AttackError(f"only {join.connected} of {count} listeners connected: {join.errors}")
    if not driver:
        return 0
    value = int(
        run.load.drive("driver_connect", run.timeout, url=subject.url, limit=run.timeout)["value"]
    )
    run.load.expect(users=count + 1)
    run.load.wait("users", run.timeout)
    return value


def delivery_latency(run: Run, subject: Subject, start_value: int) -> Report:
    """The driver acts at --rate for --seconds; per listener and action, the delay to see it."""
    args = run.args
    count = max(1, round(args.rate * args.seconds))
    run.load.expect(value=start_value + count, record=True)
    started, cpu = time.monotonic(), cpu_seconds(subject.pid)
    sends = run.load.drive(
        "steady", args.seconds + run.timeout, start_value=start_value, rate=args.rate, count=count
    )["sends"]
    progress = run.load.wait("value", run.timeout)
    busy = (cpu_seconds(subject.pid) - cpu) / (time.monotonic() - started)
    delays, missing = run.load.delays([tuple(send) for send in sends], run.timeout)
    ms = [delay * 1e3 for delay in delays]
    return {
        "actions": count,
        "end_value": start_value + count,
        "p50_ms": percentile(ms, 0.50) if ms else None,
        "p99_ms": percentile(ms, 0.99) if ms else None,
        "max_ms": max(ms, default=None),
        "missing": missing,
        "listeners_reached": progress.reached,
        "server_busy": busy,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def loopback_addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{index + 1}" for index in range(count)]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (index < total % parts) for index in range(parts)]


def dropped_line(peer: str) -> str:
    """A pattern for the server's line when ``peer``'s connection ends."""
    return rf"{re.escape(peer)} (lost|disconnected): "


def dropped_after(users: Sequence[Sequence[float]], count: int) -> int | None:
    """Updates sent by the time the user count went down to ``count`` (from a higher one)."""
    higher = False
    for _, users_now, sent in users:
        if users_now > count:
            higher = True
        elif users_now == count and higher:
            return int(sent)
    return None


def lowered_caps(line: str | None) -> str:
    """The caps the server chose from its open-files warning, in a few words."""
    match = line and re.search(
        r"serving up to (\d+) users, (\d+) pending handshakes, backlog (\d+)", line
    )
    if not match:
        return "no such line"
    users, pending, backlog = match.groups()
    return f"{users} users, {pending} pending, backlog {backlog}"


# --------------------------------------------------------------------------
# The attacks: one function each
# --------------------------------------------------------------------------


def attack_flood(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """1. One client sends --pings ping frames as fast as it can and never reads.

    The listeners' delivery latency is measured without the flood, then with
    it, in the same run, so the ratio compares like with like. The server
    keeps its default keepalive, so the flooder's fate is what it would be
    in production.
    """
    args = run.args
    subject = run.serve(stack, "flood")
    value = join_listeners(run, subject, count=args.listeners, driver=True)
    calm = delivery_latency(run, subject, value)
    before, mark = rss_bytes(subject.pid), subject.mark()
    flood_from, cpu = time.monotonic(), cpu_seconds(subject.pid)
    flooder = run.attacker(
        stack,
        flood_pings,
        port=subject.port,
        source=FLOOD_SOURCE,
        pings=args.pings,
        repeat=False,
        limit=args.fate_timeout + run.timeout,
    )
    ready = flooder.ready(run.timeout)
    peer = f"{FLOOD_SOURCE}:{ready['port']}"
    flooded = delivery_latency(run, subject, calm["end_value"])
    busy = (cpu_seconds(subject.pid) - cpu) / (time.monotonic() - flood_from)
    kernel = subject.snapshot_kernel([peer])
    fate_text = fate(subject, peer, mark, since=ready["started"], limit=args.fate_timeout)
    flood = flooder.finish(run.timeout)["floods"][0]
    growth = (subject.sampler.peak_rss(since=flood_from) - before) / MIB
    queues = kernel.get("peers", {}).get(peer, {})
    outcome.figures += [
        below("server RSS growth while flooding (MiB)", growth, 8),
        info(
            "pings the flooder wrote (into its socket)",
            f"{flood['pings_sent']:,} of {args.pings:,}",
        ),
        info("delivery p50 without / with flood (ms)", pair(calm["p50_ms"], flooded["p50_ms"])),
        at_most("  p50 with flood / without", ratio(flooded["p50_ms"], calm["p50_ms"]), 2),
        info("delivery p99 without / with flood (ms)", pair(calm["p99_ms"], flooded["p99_ms"])),
        at_most("  p99 with flood / without", ratio(flooded["p99_ms"], calm["p99_ms"]), 2),
        all_of("  listeners that saw every action, flooded", seen_all(flooded), args.listeners),
        info("server CPU without / with flood (%)", pair(calm["server_busy"] * 100, busy * 100)),
        info("flooder's fate", fate_text),
        info(
            "kernel: its unread pings / queued pongs (KiB)",
            pair(kib(queues.get("r")), kib(queues.get("w"))),
        ),
    ]
    outcome.details.update(
        calm=calm,
        flooded=flooded,
        flood=flood,
        flood_server_busy=busy,
        rss_before_flood_bytes=before,
        rss_growth_mib=growth,
        fate=fate_text,
        kernel_during_flood=kernel,
    )
    return subject


def fate(subject: Subject, peer: str, mark: int, *, since: float, limit: float) -> str:
    """What became of ``peer`` within ``limit`` seconds ``since``, in the server's words."""
    subject.wait_for_line(dropped_line(peer), mark, max(0.0, since + limit - time.monotonic()))
    for ended, seconds, why in lifetimes(subject.lines_since(mark), peer.partition(":")[0]):
        if ended == peer:
            return f"dropped after {seconds:.1f} s: {why}"
    return f"still connected after {limit:g} s"


def attack_stall(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """2. A client stops reading while updates are queued for it as fast as they go.

    Thousands of updates back up behind it before its first keepalive ping
    is due (the issue's case): the ping then waits behind them, so only the
    liveness deadline can drop it in time.
    """
    return stalled_reader(run, stack, outcome, name="stall", pace=0.0)


def attack_stall_paced(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """2b. The same, with updates paced so that its buffers fill after the first ping.

    The ping goes out, its pong never comes, and the keepalive fails the
    connection: the drop must come as soon, whatever the pace.
    """
    return stalled_reader(run, stack, outcome, name="stall-paced", pace=run.args.stall_pace)


def stalled_reader(
    run: Run, stack: contextlib.ExitStack, outcome: Outcome, *, name: str, pace: float
) -> Subject:
    """Attack 2 at one pace: time the drop, and check that everyone hears of it."""
    args = run.args
    subject = run.serve(
        stack,
        name,
        *("--ping-interval", f"{STALL_PING_INTERVAL:g}"),
        *("--ping-timeout", f"{STALL_PING_TIMEOUT:g}"),
        *("--rate", "0"),  # the driver acts hundreds of times a second
    )
    listeners = args.stall_listeners
    join_listeners(run, subject, count=listeners, driver=False)
    driver = run.attacker(
        stack,
        one_at_a_time,
        port=subject.port,
        source=STALL_DRIVER_SOURCE,
        path="/",
        updates=args.stall_updates,
        pace=pace,
        reconnect=False,
        limit=3 * run.timeout,
    )
    driver.ready(run.timeout)
    run.load.expect(users=listeners + 1)
    run.load.wait("users", run.timeout)
    mark = subject.mark()
    stalled = run.attacker(
        stack,
        stalled_readers,
        port=subject.port,
        source=STALL_SOURCE,
        count=1,
        path="/",
        repeat=False,
        limit=2 * run.timeout,
    )
    ready = stalled.ready(run.timeout)
    driver.tell("go")
    run.load.expect(users=listeners + 2)  # everyone saw it come in...
    run.load.wait("users", run.timeout)
    run.load.expect(users=listeners + 1)  # ...and then go
    peer = f"{STALL_SOURCE}:{ready['ports'][0]}"
    # Before any drop (the deadline is 2 s): what the kernel holds for it by then.
    time.sleep(max(0.0, ready["stopped_at"] + STALL_SNAPSHOT - time.monotonic()))
    kernel = subject.snapshot_kernel([peer])
    progress = run.load.wait("users", run.timeout)
    subject.wait_for_line(dropped_line(peer), mark, run.timeout)
    ended = lifetimes(subject.lines_since(mark), STALL_SOURCE)
    noticed = stalled.finish(run.timeout)["noticed"]
    driven = driver.finish(run.timeout)
    outcome.figures += stall_figures(ready, ended, progress, driven, listeners)
    queued = kernel.get("peers", {}).get(peer, {}).get("w")
    outcome.figures.append(
        info(f"kernel: queued for it at {STALL_SNAPSHOT:g} s (KiB)", kib(queued))
    )
    outcome.details.update(
        stalled=ready, ended=ended, noticed=noticed, driver=driven, kernel_while_stalled=kernel
    )
    return subject


def stall_figures(
    ready: Report,
    ended: Sequence[tuple[str, float, str]],
    progress: Progress,
    driven: Report,
    listeners: int,
) -> list[Figure]:
    deadline = STALL_PING_INTERVAL + STALL_PING_TIMEOUT + 1
    driver_saw = bool(driven["users"]) and driven["users"][-1][1] == listeners + 1
    first_ping = ready["stopped_at"] + STALL_PING_INTERVAL
    return [
        at_most("seconds from its last read to the drop", ended[0][1] if ended else None, deadline),
        info("  why (server log)", ended[0][2] if ended else "no line"),
        all_of("clients that got the new user count", progress.reached + driver_saw, listeners + 1),
        info(
            "  seconds until every listener had it",
            None if progress.last is None else progress.last - ready["stopped_at"],
        ),
        info("updates sent before its first ping was due", sent_by(driven["timeline"], first_ping)),
        info("updates sent before the drop", dropped_after(driven["users"], listeners + 1)),
        info("  one at a time, per second", driven["sent"] / driven["seconds"] or None),
    ]


def sent_by(timeline: Sequence[Sequence[float]], moment: float) -> int:
    """Updates the driver had sent by ``moment`` (to the 50 it notes them by)."""
    return max((int(sent) for when, sent in timeline if when <= moment), default=0)


def attack_silent(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """3a. Silent sockets from one host against a server held to 1024 open files."""
    args = run.args
    subject = run.serve(stack, "silent", open_files_limit=args.silent_open_files)
    caps = next(
        (line.strip() for line in subject.lines_since(0) if "open-files limit" in line), None
    )
    silent = run.attacker(
        stack,
        silent_sockets,
        port=subject.port,
        source=SILENT_SOURCE,
        count=args.silent,
        concurrency=256,
        connect_timeout=3.0,
        limit=2 * run.timeout,
    )
    opened = silent.ready(2 * run.timeout)
    legit = run.attacker(
        stack,
        legit_clients,
        port=subject.port,
        sources=[LEGIT_SOURCE],
        health_source=HEALTH_SOURCE,
    )
    result = legit.result(run.timeout)
    subject.snapshot_kernel()
    held = silent.finish(run.timeout)
    client, health = result["clients"][0], result["health"]
    health_ok = health.get("status") == 200 and health.get("seconds", math.inf) < 1
    outcome.figures += [
        info("lowered caps (server log)", lowered_caps(caps)),
        info(
            f"silent sockets from {SILENT_SOURCE}: connected / open at end",
            f"{opened['connected']:,} of {args.silent:,} / {held['still_open']:,}",
        ),
        below(
            f"WebSocket from {LEGIT_SOURCE}: connect to first event (s)", client.get("seconds"), 1
        ),
        Figure(
            f"/healthz from {HEALTH_SOURCE}",
            f"{health.get('status', health.get('error'))} in {fmt(health.get('seconds'))} s",
            "200 in < 1 s",
            health_ok,
        ),
    ]
    outcome.details.update(caps_line=caps, opened=opened, held=held, legit=result)
    return subject


def attack_silent_limit(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """3b. More silent sockets than this machine's open-files limit, then ten ordinary clients."""
    args = run.args
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        raise AttackError("the open-files limit is unlimited: nothing to exceed")
    count = hard + args.silent_extra
    subject = run.serve(stack, "silent-limit")
    # One process cannot hold more sockets than the limit: several share them.
    attackers = [
        run.attacker(
            stack,
            silent_sockets,
            port=subject.port,
            source=SILENT_SOURCE,
            count=share,
            concurrency=512,
            connect_timeout=3.0,
            limit=3 * run.timeout,
        )
        for share in split(count, math.ceil(count / SOCKETS_PER_PROCESS))
    ]
    opened = [attacker.ready(2 * run.timeout) for attacker in attackers]
    legit = run.attacker(
        stack,
        legit_clients,
        port=subject.port,
        sources=loopback_addresses(LEGIT_NETWORK, args.legit),
        health_source=None,
    )
    result = legit.result(run.timeout)
    subject.snapshot_kernel()
    held = [attacker.finish(run.timeout) for attacker in attackers]
    times = [client["seconds"] for client in result["clients"] if "seconds" in client]
    outcome.figures += [
        info("open-files limit (ulimit -Hn)", hard),
        info(
            f"silent sockets from {SILENT_SOURCE}: connected / open at end",
            f"{sum(o['connected'] for o in opened):,} of {count:,} / "
            f"{sum(h['still_open'] for h in held):,}",
        ),
        all_of(f"ordinary clients from {LEGIT_NETWORK}x that got in", len(times), args.legit),
        info("  slowest connect to first event (s)", max(times, default=None)),
    ]
    outcome.details.update(silent_sockets=count, opened=opened, held=held, legit=result)
    return subject


def attack_per_address(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """4. One address opens --fill connections: only the per-address cap gets in."""
    args = run.args
    subject = run.serve(stack, "per-address", "--max-users", str(args.fill_max_users))
    fill = run.attacker(
        stack,
        fill_connections,
        port=subject.port,
        source=SILENT_SOURCE,
        count=args.fill,
        concurrency=args.fill_concurrency,
        limit=3 * run.timeout,
    )
    outcomes = fill.ready(2 * run.timeout)["outcomes"]
    mark = subject.mark()
    legit = run.attacker(
        stack,
        legit_clients,
        port=subject.port,
        sources=[LEGIT_SOURCE] * args.legit,
        health_source=None,
    )
    result = legit.result(run.timeout)
    subject.snapshot_kernel()
    held = fill.finish(run.timeout)
    others = {k: v for k, v in outcomes.items() if k not in ("in", "429")}
    got_in = sum("seconds" in client for client in result["clients"])
    rejections = sum("rejected" in line for line in subject.lines_since(0))
    outcome.figures += [
        exactly(
            f"connections from {SILENT_SOURCE} that got in", outcomes.get("in", 0), MAX_USERS_PER_IP
        ),
        exactly("  refused with 429", outcomes.get("429", 0), args.fill - MAX_USERS_PER_IP),
        info("  any other outcome", others or "none"),
        all_of(f"clients from {LEGIT_SOURCE} that got in", got_in, args.legit),
        info("rejection warnings in the log (throttled)", rejections),
    ]
    outcome.details.update(outcomes=outcomes, held=held, legit=result, log_after_fill=mark)
    return subject


def attack_pipelined(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """5. Two HTTP requests in one packet, --tries times: the first is answered, nothing breaks."""
    args = run.args
    subject = run.serve(stack, "pipelined")
    mark = subject.mark()
    client = run.attacker(
        stack,
        pipelined_requests,
        port=subject.port,
        source=PIPELINE_SOURCE,
        tries=args.tries,
        limit=3 * run.timeout,
    )
    report = client.result(4 * run.timeout)
    subject.stop()  # every line the attack caused is in the log now
    stats = log_stats(subject.lines_since(mark))
    outcome.figures += [
        all_of("first request answered (200)", report["first_answered"], args.tries),
        info("  second one answered too", report["both_answered"]),
        exactly("ERROR lines in the server log", stats["errors"], 0),
        exactly("tracebacks in the server log", stats["tracebacks"], 0),
    ]
    outcome.details.update(report=report, log=stats)
    return subject


def attack_garbage(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """6. --garbage-clients send bad messages as fast as they can: the log stays small."""
    args = run.args
    subject = run.serve(stack, "garbage")
    senders = run.attacker(
        stack,
        garbage_senders,
        port=subject.port,
        source=GARBAGE_SOURCE,
        clients=args.garbage_clients,
        seconds=args.garbage_seconds,
    )
    senders.ready(run.timeout)
    mark, started, cpu = subject.mark(), time.monotonic(), cpu_seconds(subject.pid)
    time.sleep(args.garbage_seconds / 2)
    subject.snapshot_kernel()  # while it flows
    report = senders.result(args.garbage_seconds + run.timeout)
    busy = (cpu_seconds(subject.pid) - cpu) / (time.monotonic() - started)
    wait_idle(subject.pid, timeout=run.timeout)  # what it read, it has answered and logged
    stats = log_stats(subject.lines_since(mark))
    outcome.figures += [
        at_most("WARNING lines in the server log", stats["warnings"], args.max_warnings),
        info("  all lines / bytes of log", f"{stats['lines']:,} / {stats['bytes']:,}"),
        info(
            "bad messages queued by the clients / answered",
            pair(report["messages_sent"], report["error_replies"]),
        ),
        info("server CPU meanwhile (%)", busy * 100),
    ]
    outcome.details.update(report=report, log=stats, server_busy=busy)
    return subject


def attack_all(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """7. Every attack at once against one server: its RSS stays within the per-connection bound.

    The server runs as in attack 2 (keepalive 1 s / 1 s, no rate limit), so
    that the flooder and the stalled readers are dropped within the window;
    they reconnect and attack again, as an attacker would.
    """
    args = run.args
    subject = run.serve(
        stack,
        "all-at-once",
        *("--ping-interval", f"{STALL_PING_INTERVAL:g}"),
        *("--ping-timeout", f"{STALL_PING_TIMEOUT:g}"),
        *("--rate", "0"),
    )
    value = join_listeners(run, subject, count=args.listeners, driver=True)
    started, cpu, waited = time.monotonic(), cpu_seconds(subject.pid), waiting_seconds(subject.pid)
    attackers = start_everything(run, stack, subject)
    readies = {
        name: attacker.ready(2 * run.timeout)
        for name, attacker in attackers.items()
        if name != "pipelined"  # it reports only when done
    }
    attackers["stall driver"].tell("go")
    latency = delivery_latency(run, subject, value)
    subject.snapshot_kernel()
    time.sleep(max(0.0, started + args.all_seconds - time.monotonic()))
    subject.snapshot_kernel()
    elapsed = time.monotonic() - started
    busy = (cpu_seconds(subject.pid) - cpu) / elapsed
    starved = (waiting_seconds(subject.pid) - waited) / elapsed
    reports = {name: finish_attacker(name, attacker, run) for name, attacker in attackers.items()}
    subject.stop()
    stalled = lifetimes(subject.process.lines, STALL_SOURCE)
    outcome.figures += bound_figures(subject, args.bound_kib)
    outcome.figures += [
        info(
            "server on a CPU / waiting for one (% of the window)", pair(busy * 100, starved * 100)
        ),
        info("delivery p50 / p99 meanwhile (ms)", pair(latency["p50_ms"], latency["p99_ms"])),
        info("floods: connections / pings sent", flood_summary(reports["flood"])),
        info("stalled readers dropped / slowest drop (s)", stall_summary(stalled)),
        info(
            "fill: got in / 429",
            pair(readies["fill"]["outcomes"].get("in"), readies["fill"]["outcomes"].get("429")),
        ),
        info(
            "pipelined tries / first answered",
            pair(reports["pipelined"]["tries"], reports["pipelined"]["first_answered"]),
        ),
        info("garbage: error replies read", reports["garbage"]["error_replies"]),
    ]
    outcome.details.update(
        latency=latency,
        readies=readies,
        reports=reports,
        stalled=stalled,
        server_busy=busy,
        server_waiting_for_cpu=starved,
    )
    return subject


def bound_figures(subject: Subject, bound_kib: float) -> list[Figure]:
    """Peak RSS against the idle RSS plus ``bound_kib`` per connection held at the peak."""
    memory = subject.memory()
    allowed = subject.idle_rss + bound_kib * 1024 * memory["connections_at_peak"]
    return [
        info("connections held at the peak (open sockets)", memory["connections_at_peak"]),
        info(
            "server RSS idle / peak (MiB)",
            pair(subject.idle_rss / MIB, memory["peak_rss_bytes"] / MIB),
        ),
        Figure(
            "peak RSS / idle + bound x connections (MiB)",
            pair(memory["peak_rss_bytes"] / MIB, allowed / MIB),
            f"bound {bound_kib:g} KiB",
            memory["peak_rss_bytes"] <= allowed,
        ),
    ]


def attack_bound_text(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """8a. The most RSS a connection can cost: 6-byte text frames, never reading the replies."""
    return costliest_connections(run, stack, outcome, name="bound-text", frame=EMPTY_TEXT)


def attack_bound_ping(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """8b. The same with 6-byte pings: each asks for a pong the client will not read."""
    return costliest_connections(run, stack, outcome, name="bound-ping", frame=EMPTY_PING)


def costliest_connections(
    run: Run, stack: contextlib.ExitStack, outcome: Outcome, *, name: str, frame: bytes
) -> Subject:
    """--bound-clients connections each fill the server's receive buffer with ``frame``.

    The RSS growth per connection is the bound's measurement: no attack
    above costs a connection more. The kernel's share (``ss``) is apart.
    """
    args = run.args
    subject = run.serve(stack, name, "--rate", "0")
    sources = loopback_addresses(BOUND_NETWORK, math.ceil(args.bound_clients / 50))
    clients = run.attacker(
        stack,
        smallest_frames,
        port=subject.port,
        sources=sources,
        per_source=args.bound_clients // len(sources),
        frame=frame,
        limit=3 * run.timeout,
    )
    ready = clients.ready(2 * run.timeout)
    wait_idle(subject.pid, timeout=run.timeout)  # parsed and answered all it will
    kernel = subject.snapshot_kernel()
    clients.finish(run.timeout)
    memory = subject.memory()
    growth = memory["peak_rss_bytes"] - subject.idle_rss
    outcome.figures += [
        info("connections / bytes they sent", pair(ready["connected"], ready["bytes_sent"])),
        at_most(
            "RSS growth per connection (KiB)", growth / 1024 / ready["connected"], args.bound_kib
        ),
        info(
            "kernel per socket: unread / queued to send (KiB)",
            pair(
                kib(kernel.get("received_unread_bytes", 0) / max(1, kernel.get("sockets", 1))),
                kib(kernel.get("queued_to_send_bytes", 0) / max(1, kernel.get("sockets", 1))),
            ),
        ),
    ]
    outcome.details.update(ready=ready, kernel_at_peak=kernel)
    return subject


def start_everything(
    run: Run, stack: contextlib.ExitStack, subject: Subject
) -> dict[str, Attacker]:
    """Every attacker of attacks 1-6, against one server, each from its own address."""
    args = run.args
    port = subject.port
    limit = args.all_seconds + 2 * run.timeout
    start = functools.partial(run.attacker, stack, port=port)
    return {
        "flood": start(
            flood_pings, source=FLOOD_SOURCE, pings=args.pings, repeat=True, limit=limit
        ),
        "stalled": start(
            stalled_readers,
            source=STALL_SOURCE,
            count=args.all_stalled,
            path=STALL_ROOM,
            repeat=True,
            limit=limit,
        ),
        "stall driver": start(
            one_at_a_time,
            source=STALL_DRIVER_SOURCE,
            path=STALL_ROOM,
            updates=10**9,
            pace=0.0,
            reconnect=True,
            limit=limit,
        ),
        "silent": start(
            silent_sockets,
            source=SILENT_SOURCE,
            count=args.silent,
            concurrency=256,
            connect_timeout=3.0,
            limit=limit,
        ),
        "fill": start(
            fill_connections,
            source=FILL_SOURCE_ALL,
            count=args.fill,
            concurrency=args.fill_concurrency,
            limit=limit,
        ),
        "pipelined": start(
            pipelined_requests, source=PIPELINE_SOURCE, tries=10**9, limit=args.all_seconds
        ),
        "garbage": start(
            garbage_senders,
            source=GARBAGE_SOURCE,
            clients=args.garbage_clients,
            seconds=args.all_seconds,
        ),
    }


def finish_attacker(name: str, attacker: Attacker, run: Run) -> Report:
    """Its final report: those that hold connections are told to stop, the others have ended."""
    if name in ("pipelined", "garbage"):
        return attacker.result(run.timeout)
    return attacker.finish(run.timeout)


def flood_summary(report: Report) -> str:
    floods = report["floods"]
    return f"{len(floods)} / {sum(flood['pings_sent'] for flood in floods):,}"


def stall_summary(ended: Sequence[tuple[str, float, str]]) -> str:
    return f"{len(ended)} / {fmt(max((seconds for _, seconds, _ in ended), default=None))}"


def seen_all(latency: Report) -> int:
    """Listeners that saw every action of a latency window (all of them, or none is claimed)."""
    return int(latency["listeners_reached"]) if latency["missing"] == 0 else 0


def kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def pair(first: Any, second: Any) -> str:
    return f"{fmt(first)} / {fmt(second)}"


# --------------------------------------------------------------------------
# Running them, and the report
# --------------------------------------------------------------------------

AttackFunction = Callable[[Run, contextlib.ExitStack, Outcome], Subject]

ATTACKS: dict[str, tuple[str, AttackFunction]] = {
    "flood": ("1 ping flood", attack_flood),
    "stall": ("2 stalled reader, fast", attack_stall),
    "stall-paced": ("2b stalled reader, paced", attack_stall_paced),
    "silent": ("3a silent sockets, 1024 files", attack_silent),
    "silent-limit": ("3b silent sockets, real limit", attack_silent_limit),
    "per-address": ("4 per-address cap", attack_per_address),
    "pipelined": ("5 pipelined HTTP", attack_pipelined),
    "garbage": ("6 garbage senders", attack_garbage),
    "all": ("7 all at once", attack_all),
    "bound-text": ("8a costliest: 6-byte texts", attack_bound_text),
    "bound-ping": ("8b costliest: 6-byte pings", attack_bound_ping),
}


def say(message: str) -> None:
    """Progress for the person waiting; the results go to stdout at the end."""
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_attack(run: Run, key: str) -> Outcome:
    """One attack from start to clean-up; a failure is recorded, not raised."""
    title, attack = ATTACKS[key]
    outcome = Outcome(key, title)
    say(title)
    subject = None
    try:
        with contextlib.ExitStack() as stack:
            subject = attack(run, stack, outcome)
    except (AttackError, LoadGenError, RuntimeError, OSError, TimeoutError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(LoadGenError):
            run.load.reset()
    if subject is not None:  # stopped by now: its exit and its peaks are known
        exit_report = subject.stop()
        outcome.memory = subject.memory()
        outcome.details["server"] = {"flags": subject.flags, **exit_report}
        outcome.figures.append(
            Figure(
                "server exit code / tracebacks in its log",
                pair(exit_report["exit_code"], exit_report["tracebacks"]),
                "0 / 0",
                exit_report["exit_code"] == 0 and exit_report["tracebacks"] == 0,
            )
        )
    return outcome


def verdict(passed: bool | None) -> str:
    return "" if passed is None else "PASS" if passed else "FAIL"


def figures_table(outcomes: Sequence[Outcome]) -> str:
    """Every figure under its attack, with its target and verdict."""
    widths = (30, 50, 24, 14)
    header = ("attack", "figure", "value", "target")
    lines = [row_text(header, widths, "")]
    lines.append("-" * (sum(widths) + 4 + 4))
    for outcome in outcomes:
        title = outcome.title
        if outcome.error is not None:
            lines.append(row_text((title, "finished", "no", "yes"), widths, "FAIL"))
            lines.append(f"{'':{widths[0]}}   {outcome.error}")
            title = ""
        for figure in outcome.figures:
            cells = (title, figure.name, fmt(figure.value), figure.target)
            lines.append(row_text(cells, widths, verdict(figure.passed)))
            title = ""
    return "\n".join(lines)


def row_text(cells: Sequence[str], widths: Sequence[int], mark: str) -> str:
    """One row; a value too long for its column goes on its own line below."""
    title, name, value, target = cells
    shown = "(below)" if len(value) > widths[2] else value
    line = f"{title:{widths[0]}} {name:{widths[1]}} {shown:>{widths[2]}} {target:{widths[3]}}"
    line = f"{line} {mark}".rstrip()
    if shown != value:
        line += f"\n{'':{widths[0]}}   -> {value}"
    return line


def memory_table(outcomes: Sequence[Outcome], bound_kib: float) -> str:
    """RSS growth per connection held, per attack, and the kernel's side apart."""
    lines = [
        f"{'server memory':30} {'idle RSS':>9} {'peak RSS':>9} {'held':>6} {'RSS growth':>11}"
        f" {'kernel':>9} {'kernel':>11}",
        f"{'':30} {'(MiB)':>9} {'(MiB)':>9} {'conns':>6} {'KiB/conn':>11}"
        f" {'(KiB)':>9} {'KiB/socket':>11}",
    ]
    worst: list[float] = []
    for outcome in outcomes:
        memory = outcome.memory
        if memory is None:
            continue
        per = memory["kib_per_connection"]
        if per is not None:
            worst.append(per)
        kernel = memory["kernel"].get("charged_bytes")
        lines.append(
            f"{outcome.title:30} {memory['idle_rss_bytes'] / MIB:9.1f}"
            f" {memory['peak_rss_bytes'] / MIB:9.1f} {memory['connections_at_peak']:6,}"
            f" {fmt(per):>11} {fmt(kib(kernel)):>9} {fmt(memory['kernel_kib_per_socket']):>11}"
        )
    if worst:
        lines.append(
            f"largest RSS growth per connection held: {max(worst):.1f} KiB"
            f" (the bound checked in attacks 7 and 8: {bound_kib:g} KiB)"
        )
    lines.append(
        "(a row with few connections held shows fixed costs, not a per-connection one;"
        " kernel: ss at one moment, not in RSS)"
    )
    return "\n".join(lines)


def environment() -> Report:
    """What the figures depend on: versions, CPUs, load, the limit, the commit."""
    versions: dict[str, str | None] = {}
    for package in ("websockets", "uvloop", "picows"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        **versions,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "open_files_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "commit": commit or None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(
    path: Path, args: argparse.Namespace, env: Report, outcomes: Sequence[Outcome]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "environment": env,
        "passed": all(outcome.passed for outcome in outcomes),
        "attacks": {outcome.key: asdict(outcome) for outcome in outcomes},
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def attack_names(text: str) -> list[str]:
    """An argparse type: attack names separated by commas, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown attack {', '.join(unknown) or '(none)'}; choose from {', '.join(ATTACKS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.attack",
        description="Rerun issue 9's attacks against a real server and check each figure "
        "against its target. Exit status 1 if a target failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--only",
        type=attack_names,
        default=",".join(ATTACKS),
        metavar="NAMES",
        help=f"attacks to run, comma-separated: {', '.join(ATTACKS)}",
    )
    add(
        "--listeners",
        type=int,
        default=50,
        help="clients whose delivery latency is measured (attacks 1, 2, 7)",
    )
    add(
        "--workers",
        type=int,
        default=4,
        help="load generator processes holding the listeners; each has its own address, "
        f"and at most {MAX_PENDING_PER_IP} handshakes per address may be in flight",
    )
    add("--rate", type=float, default=20.0, help="the latency driver's actions per second")
    add("--seconds", type=float, default=5.0, help="length of each latency measurement")
    add("--pings", type=int, default=600_000, help="ping frames the flooder sends (attack 1)")
    add(
        "--fate-timeout",
        type=float,
        default=PING_INTERVAL + PING_TIMEOUT + 10,
        help="seconds to wait for the server to drop the flooder (attack 1; a default "
        "server's liveness deadline is ping interval + ping timeout)",
    )
    add(
        "--stall-listeners",
        type=int,
        default=10,
        help="clients that must hear of the stalled reader's drop (attack 2); few, so that "
        "each update is cheap and the driver fills the buffers before the first ping",
    )
    add(
        "--stall-pace",
        type=float,
        default=700.0,
        help="updates per second in attack 2b: about 1,000 fill a stalled client's buffers, "
        "so at this pace they fill after its first ping (1 s) and before the pong is due (2 s)",
    )
    add(
        "--stall-updates",
        type=int,
        default=10_000,
        help="updates sent one at a time while a client does not read (attack 2)",
    )
    add(
        "--silent",
        type=int,
        default=1100,
        help="silent sockets against the server held to --silent-open-files (attacks 3a, 7)",
    )
    add(
        "--silent-open-files",
        type=int,
        default=1024,
        help="the open-files limit the server of attack 3a cannot raise",
    )
    add(
        "--silent-extra",
        type=int,
        default=200,
        help="attack 3b opens the hard open-files limit plus this many silent sockets",
    )
    add(
        "--legit",
        type=int,
        default=10,
        help="ordinary clients that must get in despite attacks 3b and 4",
    )
    add("--fill", type=int, default=500, help="connections from one address (attacks 4, 7)")
    add("--fill-max-users", type=int, default=500, help="--max-users of attack 4's server")
    add(
        "--fill-concurrency",
        type=int,
        default=10,
        help="handshakes the filling address keeps in flight",
    )
    add("--tries", type=int, default=200, help="pipelined two-request packets (attack 5)")
    add("--garbage-clients", type=int, default=50, help="garbage senders (attacks 6, 7)")
    add("--garbage-seconds", type=float, default=5.0, help="how long they send (attack 6)")
    add(
        "--max-warnings",
        type=int,
        default=300,
        help="attack 6's target: WARNING lines the garbage may cause at most",
    )
    add("--all-seconds", type=float, default=15.0, help="length of attack 7 (all at once)")
    add("--all-stalled", type=int, default=5, help="stalled readers in attack 7")
    add(
        "--bound-kib",
        type=float,
        default=320.0,  # the per-connection bound the project's README documents
        help="RSS growth per connection held that attacks 7 and 8 must stay within",
    )
    add(
        "--bound-clients",
        type=int,
        default=100,
        help="connections of attack 8, 50 per address",
    )
    add(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds any one step may take before the attack counts as failed",
    )
    add(
        "--json",
        type=Path,
        default=REPO_ROOT / "bench" / "results" / "attack.json",
        help="where the figures and every detail go",
    )
    add(
        "--log-dir",
        type=Path,
        default=REPO_ROOT / "bench" / "results" / "attack-logs",
        help="where each server's log goes",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    env = environment()
    say(f"attacks: {', '.join(args.only)} (load average {env['load_average'][0]:.2f})")
    try:
        with LoadGen(workers=args.workers, host=HOST) as load:
            run = Run(args, load, args.log_dir)
            outcomes = [run_attack(run, key) for key in args.only]
    except LoadGenError as exc:
        print(f"bench.attack: {exc}", file=sys.stderr)
        return 2
    print(figures_table(outcomes))
    print()
    print(memory_table(outcomes, args.bound_kib))
    write_json(args.json, args, env, outcomes)
    passed = all(outcome.passed for outcome in outcomes)
    print(f"\n{'all targets met' if passed else 'some targets FAILED'}; details in {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
