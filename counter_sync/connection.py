"""One client connection, hardened: what the library's ServerConnection adds up to.

The library's connection answers pings as they arrive and queues the pongs
whether or not the peer reads them, so a peer that floods pings and never
reads makes the server's memory grow without bound. Its keepalive ping waits
behind a full write buffer, so a peer that stops reading is never dropped.
And a second HTTP request pipelined behind the first one, before the
handshake is answered, is parsed as WebSocket frames and breaks the handshake.
:class:`Connection` closes the three holes:

* **Read-side backpressure.** While the write buffer is over its limit (or
  the queue of received messages is full), the connection stops reading: the
  peer's pings, bad messages and actions wait in its own socket buffers, and
  nothing more is produced for it. What one read brought is handed to the
  protocol a little at a time, so a pause leaves raw bytes waiting, not
  thousands of parsed frames; and the pongs for one read leave in one write.
* **A liveness clock.** It notes when the peer was last heard from and
  pinged, so that :class:`~counter_sync.sweep.ConnectionSweep` pings it,
  fails it, or drops it once its writes are stuck and nothing was heard
  from it for ``ping_interval + ping_timeout``.
* **One request per handshake.** Bytes after the first request's head are
  dropped until the handshake is answered (RFC 6455: a client waits for the
  response before it sends anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.frames import CloseCode
from websockets.protocol import State
from websockets.server import ServerProtocol

from counter_sync.admission import Gate
from counter_sync.config import FEED_SIZE, MAX_API_BODY, MAX_API_HEAD
from counter_sync.logs import fields
from counter_sync.metrics import Metrics
from counter_sync.tokens import Grant

__all__ = ["BodyError", "Connection", "disconnect_kind", "log_disconnect"]

log = logging.getLogger("counter_sync.connection")

_END_OF_HEAD = b"\r\n\r\n"
# The methods whose requests carry a body (the API's writes): their head is
# held whole, to take the body aside (see _BodyIntake). DELETE carries none.
_BODY_METHODS = (b"POST ", b"PUT ", b"PATCH ")


# A connection without a token on a server without tokens: today's anyone.
_ANYONE = Grant(None, can_write=True)


class Connection(ServerConnection):
    """A server connection with read-side backpressure, a liveness clock, handshake accounting."""

    # Slots: the library's connection keeps its state in a __dict__ already
    # near a resize; what this class adds must not double it on every connection.
    __slots__ = (
        "address",
        "client",
        "drop_reason",
        "ended_by",
        "endpoint",
        "fd",
        "gate",
        "grant",
        "handshake_task",
        "head_seen",
        "held_response",
        "intake",
        "last_heard",
        "metrics",
        "paused_for_queue",
        "paused_for_writes",
        "peer_ip",
        "pinged_at",
        "reading_paused",
        "room",
        "session",
        "unread",
        "write_fd",
    )

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Server,
        *,
        gate: Gate,
        metrics: Metrics,
        **options: Any,
    ) -> None:
        super().__init__(protocol, server, **options)
        self.gate = gate
        self.metrics = metrics
        # Worked out once, from the request, before the upgrade: the room it
        # joins, its session (exactly-once actions), and the client's address
        # as the caps count it (behind a trusted proxy, the forwarded one),
        # for the log lines about it.
        self.room = ""
        self.session: str | None = None
        self.client = "unknown peer"
        self.peer_ip = ""  # the socket's remote address (behind a proxy, the proxy's)
        self.address = ""  # the address alone, as the caps count it
        self.grant = _ANYONE  # what it may do: set from its token, or --anonymous
        # What the request asked for, set by the HTTP side: a label of the
        # HTTP requests metric, counted with the status once it is answered.
        self.endpoint = "other"
        # Reading pauses while the library's queue of received messages is
        # full, or while our write buffer is: both must clear before it resumes.
        self.paused_for_queue = False
        self.paused_for_writes = False
        self.reading_paused = False
        self.unread = b""  # read, not yet handed to the protocol
        self.last_heard = self.loop.time()
        self.pinged_at = 0.0  # when the sweep last pinged it (loop time)
        self.head_seen = b""  # the end of the request head so far
        self.intake: _BodyIntake | None = None  # an API write's body, taken aside
        # The socket's descriptor; -1 with TLS, whose bytes the transport encrypts.
        self.fd = -1
        # The descriptor fan-out may write to directly (see FanOut._write_slice):
        # the socket's while the connection is open and its transport holds no
        # bytes, so that nothing written directly can overtake them; else -1.
        # Kept here, in the one object fan-out reads anyway: looking at the
        # protocol and the transport for every write cost a third of the write.
        self.write_fd = -1
        # The handshake's 101 response, held back to go in one write with the
        # first messages (see hold_response); None until it is sent.
        self.held_response: bytes | None = None
        # Set by whoever ends the connection on purpose: how (a disconnects
        # metric kind), and why, for the log.
        self.ended_by: str | None = None
        self.drop_reason: str | None = None
        # The task running the handshake, for the gate to cancel at its deadline.
        self.handshake_task: asyncio.Task[Any] | None = None

    # Admission before the handshake: count it, or refuse it at once; the
    # gate may evict a silent one (see Gate.admit_handshake) to make room.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self.fd = sock.fileno()
        self.recv_messages.pause = self._pause_for_queue
        self.recv_messages.resume = self._resume_for_queue
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = self.address = str(peer[0])
            self.client = f"{peer[0]}:{peer[1]}"
        if self.gate.shut_out(self.peer_ip, self.loop.time()):
            # Told 429 and back before its Retry-After: a flood that ignores
            # it costs a reset here, not a request read and answered.
            self.metrics.handshakes_rejected.labels("http_rate").inc()
            self.transport.abort()
        elif not self.gate.admit_handshake(self, self.peer_ip):
            # Before a byte is read: an open file costs more than a reset.
            self.metrics.handshakes_rejected.labels("pending").inc()
            self.transport.abort()

    def evict(self) -> None:
        """Reset this connection, silent since it was accepted, to make room for a new one."""
        self.metrics.handshakes_rejected.labels("silent").inc()
        self.transport.abort()

    def expire(self) -> None:
        """Reset this connection: its handshake's deadline passed (the gate's ``Deadlines``).

        As the library's own deadline would, the handshake is cancelled
        wherever it waits (a request's body that never comes, a store).
        """
        self.transport.abort()
        if self.handshake_task is not None:
            self.handshake_task.cancel()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        # Its deadline is the gate's (--handshake-timeout from the accept,
        # less under pressure), kept by one timer for every handshake: the
        # library's own is off, a timer per handshake.
        self.handshake_task = asyncio.current_task()
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self.handshake_task = None
            self._end_handshake()
            if self.request is not None and self.response is not None:
                self.metrics.count_http(self.endpoint, self.response.status_code)

    def _end_handshake(self) -> None:
        self.gate.end_handshake(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.write_fd = -1  # the loop closes the descriptor once this returns
        super().connection_lost(exc)
        self._end_handshake()

    # Reading: one request per handshake, then a little at a time.

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.loop.time()
        if self.protocol.state is State.CONNECTING:
            self.gate.heard_from(self)
            if self.intake is None and not self.head_seen and data.startswith(_BODY_METHODS):
                self.intake = _BodyIntake(self.loop)
            if self.intake is not None:
                data = self.intake.take(data)
            data = self._first_request_head(data)
        self.unread += data
        self._feed()

    def _feed(self) -> None:
        """Hand what was read to the protocol, a slice at a time, until reading pauses."""
        unread, offset = self.unread, 0
        while offset < len(unread) and not self.reading_paused:
            super().data_received(unread[offset : offset + FEED_SIZE])
            offset += FEED_SIZE
        self.unread = unread[offset:]

    async def request_body(self) -> bytes:
        """The body of this request (an API write), once it has all arrived.

        Raises :exc:`BodyError` (a 400 or 413 for the HTTP side to answer)
        if its length was missing, unreadable or over ``MAX_API_BODY``.
        """
        if self.intake is None:
            return b""
        return await self.intake.done

    def _first_request_head(self, data: bytes) -> bytes:
        """The part of ``data`` up to the end of the first request's head; drop the rest."""
        if self.head_seen == _END_OF_HEAD:
            return b""  # a pipelined request: its answer would break this one's
        # The end may straddle two reads: look at the last bytes seen too.
        seen = self.head_seen + data
        end = seen.find(_END_OF_HEAD)
        if end >= 0:
            data = data[: end + len(_END_OF_HEAD) - len(self.head_seen)]
            self.head_seen = _END_OF_HEAD
        else:
            self.head_seen = seen[-3:]
        return data

    def send_data(self) -> None:
        """Write what the protocol has to send in one write, where the library makes one each.

        A flood of pings read at once makes thousands of pongs; as separate
        writes, each costs the event loop an object. An empty chunk, always
        the last, means the end of the data: half-close, as the library does.
        """
        writes = self.protocol.data_to_send()
        data = b"".join(writes)
        if self.held_response is None and self.protocol.state is State.OPEN:
            self.hold_response(data)
        elif data:
            self.write(data)
        if not all(writes):
            if self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop may raise RuntimeError
                    self.transport.write_eof()
            else:
                self.transport.close()
        # Every change of the protocol's state comes with bytes to send (the
        # handshake's response, a close frame) or with the end of the connection.
        self.check_direct()

    def hold_response(self, response: bytes) -> None:
        """Hold the handshake's 101 back, to be written with the first messages in one write.

        A write is a system call, a tenth of a join's time. The pass that
        welcomes the newcomer (within ``WELCOME_PERIOD`` in a join storm)
        writes the response, the users count and the state together
        (:meth:`write`); so does whatever else is written first (a close,
        a ping). Where the welcome must wait (a room's store still opening,
        a big room's broadcast and the pause after it), the response goes
        alone at once: :meth:`release_response`.
        """
        self.held_response = response

    def release_response(self) -> None:
        """Write the handshake's response now if it is held, alone."""
        if self.held_response and not self.transport.is_closing():
            self.write(b"")
            self.check_direct()

    def write(self, data: bytes) -> None:
        """Write ``data`` through the transport, after the handshake's response if still held."""
        if self.held_response:
            data, self.held_response = self.held_response + data, b""
        if data:
            self.transport.write(data)

    def check_direct(self) -> None:
        """Let fan-out write to the socket directly, or not: after each write through the transport.

        Direct writes must not overtake bytes the transport holds, nor follow
        a close frame. The descriptor itself is closed by the event loop
        (asyncio's and uvloop's alike) only after ``connection_lost``, which
        stops them first: its number may be another connection's next.
        """
        transport = self.transport
        direct = (
            not self.held_response
            and self.protocol.state is State.OPEN
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        )
        self.write_fd = self.fd if direct else -1

    # Read-side backpressure.

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused_for_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.paused_for_writes = False
        self._update_reading()

    def _pause_for_queue(self) -> None:
        self.paused_for_queue = True
        self._update_reading()

    def _resume_for_queue(self) -> None:
        self.paused_for_queue = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Pause reading while anything holds it; resume, and feed what waits, once nothing does."""
        paused = self.paused_for_queue or self.paused_for_writes
        if paused == self.reading_paused or self.transport.is_closing():
            return
        self.reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
            # Not from here: this may run inside the library's own calls.
            self.loop.call_soon(self._feed)

    def ping_now(self, now: float) -> None:
        """Send a keepalive ping at once (the sweep's): a live peer answers, and is heard from."""
        self.protocol.send_ping(b"")
        self.send_data()
        self.pinged_at = now

    def drop(self, reason: str) -> None:
        """Abort the TCP connection as dead; the handler logs ``reason`` when it sees it go."""
        self.ended_by = "liveness_deadline"
        self.drop_reason = reason
        self.transport.abort()


class BodyError(Exception):
    """A request body that cannot be taken: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _BodyIntake:
    """The body of an API write, taken aside before the handshake's parser sees the request.

    The library parses a request's head for a WebSocket handshake, and
    refuses one with a body. So for a method that carries one, the head is
    held until it is whole, its ``Content-Length`` taken out and read here,
    and the head handed on without it; the bytes after it, up to that length
    (``MAX_API_BODY`` at most), are the body. ``Transfer-Encoding`` is not
    taken: a client of this API sends a length.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head = b""
        self.body = bytearray()
        self.length: int | None = None  # None until the head is whole
        self.done: asyncio.Future[bytes] = loop.create_future()

    def take(self, data: bytes) -> bytes:
        """Take ``data``; return what the handshake's parser gets of it (the head, rewritten)."""
        if self.length is not None:
            self._add_body(data)
            return b""
        self.head += data
        end = self.head.find(_END_OF_HEAD)
        if end < 0:
            if len(self.head) > MAX_API_HEAD:
                self._fail(431, "request head too large")
                return self.head  # the parser refuses it too
            return b""
        head, rest = self.head[: end + len(_END_OF_HEAD)], self.head[end + len(_END_OF_HEAD) :]
        lines = head.split(b"\r\n")
        lengths = [line for line in lines if line.lower().startswith(b"content-length:")]
        kept = [line for line in lines if line not in lengths]
        self.length = 0
        if any(line.lower().startswith(b"transfer-encoding:") for line in lines):
            self._fail(411, "send a Content-Length, not Transfer-Encoding")
        elif len({line.partition(b":")[2].strip() for line in lengths}) > 1:
            self._fail(400, "Content-Length repeated with another value")
        elif lengths:
            value = lengths[0].partition(b":")[2].strip()
            if not value.isdigit():
                self._fail(400, "Content-Length is not a number")
            elif int(value) > MAX_API_BODY:
                self._fail(413, f"the body is over {MAX_API_BODY} bytes")
            else:
                self.length = int(value)
        self._add_body(rest)
        return b"\r\n".join(kept)

    def _add_body(self, data: bytes) -> None:
        if self.done.done() or self.length is None:
            return
        self.body += data[: self.length - len(self.body)]
        if len(self.body) >= self.length:
            self.done.set_result(bytes(self.body))

    def _fail(self, status: int, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(BodyError(status, reason))


# Why the server closed a connection, by the code it sent, where nobody said so.
_CLOSED_BY_LIBRARY: dict[int, str] = {
    CloseCode.INTERNAL_ERROR: "keepalive_timeout",
    CloseCode.MESSAGE_TOO_BIG: "oversize",
}


def disconnect_kind(websocket: Connection) -> str:
    """How a connection ended, in one word: the disconnects metric's kind and the log's.

    ``clean_close``: the client closed, with any code (1000, 1001, 4000...).
    ``shutdown``: the server closed it, stopping or draining (1001, 1012, 1011).
    ``connection_lost``: no close frame either way (1006). Then the ones the
    server ended on purpose: ``keepalive_timeout``, ``liveness_deadline``,
    ``oversize``, ``rate_limit``; ``other`` for anything else.
    """
    if websocket.ended_by is not None:
        return websocket.ended_by
    protocol = websocket.protocol
    received, sent = protocol.close_rcvd, protocol.close_sent
    if received is not None and (sent is None or protocol.close_rcvd_then_sent):
        return "clean_close"
    if sent is not None:
        return _CLOSED_BY_LIBRARY.get(sent.code, "other")
    return "connection_lost"


def _close_code(websocket: Connection) -> int:
    """The code that explains the close: the peer's, else ours, else 1006."""
    protocol = websocket.protocol
    if protocol.close_rcvd is not None:
        return protocol.close_rcvd.code
    if protocol.close_sent is not None:
        return protocol.close_sent.code
    return CloseCode.ABNORMAL_CLOSURE


def log_disconnect(websocket: Connection, metrics: Metrics) -> None:
    """One line per ended connection, and one count: with its kind, code and reason."""
    kind = disconnect_kind(websocket)
    metrics.disconnects.labels(kind).inc()
    protocol = websocket.protocol
    frame = protocol.close_rcvd or protocol.close_sent
    reason = websocket.drop_reason or (frame.reason if frame is not None else "")
    code = _close_code(websocket)
    log.info(
        "%s disconnected (%s): code %d, reason %r",
        websocket.client,
        kind,
        code,
        reason,
        extra=fields(
            "disconnect",
            peer=websocket.client,
            room=websocket.room,
            kind=kind,
            code=code,
            reason=reason,
        ),
    )
