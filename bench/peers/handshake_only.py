"""The join storm's floor: a bare websockets server that only completes handshakes.

``websockets.asyncio.server.serve`` with a handler that awaits the
connection's close and does nothing else: no users, no rooms, no message.
How long a join storm takes against it (N handshakes at once, until the last
one completed) is what the library, the event loop and the kernel cost for
the handshakes alone, so counter-sync's join storm is reported as a multiple
of it (``python -m bench``). Where it matters it runs as counter-sync does:
compression off, counter-sync's listen backlog (``LISTEN_BACKLOG``), and
uvloop when counter-sync would use it (``event_loop_runner``).

Run: ``python -m bench.peers.handshake_only --host 127.0.0.1 --port 8765``.
"""

from __future__ import annotations

import logging

from websockets.asyncio.server import ServerConnection

from bench.peers.peer import run_bare

__all__ = ["handler"]

LOG = logging.getLogger(__name__)


async def handler(websocket: ServerConnection) -> None:
    """Hold the connection until the client closes it; the handshake was all the work."""
    await websocket.wait_closed()


if __name__ == "__main__":
    run_bare(handler, __doc__, LOG)
