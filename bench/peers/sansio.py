"""The design named for the unmet goals, as a sketch to measure: rooms on the sans-I/O layer.

websockets' asyncio API gives every connection a task, a queue of messages
and a handler coroutine that wakes for each one. This server keeps the
library's protocol (``websockets.server.ServerProtocol``: the handshake, the
frames, the closing handshake, all of RFC 6455 that the library checks) and
drops the rest: each connection is a plain ``asyncio.Protocol`` that hands
the bytes it reads to its ``ServerProtocol`` and acts on the events at once,
in ``data_received``. A join writes the handshake's response and the first
messages (users count, value) in one write; an action writes its room's new
value, serialized once, to each of the room's transports; the users count
goes to a room at most every ``USERS_PERIOD``. No task, no queue, no wake-up
per message.

It is not counter-sync: no caps, no keepalive, no store, no sessions, no
logs or metrics. It is what the join storm and the rooms fan-out cost on
the library's protocol without its asyncio layer, measured under the same
load as counter-sync (``python -m bench`` lists it as ``sansio``;
``bench.rooms`` measures it in the fan-out phase beside the library's own
server), to say how near the floors the design would come before
counter-sync's guarantees are added to it.

Run: ``python -m bench.peers.sansio --host 127.0.0.1 --port 8765``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from http import HTTPStatus
from typing import cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from bench.peers.peer import command_line
from counter_sync.cli import event_loop_runner
from counter_sync.config import LISTEN_BACKLOG, USERS_PERIOD
from counter_sync.fanout import text_frame

__all__ = ["Room", "RoomProtocol", "main"]

LOG = logging.getLogger(__name__)
DELTAS = {b"plus": 1, b"minus": -1}


class Room:
    """A room's connections and value; its users count is sent at most every USERS_PERIOD."""

    __slots__ = ("count_due", "name", "users", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.users: set[RoomProtocol] = set()
        self.value = 0
        self.count_due = False

    def state_frame(self) -> bytes:
        return text_frame(json.dumps({"type": "state", "value": self.value}))

    def users_frame(self) -> bytes:
        return text_frame(json.dumps({"type": "users", "count": len(self.users)}))

    def write(self, frame: bytes) -> None:
        for user in self.users:
            user.transport.write(frame)

    def count_changed(self) -> None:
        """Send the users count soon, once for every join and leave until then."""
        if not self.count_due:
            self.count_due = True
            asyncio.get_running_loop().call_later(USERS_PERIOD, self.send_count)

    def send_count(self) -> None:
        self.count_due = False
        if self.users:
            self.write(self.users_frame())


ROOMS: dict[str, Room] = {}


class RoomProtocol(asyncio.Protocol):
    """One connection: bytes to the library's protocol, its events acted on at once."""

    __slots__ = ("protocol", "room", "transport")

    def __init__(self) -> None:
        self.protocol = ServerProtocol()
        self.room: Room | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        extra = b""
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                extra = self.answer(event)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.act(bytes(event.data))
        self.flush(extra)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self.flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        room, self.room = self.room, None
        if room is not None:
            room.users.discard(self)
            if room.users:
                room.count_changed()
            else:
                del ROOMS[room.name]

    def answer(self, request: Request) -> bytes:
        """The handshake's response; on a room's path, join it: the first messages to add."""
        if request.path == "/healthz":
            users = sum(len(room.users) for room in ROOMS.values())
            body = json.dumps({"users": users}) + "\n"
            self.protocol.send_response(self.protocol.reject(HTTPStatus.OK, body))
            return b""
        response = self.protocol.accept(request)
        self.protocol.send_response(response)
        if self.protocol.state is not State.OPEN:
            return b""
        room = ROOMS.get(request.path)
        if room is None:
            room = ROOMS[request.path] = Room(request.path)
        room.users.add(self)
        self.room = room
        room.count_changed()
        return room.users_frame() + room.state_frame()

    def act(self, message: bytes) -> None:
        """A plus or a minus: the room's new value to everyone in it."""
        room = self.room
        try:
            delta = DELTAS.get(json.loads(message)["action"].encode(), 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            delta = 0
        if room is not None and delta:
            room.value += delta
            room.write(room.state_frame())

    def flush(self, extra: bytes = b"") -> None:
        """Write what the protocol has to send (and ``extra``) in one write; close when it says."""
        chunks = self.protocol.data_to_send()
        if chunks or extra:
            data = b"".join(chunks) + extra
            if data:
                self.transport.write(data)
            if chunks and chunks[-1] == b"":  # the protocol's end of stream
                self.transport.close()
        if self.protocol.close_expected():
            self.transport.close()


async def main(host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RoomProtocol, host, port, backlog=LISTEN_BACKLOG)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    LOG.info("listening on %s:%d", host, port)
    await stop
    server.close()
    return 0


if __name__ == "__main__":
    args = command_line((__doc__ or "").splitlines()[0], LOG)
    event_loop_runner()(main(args.host, args.port))
