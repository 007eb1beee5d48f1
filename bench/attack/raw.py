"""Attackers on plain blocking sockets: they send what they like and never read.

Each runs in its own process (:class:`bench.attack.channel.Attacker`) and
connects from the loopback address it is given.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections import Counter
from collections.abc import Sequence

from bench.attack.channel import Channel, describe
from bench.reporting import Report
from testkit.rawclient import (
    HOST,
    SMALL_RCVBUF,
    bound_socket,
    client_frame,
    raw_websocket,
    tcp_open,
)

__all__ = [
    "EMPTY_PING",
    "EMPTY_TEXT",
    "flood_pings",
    "pipelined_requests",
    "smallest_frames",
    "stalled_readers",
]

PING = client_frame(0x9, b"ping")
PINGS_PER_WRITE = 10_000
UNSOLICITED_PONG = client_frame(0xA, b"")
EMPTY_TEXT = client_frame(0x1, b"")  # the smallest frames there are
EMPTY_PING = client_frame(0x9, b"")
PROBE_PERIOD = 0.1  # seconds between a stalled client's pongs
# What a pipelined client sends in one packet: two requests, the second one
# before the first is answered.
PIPELINED = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
)


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
