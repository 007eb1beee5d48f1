"""A Python client that counts each click exactly once, as the page does.

It opens the counter's WebSocket with a session, numbers its actions 1, 2,
3..., keeps every action until the server acknowledges it, and after a
reconnect (to the same server or, in shared mode, another instance) sends
again what was not acknowledged: the server counts a resent action once. It
never shows a value older than the one it shows::

    async with Client("ws://localhost:6789/c/votes") as votes:
        await votes.plus()
        await votes.settled()  # every action acknowledged (or rejected)
        print(votes.value)

Several URLs (instances of one shared server) are tried in turn: when one
goes away, the client carries on with the next.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from counter_sync.oplog import OUT_OF_ORDER

__all__ = ["Client", "TooManyPending", "new_session"]

log = logging.getLogger("counter_sync.client")

# Actions waiting for their ack at most, as the page allows: beyond, the user
# is told to wait rather than queue clicks without end while offline.
MAX_PENDING = 100
# Resending after a reconnect stays within the server's default rate limit
# (20 a second, 40 at once), as the page does.
_RESEND_BURST = 30
_RESEND_RATE = 15.0
# Seconds between reconnection attempts: doubling from the first to the last.
_RECONNECT_FIRST = 0.05
_RECONNECT_LAST = 2.0


class TooManyPending(Exception):
    """More actions wait for their ack than the client keeps; this one was not taken."""


def new_session() -> str:
    """A random 128-bit session id, as 22 URL-safe characters."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


class Client:
    """One session on one counter: numbered actions, acks, resends, and the latest state."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        session: str | None = None,
        max_pending: int = MAX_PENDING,
        **options: Any,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        self.session = session or new_session()
        self.max_pending = max_pending
        self.options = options  # for websockets' connect()
        self.next_op = 1
        self.unacked: dict[int, str] = {}  # op -> action, in order
        self.rejected: list[tuple[int, str]] = []  # (op, reason) of actions not counted
        self.value: int | None = None
        self.seq = -1
        self.epoch: str | None = None
        self.users: int | None = None
        self.stale_states = 0  # states older than the one shown: the server promises none
        self.out_of_order = 0  # the first op refused as out of order, until started over
        self.connections = 0  # how many times it connected
        # Connected, and told what the server holds as done: new actions may go at once.
        self.websocket: ClientConnection | None = None
        self.changed = asyncio.Event()  # set on every message, for the waits
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self._run())
        await self.wait(lambda: self.value is not None)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Actions sent (or queued) and not yet acknowledged."""
        return len(self.unacked)

    async def plus(self) -> int:
        """Add one; return the action's op number. It is sent now, or once connected.

        Raises :exc:`TooManyPending`, the action not taken, while ``max_pending``
        actions wait for their ack.
        """
        return await self._act("plus")

    async def minus(self) -> int:
        """Subtract one; return the action's op number. As :meth:`plus`, it may raise."""
        return await self._act("minus")

    async def _act(self, action: str) -> int:
        if len(self.unacked) >= self.max_pending:
            raise TooManyPending(f"{len(self.unacked)} actions wait for their ack")
        op = self.next_op
        self.next_op += 1
        self.unacked[op] = action
        # Before the server says what it holds as done, the older actions
        # must go first (resend): sending this one now would skip ahead.
        if self.websocket is not None:
            with contextlib.suppress(ConnectionClosed):  # resent after the reconnect
                await self.websocket.send(json.dumps({"action": action, "op": op}))
        return op

    async def settled(self) -> None:
        """Wait until every action was acknowledged or rejected."""
        await self.wait(lambda: not self.unacked)

    async def wait(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, checked after each message."""
        while not condition():
            self.changed.clear()
            await self.changed.wait()

    async def close(self) -> None:
        """Stop: close the connection and do not reconnect."""
        self.closing = True
        if self.websocket is not None:
            await self.websocket.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # The connection, again and again.

    async def _run(self) -> None:
        delay = _RECONNECT_FIRST
        attempt = 0
        while not self.closing:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                async with connect(self._with_session(url), **self.options) as websocket:
                    self.connections += 1
                    delay = _RECONNECT_FIRST
                    await self._receive(websocket)
            except (OSError, InvalidHandshake, InvalidStatus, ConnectionClosed) as exc:
                log.debug("%s: %s", url, exc)
            finally:
                self.websocket = None
            if not self.closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_LAST)

    def _with_session(self, url: str) -> str:
        parts = urlsplit(url)
        query = (
            f"{parts.query}&session={self.session}" if parts.query else f"session={self.session}"
        )
        return urlunsplit(parts._replace(query=query))

    async def _receive(self, websocket: ClientConnection) -> None:
        """Take in what the server says; resend the unacked actions once it says what is done."""
        async for message in websocket:
            event = json.loads(message)
            kind = event.get("type")
            if kind == "users":
                self.users = event["count"]
            elif kind == "state":
                self._take_state(event)
            elif kind == "ack":
                self._take_ack(event["op"])
                if self.websocket is None:  # the first ack: what the server holds as done
                    await self.resend(websocket)
                    self.websocket = websocket
            elif kind == "error" and "op" in event:
                if event["error"] == OUT_OF_ORDER:
                    # Start over once the ops before it are settled: one sent
                    # before it may yet be counted, and must not go again.
                    self.out_of_order = min(self.out_of_order or event["op"], event["op"])
                else:
                    self._take_rejection(event["op"], event["error"])
            self.changed.set()
            if self.out_of_order and not any(op < self.out_of_order for op in self.unacked):
                await self._start_over(websocket)
                return

    def _take_state(self, event: dict[str, Any]) -> None:
        """Show a state unless it is older than the one shown (same history, lower seq)."""
        epoch, seq = event["epoch"], event["seq"]
        if epoch == self.epoch and seq < self.seq:
            self.stale_states += 1
            return
        if epoch != self.epoch and self.epoch is not None:
            # A new history: what was done in the old one is gone, so the
            # actions still waiting start over as 1, 2, 3... in order.
            self._renumber()
        self.epoch, self.seq, self.value = epoch, seq, event["value"]

    def _renumber(self) -> None:
        actions = list(self.unacked.values())
        self.unacked = {op: action for op, action in enumerate(actions, start=1)}
        self.next_op = len(actions) + 1

    def _take_ack(self, op: int) -> None:
        for done in [each for each in self.unacked if each <= op]:
            del self.unacked[done]
        self.next_op = max(self.next_op, op + 1)

    async def _start_over(self, websocket: ClientConnection) -> None:
        """The server and this client disagree on the numbers: go on as a new session.

        It only happens when a server that rejected actions of this session
        died before it could record their numbers. The actions still waiting
        were not counted (the server took none of them): they go again,
        numbered from 1 in the new session.
        """
        self.session = new_session()
        self.out_of_order = 0
        self._renumber()
        await websocket.close()

    def _take_rejection(self, op: int, reason: str) -> None:
        """A rejection is final: the action is not counted and not sent again."""
        if self.unacked.pop(op, None) is not None:
            self.rejected.append((op, reason))

    async def resend(self, websocket: ClientConnection) -> None:
        """Send the unacked actions again, in order, within the server's default rate limit.

        A burst of ``RESEND_BURST``, then ``RESEND_RATE`` a second: a hundred
        clicks queued while offline would otherwise be refused past the burst.
        """
        sent, count = 0, 0  # the last op sent, how many
        # Not a copy of the list: actions taken while this waits join it, in
        # order (they are not sent on their own until this returns).
        while waiting := [op for op in self.unacked if op > sent]:
            sent = min(waiting)
            if count >= _RESEND_BURST:
                await asyncio.sleep(1 / _RESEND_RATE)
            count += 1
            if sent in self.unacked:  # an ack or a rejection may have come meanwhile
                await websocket.send(json.dumps({"action": self.unacked[sent], "op": sent}))
