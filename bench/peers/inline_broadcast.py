"""Peer 2: the counter server as the websockets docs write it today.

Every join, leave and action calls `broadcast()` inline: one frame written to
every connection right away, with no coalescing, so N listeners and K actions
cost N * K writes. This is the baseline the counter-sync targets are set
against.

Run: `python bench/peers/inline_broadcast.py --host 127.0.0.1 --port 8765`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve

__all__ = ["main"]

# The same listen backlog for every peer (Node's default is 511, asyncio's 100):
# the join storm should measure handshake work, not SYN retransmit timers.
BACKLOG = 4096
DESCRIPTION = __doc__.splitlines()[0] if __doc__ else ""
LOG = logging.getLogger(__name__)

USERS: set[ServerConnection] = set()
VALUE = 0


def users_event() -> str:
    return json.dumps({"type": "users", "count": len(USERS)})


def state_event() -> str:
    return json.dumps({"type": "state", "value": VALUE})


def error_event(error: str) -> str:
    return json.dumps({"type": "error", "error": error})


async def counter(websocket: ServerConnection) -> None:
    global VALUE
    USERS.add(websocket)
    try:
        broadcast(USERS, users_event())
        await websocket.send(state_event())
        async for message in websocket:
            try:
                action = json.loads(message)["action"]
            except (ValueError, TypeError, KeyError):
                action = None
            if action == "plus":
                VALUE += 1
                broadcast(USERS, state_event())
            elif action == "minus":
                VALUE -= 1
                broadcast(USERS, state_event())
            else:
                await websocket.send(error_event("unsupported action"))
    finally:
        # `finally` so a dropped connection still leaves the count right.
        USERS.discard(websocket)
        broadcast(USERS, users_event())


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="TCP port")
    args = parser.parse_args()
    # Like the docs' example, the root logger stays at WARNING, so websockets
    # does not log every connection; only the readiness line is forced out.
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    LOG.setLevel(logging.INFO)
    async with serve(counter, args.host, args.port, compression=None, backlog=BACKLOG) as server:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
        LOG.info("listening on %s:%d", args.host, args.port)
        await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
