"""One client connection, hardened: what the library's ServerConnection adds up to.

The library's connection answers pings as they arrive and queues the pongs
whether or not the peer reads them, so a peer that floods pings and never
reads makes the server's memory grow without bound. Its keepalive ping waits
behind a full write buffer, so a peer that stops reading is never dropped.
And a second HTTP request pipelined behind the first one, before the
handshake is answered, is parsed as WebSocket frames and breaks the handshake.
:class:`Connection` closes the three holes:

* **Read-side backpressure.** While the write buffer is over its limit, the
  connection stops reading: the peer's pings, bad messages and actions wait
  in its own socket buffers, and nothing more is produced for it.
* **A liveness deadline.** A connection whose write buffer has not drained
  below the limit for ``ping_interval + ping_timeout`` is aborted by
  :class:`LivenessWatch`; the library's keepalive covers the others.
* **One request per handshake.** Bytes after the first request's head are
  dropped until the handshake is answered (RFC 6455: a client waits for the
  response before it sends anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State
from websockets.server import ServerProtocol

from counter_sync.admission import Gate
from counter_sync.metrics import Metrics

__all__ = ["Connection", "LivenessWatch", "disconnect_kind"]

log = logging.getLogger("counter-sync")

END_OF_HEAD = b"\r\n\r\n"


class Connection(ServerConnection):
    """A server connection with read-side backpressure, stall tracking and pending accounting."""

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Server,
        *,
        gate: Gate,
        watch: LivenessWatch,
        metrics: Metrics,
        **options: Any,
    ) -> None:
        super().__init__(protocol, server, **options)
        self.gate = gate
        self.metrics = metrics
        self.watch = watch
        self.peer_ip = ""
        self.pending = False  # counted among the handshakes in progress
        # Why reading is paused: the library's full queue of received
        # messages, our full write buffer, or both.
        self.reading_held_for: set[str] = set()
        self.reading_paused = False
        self.stalled_since: float | None = None
        self.head_seen = b""  # the request head so far, until its end is seen
        self.drop_reason: str | None = None

    # Admission before the handshake: count it, or refuse it at once.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        # The library pauses reading while its queue of received messages is
        # full; reading must also wait for our write buffer: both must agree.
        self.recv_messages.pause = lambda: self.hold_reading("queue", True)
        self.recv_messages.resume = lambda: self.hold_reading("queue", False)
        if self.gate.admit_pending(self.peer_ip):
            self.pending = True
        else:
            # Before a byte is read: an open file costs more than a reset.
            self.metrics.handshakes_rejected.labels("pending").inc()
            self.transport.abort()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self.end_pending()

    def end_pending(self) -> None:
        if self.pending:
            self.pending = False
            self.gate.end_pending(self.peer_ip)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.end_pending()
        self.watch.stalled.discard(self)

    # One request per handshake.

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is State.CONNECTING:
            data = self.first_request_head(data)
            if not data:
                return
        super().data_received(data)

    def first_request_head(self, data: bytes) -> bytes:
        """The part of ``data`` up to the end of the first request's head; drop the rest."""
        if self.head_seen.endswith(END_OF_HEAD):
            return b""  # a pipelined request: its answer would break this one's
        # The end may straddle two reads: look at the last bytes seen too.
        tail = self.head_seen[-3:]
        end = (tail + data).find(END_OF_HEAD)
        if end >= 0:
            data = data[: end + len(END_OF_HEAD) - len(tail)]
        self.head_seen = (tail + data)[-len(END_OF_HEAD) :]
        return data

    # Read-side backpressure and the stall clock.

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stalled_since = self.loop.time()
        self.watch.stalled.add(self)
        self.hold_reading("writes", True)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stalled_since = None
        self.watch.stalled.discard(self)
        self.hold_reading("writes", False)

    def hold_reading(self, reason: str, hold: bool) -> None:
        """Pause reading while any reason holds it; resume once none does."""
        if hold:
            self.reading_held_for.add(reason)
        else:
            self.reading_held_for.discard(reason)
        paused = bool(self.reading_held_for)
        if paused == self.reading_paused or self.transport.is_closing():
            return
        self.reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def drop(self, reason: str) -> None:
        """Abort the TCP connection; the handler logs ``reason`` when it sees it go."""
        self.drop_reason = reason
        self.transport.abort()


class LivenessWatch:
    """Aborts connections whose write buffer stays full past the deadline.

    Only stalled connections are looked at, so the sweep costs nothing while
    everyone keeps up. ``deadline`` is ``ping_interval + ping_timeout``; None
    (keepalive off) never aborts.
    """

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.stalled: set[Connection] = set()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.deadline is not None:
            self.task = asyncio.create_task(self.run(self.deadline))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self, deadline: float) -> None:
        # A quarter of the deadline, at most a second apart: a stalled peer
        # goes within the deadline plus a second.
        period = min(1.0, deadline / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            for connection in list(self.overdue(loop.time(), deadline)):
                connection.drop(
                    f"liveness deadline: write buffer full for more than {deadline:g} s"
                )

    def overdue(self, now: float, deadline: float) -> Iterator[Connection]:
        for connection in self.stalled:
            if connection.stalled_since is not None and now - connection.stalled_since > deadline:
                yield connection


def disconnect_kind(websocket: Connection, exc: ConnectionClosed | None) -> str:
    """How a connection ended, in the words of the disconnects metric."""
    if websocket.drop_reason is not None:
        return "liveness_deadline"
    if exc is None:  # a close handshake: who started it?
        return "clean_close" if websocket.protocol.close_rcvd_then_sent else "shutdown"
    if exc.rcvd is not None:  # the peer closed, with a code of its own
        return "clean_close"
    if exc.sent is None:  # no close frame either way: TCP went away
        return "connection_lost"
    # The library failed the connection: why is in the code it sent.
    failures: dict[int, str] = {
        CloseCode.INTERNAL_ERROR: "keepalive_timeout",
        CloseCode.MESSAGE_TOO_BIG: "oversize",
    }
    return failures.get(exc.sent.code, "other")
