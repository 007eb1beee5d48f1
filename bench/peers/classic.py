"""Peer 1: the counter server from the websockets docs before 2021.

Each broadcast starts one task per connection and waits for all of them,
`await asyncio.wait([asyncio.create_task(ws.send(msg)) for ws in USERS])`,
and the handler awaits that before it reads the next action. It is written
against the current `websockets.asyncio.server` API so the bench compares
broadcast strategies, not library generations. Python 3.11 no longer accepts
bare coroutines in `asyncio.wait`, hence the explicit tasks.

Run: `python bench/peers/classic.py --host 127.0.0.1 --port 8765`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal

from websockets.asyncio.server import ServerConnection, serve

__all__ = ["main"]

# The same listen backlog for every peer (Node's default is 511, asyncio's 100):
# the join storm should measure handshake work, not SYN retransmit timers.
BACKLOG = 4096
DESCRIPTION = __doc__.splitlines()[0] if __doc__ else ""
LOG = logging.getLogger(__name__)

USERS: set[ServerConnection] = set()
STATE = {"value": 0}


def users_event() -> str:
    return json.dumps({"type": "users", "count": len(USERS)})


def state_event() -> str:
    return json.dumps({"type": "state", "value": STATE["value"]})


def error_event(error: str) -> str:
    return json.dumps({"type": "error", "error": error})


async def notify(message: str) -> None:
    """Send `message` to every user, and return once every send finished."""
    if USERS:
        await asyncio.wait([asyncio.create_task(ws.send(message)) for ws in USERS])


async def counter(websocket: ServerConnection) -> None:
    USERS.add(websocket)
    try:
        await notify(users_event())
        await websocket.send(state_event())
        async for message in websocket:
            try:
                action = json.loads(message)["action"]
            except (ValueError, TypeError, KeyError):
                action = None
            if action == "plus":
                STATE["value"] += 1
                await notify(state_event())
            elif action == "minus":
                STATE["value"] -= 1
                await notify(state_event())
            else:
                await websocket.send(error_event("unsupported action"))
    finally:
        # `finally` so a dropped connection still leaves the count right.
        USERS.discard(websocket)
        await notify(users_event())


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
