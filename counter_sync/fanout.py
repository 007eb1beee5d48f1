"""Fan-out with backpressure: bytes to many connections, none of them able to hold it up.

The library's ``broadcast()`` writes to every open connection and has no
backpressure: a client that stops reading would make the server queue every
update for it forever. Here a delivery skips a connection whose write buffer
is full, and once that buffer drains, the connection is sent the latest user
count, value and acknowledgement. State messages carry the absolute value,
so a skipped client loses nothing: it ends on the exact value.

Frames are serialized once per flush and written as raw bytes: every
connection of a room gets the same bytes for the same message, and a
connection's share of one flush (users, state, its ack) leaves in one write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Protocol

from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from counter_sync.config import (
    BROADCAST_SLICE,
    SOCKET_RECEIVE_BUFFER,
    SOCKET_SEND_BUFFER,
    WRITE_BUFFER_LIMIT,
)
from counter_sync.connection import Connection
from counter_sync.metrics import Metrics
from counter_sync.tasks import Supervisor

__all__ = ["Audience", "Delivery", "FanOut", "cap_socket_buffers", "text_frame"]

log = logging.getLogger("counter_sync.fanout")


class Audience(Protocol):
    """What a lagging connection catches up on: its room's latest messages for it."""

    def latest_messages(self, websocket: Connection) -> tuple[str, ...]:
        """The messages that bring ``websocket`` up to date (users, state, its ack)."""


def text_frame(message: str) -> bytes:
    """Serialize a text frame once, to write the same bytes to every connection.

    These are the bytes ``protocol.send_text()`` produces for each connection
    inside ``broadcast()``: server frames are not masked and compression is
    off, so nothing differs between connections (``tests/test_protocol.py``
    checks it). Building the frame once saves its per-connection cost.
    """
    return Frame(Opcode.TEXT, message.encode()).serialize(mask=False)


@dataclasses.dataclass(slots=True)
class Delivery:
    """What one flush of a room writes: the same bytes to many, a few bytes to some.

    ``everyone`` goes to each of ``targets`` (the room's users when the flush
    began), ``welcome`` instead to the ``newcomers`` among them (users, then
    state: their first messages), and ``extras[websocket]`` after either
    (acks and errors for one connection).
    """

    targets: list[Connection]
    everyone: bytes = b""
    welcome: bytes = b""
    newcomers: list[Connection] = dataclasses.field(default_factory=list)
    extras: dict[Connection, bytes] = dataclasses.field(default_factory=dict)


class FanOut:
    """Writes deliveries, and owns the catch-up of the connections it skipped."""

    def __init__(self, metrics: Metrics, supervisor: Supervisor) -> None:
        self.metrics = metrics
        self.supervisor = supervisor
        # Connections skipped for a full buffer, each with a catch-up task.
        self.lagging: set[Connection] = set()

    def deliver(
        self, delivery: Delivery, audience: Audience, on_done: Callable[[float], None]
    ) -> None:
        """Write a delivery; call ``on_done`` with the seconds its writes took, once all are done.

        Timed by the wall clock, not the thread's CPU clock: reading that is
        a system call on a virtual machine, 5% of a join storm's samples;
        around writes that never await, the two differ only if another
        process preempts them (see docs/design.md).

        Newcomers and extras are written at once. A big room's broadcast
        goes on in slices of ``BROADCAST_SLICE`` connections, one per
        event-loop turn, so that it never holds up a small room's flush; then
        ``on_done`` is called from a task.
        """
        began = time.perf_counter()
        extras = delivery.extras
        sent, skipped = self._write_slice(
            delivery.newcomers, delivery.welcome, extras, audience, 0, 0
        )
        rest: list[Connection] = []
        if delivery.everyone and delivery.newcomers:
            welcomed = set(delivery.newcomers)
            rest = [ws for ws in delivery.targets if ws not in welcomed]
        elif delivery.everyone:
            rest = delivery.targets  # a list of its own, taken for this delivery
        else:  # nothing for everyone: only those with extras
            rest = list(extras)
        first, rest = rest[:BROADCAST_SLICE], rest[BROADCAST_SLICE:]
        sent, skipped = self._write_slice(first, delivery.everyone, extras, audience, sent, skipped)
        self._count(sent, skipped)
        busy = time.perf_counter() - began
        if not rest:
            on_done(busy)
            return
        self.supervisor.start(
            self._write_rest(rest, delivery, audience, busy, on_done), name="fan-out slices"
        )

    async def _write_rest(
        self,
        rest: list[Connection],
        delivery: Delivery,
        audience: Audience,
        busy: float,
        on_done: Callable[[float], None],
    ) -> None:
        """The slices after the first, one per event-loop turn."""
        for start in range(0, len(rest), BROADCAST_SLICE):
            await asyncio.sleep(0)
            began = time.perf_counter()
            sent, skipped = self._write_slice(
                rest[start : start + BROADCAST_SLICE],
                delivery.everyone,
                delivery.extras,
                audience,
                0,
                0,
            )
            self._count(sent, skipped)
            busy += time.perf_counter() - began
        on_done(busy)

    def _write_slice(
        self,
        websockets: list[Connection],
        everyone: bytes,
        extras: dict[Connection, bytes],
        audience: Audience,
        sent: int,
        skipped: int,
    ) -> tuple[int, int]:
        """Write ``everyone`` (and its extras, taken out) to each connection that keeps up.

        The hot path: one value to a whole room (or the welcome to its
        newcomers), straight to the kernel with ``os.write`` (a
        ``transport.write`` costs 20% more) where the connection allows it
        (``Connection.write_fd``); anything else goes the long way,
        :meth:`_write`. Inlined, because a call per connection
        would cost as much as the write itself.
        """
        lagging, write = self.lagging, os.write
        for websocket in websockets:
            data = everyone
            if extras and (extra := extras.pop(websocket, b"")):
                data += extra
            fd = websocket.write_fd
            if fd < 0 or (lagging and websocket in lagging):
                sent, skipped = self._tally(self._write(websocket, data, audience), sent, skipped)
                continue
            try:
                written = write(fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:  # reset by the peer: the transport sees it too
                websocket.write_fd = -1
                log.warning("%s skipped: %s", websocket.client, exc)
                continue
            if written < len(data):  # the kernel's buffer is full: the transport keeps the rest
                websocket.transport.write(data[written:])
                websocket.write_fd = -1
            sent += 1
        return sent, skipped

    @staticmethod
    def _tally(written: bool | None, sent: int, skipped: int) -> tuple[int, int]:
        if written is None:
            return sent, skipped
        return (sent + 1, skipped) if written else (sent, skipped + 1)

    def _write(self, websocket: Connection, data: bytes, audience: Audience) -> bool | None:
        """Write through the transport unless the connection lags: True written, False skipped.

        None: not open, nothing to do. Like ``broadcast()``, one failure never
        stops the others. A connection over ``WRITE_BUFFER_LIMIT`` is skipped
        and caught up once it drains; one whose transport has drained gets
        the direct path back.
        """
        transport = websocket.transport
        if websocket.protocol.state is not State.OPEN or transport.is_closing():
            return None
        if websocket in self.lagging:
            return False
        if websocket.paused_for_writes or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self._start_catch_up(websocket, audience)
            return False
        try:
            websocket.write(data)  # with the handshake's response, if it is held
        except Exception as exc:
            log.warning("%s skipped: %s", websocket.client, exc)
            return None
        websocket.check_direct()
        return True

    def _count(self, sent: int, skipped: int) -> None:
        # Counted once per slice, not per frame: the loop above is the hot path.
        if sent:
            self.metrics.frames_sent.inc(sent)
        if skipped:
            self.metrics.slow_consumer_skips.inc(skipped)

    def _start_catch_up(self, websocket: Connection, audience: Audience) -> None:
        self.metrics.catch_ups.inc()
        self.lagging.add(websocket)
        self.supervisor.start(self._catch_up(websocket, audience), name="catch-up")

    async def _catch_up(self, websocket: Connection, audience: Audience) -> None:
        """Once the buffer drains, send what the connection missed: the latest of each kind."""
        sent: tuple[str, ...] = ()
        try:
            # send() returns once the buffer is below the low-water mark; by
            # then newer values may exist, so loop until the client has them.
            while (latest := audience.latest_messages(websocket)) != sent:
                for index, message in enumerate(latest):
                    if index >= len(sent) or sent[index] != message:
                        await websocket.send(message)
                sent = latest
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
