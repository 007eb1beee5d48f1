"""The counter: who is connected, the value, and the handler that serves each client.

Start reading here. This is the websockets library's classic counter example
(a set of users, ``register``, ``async for message in websocket``, ``finally:
unregister``, ``users_event`` and ``state_event``), grown to run for real: bad
messages get an error reply instead of closing the connection, and changes are
coalesced into one broadcast per event-loop turn instead of one per action
(the flush, in :mod:`counter_sync.flush`).

How the server knows that a client disconnected, in the three ways it can:

* The client closes cleanly (it sends a close frame, the browser tab closes):
  the ``async for`` loop over the connection simply ends.
* The TCP connection is lost (the process is killed, the cable pulled and the
  kernel says so): ``async for`` raises ``ConnectionClosedError``, code 1006.
* The peer goes silent (half-open TCP: the laptop slept, the network dropped
  without a reset): nothing arrives at all, so only the keepalive ping finds
  it. No pong within ``ping_timeout`` -> the server fails the connection with
  1011 and ``async for`` raises ``ConnectionClosedError``.

Whichever way it ends, the ``finally`` block in :meth:`Room.serve` unregisters
the user and everyone left gets the new user count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import NamedTuple

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from counter_sync.admission import RateLimit
from counter_sync.config import MAX_VALUE
from counter_sync.connection import Connection, log_disconnect
from counter_sync.flush import PassRunner, RoomFlush
from counter_sync.logs import Throttle, fields
from counter_sync.metrics import Metrics
from counter_sync.store import RoomState

__all__ = [
    "ACTIONS",
    "DELTAS",
    "BadMessage",
    "Message",
    "Room",
    "access_event",
    "ack_event",
    "error_event",
    "parse_message",
    "state_event",
    "users_event",
]

log = logging.getLogger("counter_sync.counter")


# --- Events: the server -> client half of the protocol ------------------------


def users_event(count: int) -> str:
    """Tell clients how many connections are open."""
    return json.dumps({"type": "users", "count": count})


def state_event(state: RoomState) -> str:
    """Tell clients the counter's absolute value, so only the latest one matters.

    ``seq`` and ``epoch`` say how new it is: a client never shows a value
    older than the one it shows.
    """
    return json.dumps(
        {"type": "state", "value": state.value, "seq": state.seq, "epoch": state.epoch}
    )


def ack_event(op: int) -> str:
    """Tell a session client that every op up to ``op`` is done."""
    return json.dumps({"type": "ack", "op": op})


def access_event(reason: str) -> str:
    """Tell a client it may only watch this counter, and why (sent after users and state)."""
    return json.dumps({"type": "access", "can": "read", "reason": reason})


def error_event(reason: str, op: int | None = None) -> str:
    """Tell one client why its message was rejected (and which op, if it had one)."""
    if op is None:
        return json.dumps({"type": "error", "error": reason})
    return json.dumps({"type": "error", "error": reason, "op": op})


# --- Parsing: the client -> server half, pure and socket-free -----------------

ACTIONS = ("plus", "minus", "sync")
DELTAS = {"plus": +1, "minus": -1}  # "sync" changes nothing: it asks for the state


class BadMessage(ValueError):
    """A client message that is not a valid action; the text is the reply."""


class Message(NamedTuple):
    """A valid message: its action, and its op number if numbered (a named tuple: cheap to make)."""

    action: str
    op: int | None = None


def parse_message(message: str | bytes) -> Message:
    """Turn one client message into the action it asks for, with its op number if any.

    Raises :exc:`BadMessage` with a short reason for anything else, so the
    caller can reply and carry on instead of letting the handler crash.
    """
    if not isinstance(message, str):
        raise BadMessage("binary frames are not supported; send JSON text")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        # RecursionError: deeply nested arrays fit in a few KiB.
        raise BadMessage("message is not valid JSON") from None
    if not isinstance(event, dict):
        raise BadMessage("message must be a JSON object")
    if "action" not in event:
        raise BadMessage('missing "action"')
    action = event["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        raise BadMessage('unknown action; use "plus", "minus" or "sync"')
    op = event.get("op")
    if op is None or action == "sync":  # sync needs no op: it changes nothing
        return Message(action)
    if type(op) is not int or not 1 <= op <= MAX_VALUE:
        raise BadMessage('"op" must be a whole number from 1 to 2^53 - 1')
    return Message(action, op)


# --- A room: one counter, the users who watch it, the handler -----------------


class Room:
    """One counter and the connections that share it.

    Actions and joins write to nobody: they note what changed in the room's
    :class:`~counter_sync.flush.RoomFlush`, and one flush per event-loop turn
    commits it and broadcasts the latest value once, for K actions or J joins.
    """

    def __init__(
        self,
        name: str,
        state: RoomState,
        *,
        flusher: PassRunner,
        metrics: Metrics,
        on_empty: Callable[[Room], None],
    ) -> None:
        self.name = name
        self.users: set[Connection] = set()
        self.state = state  # the value every user was last sent, and its version
        self.metrics = metrics
        self.flush = RoomFlush(self, flusher, on_empty=lambda: on_empty(self))

    def register(self, websocket: Connection) -> None:
        """Add a user; the next flush sends it the user count, then the state.

        A session client gets, after them, the last op the store holds as done
        for it. Everyone else gets the new user count.
        """
        self.users.add(websocket)
        self.flush.welcome(websocket, websocket.session)
        if (read_only := websocket.grant.read_only) is not None:
            self.flush.hold(websocket, (access_event(read_only),))  # sent right after them

    def unregister(self, websocket: Connection) -> None:
        """Remove a user; everyone left gets the new user count. Idempotent."""
        self.users.discard(websocket)
        self.flush.leave(websocket)

    async def serve(self, websocket: Connection, limit: RateLimit) -> None:
        """Serve one client until its connection ends, however it ends; then unregister it.

        ``limit`` is its rate limit: its own, or its token's user's, shared.
        """
        peer = websocket.client
        # One warning per interval for this connection, however much it sends.
        warnings = Throttle()
        self.register(websocket)  # its first messages: users, then state
        log.info(
            "%s connected to %s (%d here)",
            peer,
            self.name,
            len(self.users),
            extra=fields("connect", peer=peer, room=self.name),
        )
        try:
            async for message in websocket:
                for reply in self.handle(websocket, message, limit, warnings):
                    await websocket.send(reply)
                if limit.exhausted():
                    # Told a whole burst's worth of times and still sending:
                    # answering each one would cost everyone else.
                    websocket.ended_by = "rate_limit"
                    websocket.drop_reason = "closed: kept sending past the rate limit"
                    await websocket.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                    break
        except ConnectionClosed:
            # The TCP connection was lost (1006), or the library failed it
            # (keepalive timeout 1011, oversized message 1009), or a reply
            # crossed the close handshake. How it ended is logged below.
            pass
        finally:
            # Runs however the connection ends, even on a bug in handle().
            self.unregister(websocket)
            log_disconnect(websocket, self.metrics)

    def handle(
        self, websocket: Connection, message: str | bytes, limit: RateLimit, warnings: Throttle
    ) -> tuple[str, ...]:
        """Do what one message asks, or say why not (no message makes it raise): the replies now.

        A change is only noted here: the flush commits it and answers the rest.
        """
        allowed = limit.allows(websocket.loop.time())
        try:
            parsed = parse_message(message)
        except BadMessage as exc:
            if not allowed:
                return self._answer(websocket, error_event(self._over_limit(websocket, warnings)))
            self.metrics.actions.labels("bad_message").inc()
            warnings.warning(
                log, "%s sent a bad message: %s", websocket.client, exc, **self._rejected(websocket)
            )
            return self._answer(websocket, error_event(str(exc)))
        if parsed.action == "sync":
            if not allowed:
                return self._answer(websocket, error_event(self._over_limit(websocket, warnings)))
            self.metrics.actions.labels("sync").inc()
            if self.flush.welcoming(websocket):
                # Its first messages are the answer: built now, the state could
                # be older than the one they carry, sent after them.
                return ()
            return (self.users_message(), self.state_message())
        delta = DELTAS[parsed.action]
        if parsed.op is not None and websocket.session is None:
            return self._answer(
                websocket, error_event('"op" needs a session: connect with ?session=<id>')
            )
        reason = None
        if not allowed:
            reason = self._over_limit(websocket, warnings)
        elif (read_only := websocket.grant.read_only) is not None:
            self.metrics.actions.labels("read_only").inc()
            reason = read_only
        elif not self.flush.fits(delta):
            self.metrics.actions.labels("out_of_range").inc()
            reason = "value out of range; action not counted"
        if parsed.op is not None:
            reply = self.flush.take_op(websocket, parsed.op, delta, reason)
            return () if reply is None else self._answer(websocket, reply)
        if reason is not None:
            return self._answer(websocket, error_event(reason))
        self.flush.add(websocket, delta)
        return ()

    def _over_limit(self, websocket: Connection, warnings: Throttle) -> str:
        self.metrics.actions.labels("rate_limited").inc()
        warnings.warning(
            log, "%s is over the rate limit", websocket.client, **self._rejected(websocket)
        )
        return "rate limit exceeded; action not counted"

    def _answer(self, websocket: Connection, *replies: str) -> tuple[str, ...]:
        """The replies to send now; none before its users and state (they are held till then)."""
        return () if self.flush.hold(websocket, replies) else replies

    def _rejected(self, websocket: Connection) -> dict[str, object]:
        return fields("rejected", peer=websocket.client, room=self.name)

    # What the flush sends, built from the room's current numbers.

    def count_users(self) -> int:
        """Users here, plus in shared mode those of the other live instances."""
        return len(self.users) + self.flush.elsewhere

    def users_message(self) -> str:
        return users_event(self.count_users())

    def state_message(self) -> str:
        return state_event(self.state)

    def ack_message(self, op: int) -> str:
        return ack_event(op)

    def error_message(self, reason: str, op: int | None = None) -> str:
        return error_event(reason, op)
