"""Peer 2: the counter server as the websockets docs write it today.

Every join, leave and action calls `broadcast()` inline: one frame written to
every connection right away, with no coalescing, so N listeners and K actions
cost N * K writes. This is the baseline the counter-sync targets are set
against.

Run: `python -m bench.peers.inline_broadcast --host 127.0.0.1 --port 8765`.
"""

from __future__ import annotations

from websockets.asyncio.server import broadcast

from bench.peers.peer import USERS, run

__all__ = ["notify"]


async def notify(message: str) -> None:
    """Write `message` to every user now (it never suspends: the handler goes straight on)."""
    broadcast(USERS, message)


if __name__ == "__main__":
    run(notify, __doc__)
