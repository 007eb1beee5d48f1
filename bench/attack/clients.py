"""Attackers on asyncio: a driver that starves a stalled reader, silent sockets, crowds, garbage.

Each runs in its own process (:class:`bench.attack.channel.Attacker`) and
connects from the loopback address it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from bench.attack.channel import Channel, describe
from bench.reporting import Report
from testkit.processes import TIMEOUT
from testkit.rawclient import HOST, RawClient, client_frame, connected_socket, tcp_open

__all__ = [
    "fill_connections",
    "garbage_senders",
    "legit_clients",
    "one_at_a_time",
    "silent_sockets",
]

PLUS = json.dumps({"action": "plus"})
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


# --- Attack 2: the driver that fills a stalled reader's buffers ---------------------


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


# --- Attack 3: silent sockets, and the clients that must still get in ---------------


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
