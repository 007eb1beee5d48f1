"""Keepalive, stuck writes and expired tokens: one sweep over every connection.

The library's keepalive is off (``ping_interval=None``): :class:`ConnectionSweep`
does its work, and the liveness deadline's, for every connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from counter_sync.config import SWEEP_PERIOD, SWEEP_SLICE, SWEEPS_PER_DEADLINE
from counter_sync.connection import Connection
from counter_sync.tasks import Supervisor

__all__ = ["ConnectionSweep"]


class ConnectionSweep:
    """One sweep over every connection, shared, in place of a task and timers per connection.

    Keepalive: a connection nothing was heard from for ``ping_interval`` is
    sent a ping (a live peer answers it, and is heard from); one that answers
    nothing for ``ping_timeout`` after it is failed with 1011, "keepalive ping
    timeout", as the library would. The library's own keepalive is off: it is
    a task and a timer per connection, which cost memory on every connection
    and a wake-up per ping.

    Stuck: a peer whose writes are stuck (it stopped reading) cannot get our
    ping through; it is dropped once nothing was heard from it for
    ``ping_interval + ping_timeout`` (the liveness deadline). Expired: a
    connection whose token's ``exp`` has passed is closed with 1008 "token
    expired".

    The sweep runs every ``SWEEP_PERIOD`` (or a quarter of the ping interval,
    if shorter) and looks at ``SWEEP_SLICE`` connections per event-loop turn,
    so that 19,000 connections never hold the loop at once.
    """

    def __init__(
        self,
        *,
        ping_interval: float | None,
        ping_timeout: float | None,
        connections: Callable[[], Iterable[Connection]],
    ) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connections = connections  # every open connection, when called
        self.task: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Start sweeping, as a task of ``supervisor``'s: a bug in it stops the server."""
        self.supervisor = supervisor
        self.task = supervisor.start(self._run(), name="connection sweep")

    async def stop(self) -> None:
        """Stop sweeping; return once the sweep has ended. Idempotent."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        interval = self.ping_interval
        period = (
            SWEEP_PERIOD if interval is None else min(SWEEP_PERIOD, interval / SWEEPS_PER_DEADLINE)
        )
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            everyone = list(self.connections())
            for start in range(0, len(everyone), SWEEP_SLICE):
                if start:
                    await asyncio.sleep(0)
                now, wall = loop.time(), time.time()
                for connection in everyone[start : start + SWEEP_SLICE]:
                    self._look_at(connection, now, wall)

    def _look_at(self, connection: Connection, now: float, wall: float) -> None:
        """Ping it, fail it, drop it or close it, if it is due; else nothing."""
        if connection.ended_by is not None or connection.protocol.state is not State.OPEN:
            return
        if connection.grant.expires <= wall:
            self._end(connection, "token_expired", CloseCode.POLICY_VIOLATION, "token expired")
            return
        interval, timeout = self.ping_interval, self.ping_timeout
        if interval is None:
            return
        silent = now - connection.last_heard
        if timeout is not None and connection.paused_for_writes and silent > interval + timeout:
            connection.drop(
                f"liveness deadline: nothing heard for more than {interval + timeout:g} s"
            )
        elif connection.pinged_at > connection.last_heard:  # a ping not answered yet
            if timeout is not None and now - connection.pinged_at > timeout:
                self._end(connection, None, CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        elif silent >= interval:
            connection.ping_now(now)

    def _end(self, connection: Connection, kind: str | None, code: int, reason: str) -> None:
        """Fail the connection with ``code``: its close frame, then the close timeout."""
        assert self.supervisor is not None
        connection.ended_by = kind
        self.supervisor.start(_fail(connection, code, reason), name=reason)


async def _fail(connection: Connection, code: int, reason: str) -> None:
    """Send a close frame and close the TCP connection within the close timeout, as the library."""
    with contextlib.suppress(ConnectionClosed):
        async with connection.send_context():
            connection.protocol.fail(code, reason)
