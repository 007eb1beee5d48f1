"""The least websockets.asyncio rooms server: the fan-out phase's work and nothing else.

A room per path (``/c/<name>``): a set of connections and a value. A join
gets the users count and the value, and the room its new users count (at
most every ``USERS_PERIOD``, as counter-sync sends it); each ``plus`` or
``minus`` adds to the value and writes it to the room at once. Each frame is
built once and written to every connection's transport, as counter-sync
writes it: the library's ``broadcast()`` frames the message again for each
connection, which is the library's idiom but not its least cost, and this
server is where the goals are asked whether a server on the asyncio API can
reach them at all. No coalescing, no caps, no keepalive (the fan-out phase
turns counter-sync's off too), no logs per connection, no metrics: what a
server built on the library's asyncio API pays at least for the same work,
to set beside counter-sync's figure and the floors in one run (``python -m
bench.rooms``, and the join storm of ``python -m bench``). Where it matters
it runs as counter-sync does: compression off, counter-sync's listen
backlog, and uvloop when counter-sync would use it, as the join storm's
floor (:mod:`bench.peers.handshake_only`).

Run: ``python -m bench.peers.rooms_bare --host 127.0.0.1 --port 8765``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from bench.peers.peer import run_bare
from counter_sync.config import USERS_PERIOD
from counter_sync.fanout import text_frame

__all__ = ["handler", "healthz"]

LOG = logging.getLogger(__name__)
DELTAS = {"plus": 1, "minus": -1}
ROOMS: dict[str, set[ServerConnection]] = {}
VALUES: dict[str, int] = {}
COUNT_DUE: set[str] = set()  # rooms whose users count goes out at the end of the period


def healthz(connection: ServerConnection, request: Request) -> Response | None:
    """``/healthz``: the users connected, as the bench asks counter-sync."""
    if request.path != "/healthz":
        return None
    users = sum(len(users) for users in ROOMS.values())
    return connection.respond(HTTPStatus.OK, json.dumps({"users": users}) + "\n")


async def handler(websocket: ServerConnection) -> None:
    """Join the path's room, get its users count and value, then change it and tell the room.

    The library writes the handshake's response before this runs; the first
    two messages go in one write, then each action's value in one write to
    each of the room's connections.
    """
    name = websocket.request.path if websocket.request else "/"
    users = ROOMS.setdefault(name, set())
    users.add(websocket)
    count_changed(name)
    try:
        websocket.transport.write(users_frame(users) + state_frame(VALUES.get(name, 0)))
        async for message in websocket:
            delta = DELTAS.get(json.loads(message).get("action"), 0)
            VALUES[name] = value = VALUES.get(name, 0) + delta
            write(users, state_frame(value))
    finally:
        users.discard(websocket)
        if users:
            count_changed(name)
        else:
            del ROOMS[name]


def count_changed(name: str) -> None:
    """Tell the room its users count soon: once per ``USERS_PERIOD``, as counter-sync does."""
    if name not in COUNT_DUE:
        COUNT_DUE.add(name)
        asyncio.get_running_loop().call_later(USERS_PERIOD, send_count, name)


def send_count(name: str) -> None:
    COUNT_DUE.discard(name)
    if users := ROOMS.get(name):
        write(users, users_frame(users))


def state_frame(value: int) -> bytes:
    return text_frame(json.dumps({"type": "state", "value": value}))


def users_frame(users: set[ServerConnection]) -> bytes:
    return text_frame(json.dumps({"type": "users", "count": len(users)}))


def write(users: set[ServerConnection], frame: bytes) -> None:
    """One frame, built once, to each connection (the library's send() frames it each time)."""
    for user in users:
        user.transport.write(frame)


if __name__ == "__main__":
    run_bare(handler, __doc__, LOG, ping_interval=None, process_request=healthz)
