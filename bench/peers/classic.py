"""Peer 1: the counter server from the websockets docs before 2021.

Each broadcast starts one task per connection and waits for all of them,
`await asyncio.wait([asyncio.create_task(ws.send(msg)) for ws in USERS])`,
and the handler awaits that before it reads the next action. It is written
against the current `websockets.asyncio.server` API so the bench compares
broadcast strategies, not library generations. Python 3.11 no longer accepts
bare coroutines in `asyncio.wait`, hence the explicit tasks.

Run: `python -m bench.peers.classic --host 127.0.0.1 --port 8765`.
"""

from __future__ import annotations

import asyncio

from bench.peers.peer import USERS, run

__all__ = ["notify"]


async def notify(message: str) -> None:
    """Send `message` to every user, and return once every send finished."""
    if USERS:
        await asyncio.wait([asyncio.create_task(ws.send(message)) for ws in USERS])


if __name__ == "__main__":
    run(notify, __doc__)
