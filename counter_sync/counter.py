"""The counter: who is connected, the value, and the handler that serves each client.

Start reading here. This is the websockets library's classic counter example
(a set of users, ``register``, ``async for message in websocket``, ``finally:
unregister``, ``users_event`` and ``state_event``), grown to run for real: bad
messages get an error reply instead of closing the connection, and changes are
coalesced into one broadcast per event-loop turn instead of one per action.

How the server knows that a client disconnected, in the three ways it can:

* The client closes cleanly (it sends a close frame, the browser tab closes):
  the ``async for`` loop over the connection simply ends. It never raises
  ``ConnectionClosedOK``.
* The TCP connection is lost (the process is killed, the cable pulled and the
  kernel says so): ``async for`` raises ``ConnectionClosedError``, code 1006.
* The peer goes silent (half-open TCP: the laptop slept, the network dropped
  without a reset): nothing arrives at all, so only the keepalive ping finds
  it. No pong within ``ping_timeout`` -> the library fails the connection with
  1011 and ``async for`` raises ``ConnectionClosedError``.

Whichever way it ends, the ``finally`` block in :meth:`Room.serve` unregisters
the user and everyone left gets the new user count.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from websockets.asyncio.server import broadcast
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import CloseCode

from counter_sync.admission import RateLimit
from counter_sync.config import FLUSH_PAUSE_RATIO, MAX_VALUE, MIN_PACING_DELAY, Settings
from counter_sync.connection import Connection, disconnect_kind
from counter_sync.fanout import FanOut, format_peer
from counter_sync.logs import Throttle, fields
from counter_sync.metrics import Metrics
from counter_sync.store import OutOfRange, Store, StoreUnavailable

__all__ = [
    "ACTIONS",
    "DELTAS",
    "BadMessage",
    "Room",
    "error_event",
    "parse_action",
    "state_event",
    "users_event",
]

log = logging.getLogger("counter-sync")


# --- Events: the server -> client half of the protocol ------------------------


def users_event(count: int) -> str:
    """Tell clients how many connections are open."""
    return json.dumps({"type": "users", "count": count})


def state_event(value: int) -> str:
    """Tell clients the counter's absolute value, so only the latest one matters."""
    return json.dumps({"type": "state", "value": value})


def error_event(reason: str) -> str:
    """Tell one client why its message was rejected."""
    return json.dumps({"type": "error", "error": reason})


# --- Parsing: the client -> server half, pure and socket-free -----------------

ACTIONS = ("plus", "minus", "sync")
DELTAS = {"plus": +1, "minus": -1}  # "sync" changes nothing: it asks for the state


class BadMessage(ValueError):
    """A client message that is not a valid action; the text is the reply."""


def parse_action(message: str | bytes) -> str:
    """Turn one client message into the action it asks for: "plus", "minus" or "sync".

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
    return action


# --- A room: one counter, the users who watch it, one coalesced flush ---------


class Room:
    """One counter and the connections that share it.

    Actions and joins only mark the state dirty; one flush task, scheduled on
    the event loop, commits the net change to the store and broadcasts the
    latest value once. A burst of K actions or J joins costs one broadcast.
    """

    def __init__(
        self,
        name: str,
        value: int,
        *,
        settings: Settings,
        store: Store,
        fan_out: FanOut,
        metrics: Metrics,
        on_empty: Callable[[Room], None],
        on_doubt: Callable[[Exception], None],
    ) -> None:
        self.name = name
        self.settings = settings
        self.store = store
        self.fan_out = fan_out
        self.metrics = metrics
        self.on_empty = on_empty  # the hub releases a room nobody is in
        self.on_doubt = on_doubt  # the hub stops the server
        self.users: set[Connection] = set()
        self.value = value
        # Accepted actions not yet committed, and who sent them (for errors).
        self.pending = 0
        self.senders: dict[Connection, int] = {}
        self.newcomers: list[Connection] = []
        self.users_dirty = False
        self.state_dirty = False
        self.flush_task: asyncio.Task[None] | None = None
        # Adaptive pacing: after a broadcast, the next flush waits twice as
        # long as it took (FLUSH_PAUSE_RATIO); at low load that is microseconds.
        self.next_flush_at = 0.0
        # Shared mode: the newest value another instance committed, and the
        # users connected to the other instances, as the store reports them.
        self.observed: int | None = None
        self.elsewhere = 0

    # Changes: each marks what is dirty and makes sure a flush will run.

    def register(self, websocket: Connection) -> None:
        self.users.add(websocket)
        self.newcomers.append(websocket)
        self.users_dirty = True
        self.schedule_flush()

    def unregister(self, websocket: Connection) -> None:
        self.users.discard(websocket)
        self.users_dirty = True
        self.schedule_flush()

    def fits(self, delta: int) -> bool:
        """Tell whether one more action keeps the value within ±MAX_VALUE."""
        return abs(self.value + self.pending + delta) <= MAX_VALUE

    def act(self, websocket: Connection, delta: int) -> None:
        """Count one accepted action; it is committed by the next flush."""
        self.pending += delta
        self.senders[websocket] = self.senders.get(websocket, 0) + 1
        self.schedule_flush()

    def observe(self, *, value: int | None = None, elsewhere: int | None = None) -> None:
        """Learn what other instances changed; shown by the next flush, like every value."""
        if value is not None:
            self.observed = value
            self.state_dirty = True
        if elsewhere is not None:
            self.elsewhere = elsewhere
            self.users_dirty = True
        self.schedule_flush()

    # The flush: commit, then broadcast what changed, once.

    def schedule_flush(self) -> None:
        # Creating the task defers the flush to the next loop turn, after every
        # message already read in this one: that is the whole coalescing.
        if self.flush_task is None:
            self.flush_task = asyncio.create_task(self.flush())

    def has_work(self) -> bool:
        return bool(self.senders or self.users_dirty or self.state_dirty)

    async def flush(self) -> None:
        """Commit and broadcast until nothing is dirty, pacing under load."""
        loop = asyncio.get_running_loop()
        try:
            while self.has_work():
                delay = self.next_flush_at - loop.time()
                if delay > MIN_PACING_DELAY:
                    await asyncio.sleep(delay)
                flush_started = loop.time()
                newcomers, self.newcomers = self.newcomers, []
                users_changed, self.users_dirty = self.users_dirty, False
                if users_changed:
                    self.store.share_users(self.name, len(self.users))
                state_changed = await self.commit()
                # CPU time of the writes, not wall time: a broadcast preempted
                # by another process must not stretch the pause. And only the
                # broadcast counts: a store's commit waits off the loop.
                busy = await self.publish(users_changed, state_changed, newcomers)
                self.next_flush_at = loop.time() + FLUSH_PAUSE_RATIO * busy
                self.metrics.flush_seconds.observe(loop.time() - flush_started)
        finally:
            self.flush_task = None
            if not self.users:
                self.on_empty(self)

    async def commit(self) -> bool:
        """The one place where the value changes. Tell whether it did."""
        delta, self.pending = self.pending, 0
        senders, self.senders = self.senders, {}
        changed, self.state_dirty = self.state_dirty, False
        # Shared mode: another instance's value, unless add() returns a newer one.
        value = self.value if self.observed is None else self.observed
        self.observed = None
        if senders:
            was_up = self.store.healthy()
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                value = await self.store.add(self.name, delta)
            except StoreUnavailable as exc:
                # Not applied, so not counted: tell every sender instead of
                # dropping their actions silently.
                self.reject(senders, exc, outage_begins=was_up)
            except Exception as exc:
                # Applied or not, nobody can tell: answering "not applied"
                # could be a lie, so answer nothing and let the hub stop.
                self.on_doubt(exc)
                return False
            else:
                self.metrics.accepted_actions.inc(sum(senders.values()))
            finally:
                self.metrics.store_commit_seconds.observe(loop.time() - started)
        changed = changed or value != self.value
        self.value = value
        return changed

    def reject(
        self, senders: dict[Connection, int], exc: StoreUnavailable, *, outage_begins: bool
    ) -> None:
        """Tell each sender how many of its actions the store did not apply."""
        if isinstance(exc, OutOfRange):
            reason, result = "value out of range", "out_of_range"
        else:
            reason, result = "store unavailable", "store_unavailable"
        self.metrics.actions.labels(result).inc(sum(senders.values()))
        if result == "store_unavailable" and outage_begins:  # one line per outage
            log.warning(
                "store unavailable, actions from %d users rejected: %s",
                len(senders),
                exc,
                extra=fields("store_unavailable", room=self.name, reason=str(exc)),
            )
        for websocket, count in senders.items():
            broadcast([websocket], error_event(f"{reason}: {count} action(s) not applied"))

    def count_users(self) -> int:
        """Users here, plus in shared mode those of the other live instances."""
        return len(self.users) + self.elsewhere

    def users_message(self) -> str:
        return users_event(self.count_users())

    def state_message(self) -> str:
        return state_event(self.value)

    async def publish(
        self, users_changed: bool, state_changed: bool, newcomers: list[Connection]
    ) -> float:
        """Broadcast what changed; newcomers get users, then state, in this flush.

        Return the CPU seconds the writes took.
        """
        busy = 0.0
        if users_changed:
            busy += await self.fan_out.send(self.users_message(), self.users, self)
        if state_changed:
            busy += await self.fan_out.send(self.state_message(), self.users, self)
        elif joined := [websocket for websocket in newcomers if websocket in self.users]:
            busy += await self.fan_out.send(self.state_message(), joined, self)
        return busy

    # The connection handler: one per client, from connect to disconnect.

    async def serve(self, websocket: Connection) -> None:
        """Serve one client; whatever ends the connection, unregister it."""
        peer = format_peer(websocket)
        limit = RateLimit(self.settings.rate, self.settings.burst, websocket.loop.time())
        # One warning per interval for this connection, however much it sends.
        warnings = Throttle()
        self.register(websocket)
        log.info(
            "%s connected to %s (%d here)",
            peer,
            self.name,
            len(self.users),
            extra=fields("connect", peer=peer, room=self.name),
        )
        try:
            async for message in websocket:
                for reply in self.handle(websocket, message, limit, warnings, peer):
                    await websocket.send(reply)
                if limit.exhausted():
                    # Told a whole burst's worth of times and still sending:
                    # answering each one would cost everyone else.
                    websocket.ended_by = "rate_limit"
                    websocket.drop_reason = "closed: kept sending past the rate limit"
                    await websocket.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                    break
        except ConnectionClosedError as exc:
            # The TCP connection was lost (1006) or the library failed it:
            # keepalive timeout (1011), oversized message (1009); or the
            # liveness deadline aborted it (a drop reason says so).
            self.log_lost(websocket, peer, exc)
        except ConnectionClosedOK:
            # A reply crossed the close handshake: a clean close all the same.
            self.log_closed(websocket, peer)
        else:
            # A close handshake (1000 or 1001) ends `async for` without raising.
            self.log_closed(websocket, peer)
        finally:
            # Runs however the connection ends, even on a bug in handle().
            self.unregister(websocket)

    def handle(
        self,
        websocket: Connection,
        message: str | bytes,
        limit: RateLimit,
        warnings: Throttle,
        peer: str,
    ) -> tuple[str, ...]:
        """Do what one message asks, or say why not; return the replies for its sender."""
        if not limit.allows(websocket.loop.time()):
            self.metrics.actions.labels("rate_limited").inc()
            warnings.warning(log, "%s is over the rate limit", peer, **rejected(peer, self))
            return (error_event("rate limit exceeded; action not counted"),)
        try:
            action = parse_action(message)
        except BadMessage as exc:
            self.metrics.actions.labels("bad_message").inc()
            warnings.warning(log, "%s sent a bad message: %s", peer, exc, **rejected(peer, self))
            return (error_event(str(exc)),)
        if action == "sync":
            self.metrics.actions.labels("sync").inc()
            return (self.users_message(), self.state_message())
        if not self.fits(DELTAS[action]):
            self.metrics.actions.labels("out_of_range").inc()
            return (error_event("value out of range; action not counted"),)
        self.act(websocket, DELTAS[action])
        return ()

    def log_lost(self, websocket: Connection, peer: str, exc: ConnectionClosedError) -> None:
        reason = websocket.drop_reason or str(exc)
        code = close_code(exc)
        self.metrics.disconnects.labels(disconnect_kind(websocket, exc)).inc()
        log.info(
            "%s lost: code %d, %s",
            peer,
            code,
            reason,
            extra=fields("lost", peer=peer, room=self.name, code=code, reason=reason),
        )

    def log_closed(self, websocket: Connection, peer: str) -> None:
        code, reason = websocket.close_code, websocket.drop_reason or websocket.close_reason
        self.metrics.disconnects.labels(disconnect_kind(websocket, None)).inc()
        log.info(
            "%s disconnected: code %s, reason %r",
            peer,
            code,
            reason,
            extra=fields("disconnect", peer=peer, room=self.name, code=code, reason=reason),
        )


def rejected(peer: str, room: Room) -> dict[str, object]:
    return fields("rejected", peer=peer, room=room.name)


def close_code(exc: ConnectionClosed) -> int:
    """The code that explains the close: the peer's, else ours, else 1006."""
    if exc.rcvd is not None:
        return exc.rcvd.code
    if exc.sent is not None:
        return exc.sent.code
    return CloseCode.ABNORMAL_CLOSURE
