"""Fan-out with backpressure: one frame to many connections, none of them able to hold it up.

The library's ``broadcast()`` writes to every open connection and has no
backpressure: a client that stops reading would make the server queue every
update for it forever. Here a broadcast skips a connection whose write buffer
is full, and once that buffer drains, the connection is sent the latest user
count and value. State messages carry the absolute value, so a skipped client
loses nothing: it ends on the exact value.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from counter_sync.config import (
    BROADCAST_SLICE,
    SOCKET_RECEIVE_BUFFER,
    SOCKET_SEND_BUFFER,
    WRITE_BUFFER_LIMIT,
)
from counter_sync.metrics import Metrics

__all__ = ["Audience", "FanOut", "cap_socket_buffers", "format_peer", "text_frame"]

log = logging.getLogger("counter-sync")


class Audience(Protocol):
    """What a lagging connection catches up on: its room's latest numbers."""

    @property
    def value(self) -> int: ...

    def count_users(self) -> int: ...

    def users_message(self) -> str: ...

    def state_message(self) -> str: ...


def text_frame(message: str) -> bytes:
    """Serialize a text frame once, to write the same bytes to every connection.

    These are the bytes ``protocol.send_text()`` produces for each connection
    inside ``broadcast()``: server frames are not masked and compression is
    off, so nothing differs between connections (``tests/test_protocol.py``
    checks it). Building the frame once saves its per-connection cost.
    """
    return Frame(Opcode.TEXT, message.encode()).serialize(mask=False)


class FanOut:
    """Writes broadcasts, and owns the catch-up of the connections it skipped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # Connections skipped for a full buffer, each with a catch-up task.
        self.lagging: set[ServerConnection] = set()
        self.background: set[asyncio.Task[None]] = set()

    async def send(
        self, message: str, websockets: Iterable[ServerConnection], audience: Audience
    ) -> float:
        """Send to every connection that keeps up; the others catch up when drained.

        A big room is written to in slices of ``BROADCAST_SLICE`` connections,
        one per event-loop turn, so that a burst in it never holds up a small
        room for a whole broadcast. Return the CPU seconds the writes took
        (the flush paces itself on it; the turns between slices are not its).
        """
        self.metrics.broadcasts.inc()
        frame = text_frame(message)
        targets = list(websockets)  # the room may change between slices
        busy = 0.0
        for start in range(0, len(targets), BROADCAST_SLICE):
            if start:
                await asyncio.sleep(0)
            began = time.thread_time()
            self.write(frame, targets[start : start + BROADCAST_SLICE], audience)
            busy += time.thread_time() - began
        return busy

    def write(self, frame: bytes, websockets: list[ServerConnection], audience: Audience) -> None:
        sent = skipped = 0
        for websocket in websockets:
            # Like broadcast(): only open connections, and one failure never
            # stops the others.
            if websocket in self.lagging or websocket.protocol.state is not State.OPEN:
                skipped += websocket in self.lagging
                continue
            transport = websocket.transport
            if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                self.start_catch_up(websocket, audience)
                skipped += 1
                continue
            try:
                transport.write(frame)
            except Exception as exc:
                log.warning("%s skipped: %s", format_peer(websocket), exc)
            else:
                sent += 1
        # Counted once per slice, not per frame: the loop above is the hot path.
        self.metrics.frames_sent.inc(sent)
        if skipped:
            self.metrics.slow_consumer_skips.inc(skipped)

    def start_catch_up(self, websocket: ServerConnection, audience: Audience) -> None:
        self.metrics.catch_ups.inc()
        self.lagging.add(websocket)
        task = asyncio.create_task(self.catch_up(websocket, audience))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def catch_up(self, websocket: ServerConnection, audience: Audience) -> None:
        """Once the buffer drains, send the latest users and state (latest wins)."""
        sent_users: int | None = None
        sent_value: int | None = None
        try:
            # send() returns once the buffer is below the low-water mark; by
            # then newer values may exist, so loop until the client has them.
            while (audience.count_users(), audience.value) != (sent_users, sent_value):
                if audience.count_users() != sent_users:
                    sent_users = audience.count_users()
                    await websocket.send(audience.users_message())
                else:
                    sent_value = audience.value
                    await websocket.send(audience.state_message())
        except ConnectionClosed:
            pass  # the handler logs and unregisters it
        finally:
            self.lagging.discard(websocket)


def cap_socket_buffers(sock: socket.socket) -> None:
    """Cap the kernel's buffers of a listening socket; the accepted ones inherit the caps.

    Send side: Linux would autotune it to hundreds of KiB, where a stalled
    reader hoards thousands of stale updates. Receive side: one read takes
    what the kernel holds, and a client's pings are answered per read, so a
    small buffer bounds the pongs one read can queue.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RECEIVE_BUFFER)


def format_peer(websocket: ServerConnection) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown peer"
