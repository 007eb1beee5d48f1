"""Keepalive, stuck writes and expired tokens: one sweep for every connection.

The library's keepalive is off (``ping_interval=None``): :class:`ConnectionSweep`
does its work, and the liveness deadline's, for every connection at once,
looking at each only when one of its deadlines comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from counter_sync.config import SWEEP_PERIOD, SWEEP_SLICE, SWEEPS_PER_DEADLINE
from counter_sync.connection import Connection
from counter_sync.tasks import Supervisor

__all__ = ["ConnectionSweep"]


class ConnectionSweep:
    """One sweep for every connection, shared, in place of a task and timers per connection.

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

    The sweep ticks every ``SWEEP_PERIOD`` (or a quarter of the ping
    interval, if shorter) and looks only at the connections due by then: each
    waits in the bucket of the first tick at or after its next deadline (its next ping, its
    ping's timeout, its token's expiry), so an idle connection costs a look
    per ping interval, not one per tick, and a connection with no deadline
    (keepalive off, no token) costs none. A connection heard from meanwhile
    is put back for its new deadline when its bucket comes. At most
    ``SWEEP_SLICE`` connections are looked at per event-loop turn, so that
    19,000 due at once never hold the loop.
    """

    def __init__(self, *, ping_interval: float | None, ping_timeout: float | None) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        interval = ping_interval
        self.period = (
            SWEEP_PERIOD if interval is None else min(SWEEP_PERIOD, interval / SWEEPS_PER_DEADLINE)
        )
        # Connections by the tick (loop time // period) at which they are due,
        # and each one's tick, to let it go when it ends.
        self.buckets: dict[int, set[Connection]] = {}
        self.ticks: dict[Connection, int] = {}
        self.looking: set[Connection] = set()  # taken from their buckets, not looked at yet
        self.swept = -1  # the last tick whose bucket was taken (-1: none yet)
        self.task: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None

    def start(self, supervisor: Supervisor) -> None:
        """Start sweeping, as a task of ``supervisor``'s: a bug in it stops the server."""
        self.supervisor = supervisor
        self.swept = self._tick(asyncio.get_running_loop().time())
        self.task = supervisor.start(self._run(), name="connection sweep")

    async def stop(self) -> None:
        """Stop sweeping; return once the sweep has ended. Idempotent."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def watch(self, connection: Connection) -> None:
        """Look after a connection from now on, until :meth:`forget` or its end."""
        self._put_back(connection, connection.loop.time(), time.time())

    def forget(self, connection: Connection) -> None:
        """Stop looking after a connection that ended. Idempotent."""
        self.looking.discard(connection)
        tick = self.ticks.pop(connection, None)
        if tick is not None:
            bucket = self.buckets[tick]
            bucket.discard(connection)
            if not bucket:
                del self.buckets[tick]

    def _tick(self, at: float) -> int:
        return math.floor(at / self.period)

    def _put_back(self, connection: Connection, now: float, wall: float) -> None:
        """Put ``connection`` in the bucket of its next deadline; nowhere if it has none."""
        due = now + (connection.grant.expires - wall)  # the token's exp, in loop time
        interval, timeout = self.ping_interval, self.ping_timeout
        if interval is not None:
            if connection.pinged_at > connection.last_heard:  # a ping not answered yet
                # Its timeout; without one, a look an interval later.
                due = min(due, connection.pinged_at + (interval if timeout is None else timeout))
            else:
                due = min(due, connection.last_heard + interval)
        if due == math.inf:
            return
        # The first tick at or after `due`, and never one already swept.
        tick = max(math.ceil(due / self.period), self.swept + 1)
        self.buckets.setdefault(tick, set()).add(connection)
        self.ticks[connection] = tick

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Woken at the next tick's time, so a deadline waits less than a
            # period; a wake a hair early still takes that tick (whoever is
            # not due yet after all goes back for the next).
            await asyncio.sleep((self.swept + 1) * self.period - loop.time())
            now = max(self.swept + 1, self._tick(loop.time()))
            due: list[Connection] = []
            while self.swept < now:
                self.swept += 1
                due.extend(self.buckets.pop(self.swept, ()))
            for connection in due:
                del self.ticks[connection]
            self.looking = set(due)
            for start in range(0, len(due), SWEEP_SLICE):
                if start:
                    await asyncio.sleep(0)
                now_at, wall = loop.time(), time.time()
                for connection in due[start : start + SWEEP_SLICE]:
                    if connection not in self.looking:
                        continue  # forgotten since it was taken
                    self.looking.discard(connection)
                    if self._look_at(connection, now_at, wall):
                        self._put_back(connection, now_at, wall)

    def _look_at(self, connection: Connection, now: float, wall: float) -> bool:
        """Ping it, fail it, drop it or close it, if it is due; whether to look again later."""
        if connection.ended_by is not None or connection.protocol.state is not State.OPEN:
            return False
        if connection.grant.expires <= wall:
            self._end(connection, "token_expired", CloseCode.POLICY_VIOLATION, "token expired")
            return False
        interval, timeout = self.ping_interval, self.ping_timeout
        if interval is None:
            return True
        silent = now - connection.last_heard
        if timeout is not None and connection.paused_for_writes and silent > interval + timeout:
            connection.drop(
                f"liveness deadline: nothing heard for more than {interval + timeout:g} s"
            )
            return False
        if connection.pinged_at > connection.last_heard:  # a ping not answered yet
            if timeout is not None and now - connection.pinged_at > timeout:
                self._end(connection, None, CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                return False
        elif silent >= interval:
            connection.ping_now(now)
        return True

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
