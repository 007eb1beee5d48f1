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

import asyncio
import logging
import signal

from websockets.asyncio.server import ServerConnection, serve

from bench.peers.peer import command_line
from counter_sync.cli import event_loop_runner
from counter_sync.config import LISTEN_BACKLOG

__all__ = ["handler"]

LOG = logging.getLogger(__name__)


async def handler(websocket: ServerConnection) -> None:
    """Hold the connection until the client closes it; the handshake was all the work."""
    await websocket.wait_closed()


async def main(host: str, port: int) -> int:
    async with serve(handler, host, port, compression=None, backlog=LISTEN_BACKLOG) as server:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
        LOG.info("listening on %s:%d", host, port)
        await server.wait_closed()
    return 0


if __name__ == "__main__":
    args = command_line((__doc__ or "").splitlines()[0], LOG)
    event_loop_runner()(main(args.host, args.port))
