"""What the Python peers share: the docs' counter handler, its events and its command line.

A peer differs from another only in ``notify``, how it sends one message to
every user; the handler awaits it after every join, leave and action, as
the docs' example does. Each peer is run as ``python -m bench.peers.<name>
--host H --port P`` and logs ``listening on`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from counter_sync.cli import event_loop_runner
from counter_sync.config import LISTEN_BACKLOG

__all__ = ["USERS", "command_line", "run", "run_bare"]

# The same listen backlog for every peer (Node's default is 511, asyncio's 100):
# the join storm should measure handshake work, not SYN retransmit timers.
BACKLOG = 4096
LOG = logging.getLogger(__name__)

USERS: set[ServerConnection] = set()
STATE = {"value": 0}

Notify = Callable[[str], Awaitable[None]]


def users_event() -> str:
    return json.dumps({"type": "users", "count": len(USERS)})


def state_event() -> str:
    return json.dumps({"type": "state", "value": STATE["value"]})


def error_event(error: str) -> str:
    return json.dumps({"type": "error", "error": error})


def counter(notify: Notify) -> Callable[[ServerConnection], Awaitable[None]]:
    """The docs' handler, broadcasting with ``notify``."""

    async def handler(websocket: ServerConnection) -> None:
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

    return handler


def command_line(description: str, log: logging.Logger) -> argparse.Namespace:
    """A peer's ``--host`` and ``--port``; logging set up so that ``log`` says when it listens."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="TCP port")
    args = parser.parse_args()
    # Like the docs' example, the root logger stays at WARNING, so websockets
    # does not log every connection; only the readiness line is forced out.
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    log.setLevel(logging.INFO)
    return args


async def main(notify: Notify, description: str) -> None:
    args = command_line(description, LOG)
    handler = counter(notify)
    async with serve(handler, args.host, args.port, compression=None, backlog=BACKLOG) as server:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
        LOG.info("listening on %s:%d", args.host, args.port)
        await server.wait_closed()


def run(notify: Notify, doc: str | None) -> None:
    """Serve the counter with ``notify`` until SIGTERM; ``doc``'s first line is the help."""
    asyncio.run(main(notify, (doc or "").splitlines()[0]))


Handler = Callable[[ServerConnection], Awaitable[None]]


def run_bare(handler: Handler, doc: str | None, log: logging.Logger, **options: Any) -> None:
    """Serve ``handler`` as counter-sync runs until SIGTERM: a floor's server, not a peer.

    Compression off, counter-sync's listen backlog, and uvloop when
    counter-sync would use it; ``options`` go to ``serve()``. ``doc``'s first
    line is the help, ``log`` says when it listens.
    """
    args = command_line((doc or "").splitlines()[0], log)
    event_loop_runner()(_serve_bare(handler, args.host, args.port, log, options))


async def _serve_bare(
    handler: Handler, host: str, port: int, log: logging.Logger, options: dict[str, Any]
) -> int:
    async with serve(
        handler, host, port, compression=None, backlog=LISTEN_BACKLOG, **options
    ) as server:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
        log.info("listening on %s:%d", host, port)
        await server.wait_closed()
    return 0
