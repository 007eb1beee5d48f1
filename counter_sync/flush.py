"""The coalesced flush: what rooms owe the store and their users, paid in one pass.

A room does not write to anyone when an action arrives: it notes the change
in its :class:`RoomFlush` and asks the hub's
:class:`~counter_sync.passes.Flusher` for a pass. The pass runs on the next
event-loop turn, after every message already read in this one, and takes
every room with something to flush: one store commit for all of them, then
for each room one delivery, its users count and value serialized once. A
burst of K actions or J joins in a room costs one broadcast; a thousand small
rooms that change in the same turn cost one store round trip.

What a pass promises, room by room:

* Users, then state. A newcomer's first messages are the user count and the
  state, in that order, written by the first pass after it joined, before
  anything else is written to it (a reply it provoked earlier waits for them).
  A client that joins while a pass is committing or writing is a newcomer of
  the next pass.
* Never older. A room's state only moves to a newer ``(epoch, seq)``; every
  state message a client gets comes from it, so ``seq`` never goes back.
* Acknowledged when done. A session's numbered ops are acked (cumulatively,
  once per pass) only after the store committed them; an op that was not
  applied gets an error naming it; a retry counts once (the store checks).
* Paced under load. After a room's delivery, its next pass waits twice as
  long as the delivery's writes took (``FLUSH_PAUSE_RATIO``): at low load
  microseconds, under a flood a third of the loop at most, so that reading
  clients and handshakes keep going.
* Isolated. A big room is written in slices, one per loop turn; the pass does
  not wait for them, so a small room never waits for a big room's broadcast.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Protocol

from websockets.frames import CloseCode

from counter_sync.config import (
    FLUSH_PAUSE_RATIO,
    MAX_VALUE,
    STORE_RETRY_DELAY,
    USERS_PERIOD,
    WELCOME_PERIOD,
)
from counter_sync.connection import Connection
from counter_sync.fanout import Delivery, FanOut, text_frame
from counter_sync.metrics import Metrics
from counter_sync.oplog import OpLog
from counter_sync.store import Change, OpBatch, Outcome, RoomState, Store, StoreUnavailable
from counter_sync.tasks import Supervisor

__all__ = ["FlushedRoom", "PassRunner", "RoomFlush", "Taken"]


class FlushedRoom(Protocol):
    """The room a :class:`RoomFlush` works for: its users, its state, and its messages."""

    name: str
    users: set[Connection]
    state: RoomState

    def users_message(self) -> str:
        """The user count event, built from the count at the time of the call."""

    def state_message(self) -> str:
        """The state event of :attr:`state`, at the time of the call."""

    def ack_message(self, op: int) -> str:
        """The event that acknowledges every op up to ``op``."""

    def error_message(self, reason: str, op: int | None = None) -> str:
        """The event that tells one client why its message (``op``, if numbered) failed."""


class PassRunner(Protocol):
    """What a :class:`RoomFlush` asks of the passes (:class:`~counter_sync.passes.Flusher`)."""

    store: Store
    fan_out: FanOut
    metrics: Metrics
    supervisor: Supervisor

    def schedule(self, room: RoomFlush) -> None:
        """Make sure ``room`` is taken by a pass soon (idempotent); never raises."""


@dataclasses.dataclass(slots=True)
class Taken:
    """One room's share of a pass: what it asked the store, and whom to tell what after."""

    room: RoomFlush
    change: Change | None
    senders: dict[Connection, int]
    batches: list[tuple[Connection, OpLog, OpBatch]]
    lookups: list[tuple[Connection, OpLog]]
    newcomers: list[Connection]
    targets: list[Connection]
    users_changed: bool
    observed: RoomState | None


class RoomFlush:
    """What one room owes the store and its users since its last pass, and the pacing of the next.

    Shared mode (``--redis``) adds what the other instances did: the newest
    state one of them committed (``observed``) and their users (``elsewhere``).
    """

    def __init__(
        self,
        room: FlushedRoom,
        flusher: PassRunner,
        *,
        on_empty: Callable[[], None],
    ) -> None:
        self.room = room
        self.flusher = flusher
        self.on_empty = on_empty  # the hub releases a room nobody is in
        # Actions without a session: their net change, and who sent how many.
        self.delta = 0
        self.senders: dict[Connection, int] = {}
        # The net change of everything accepted and not yet committed.
        self.uncommitted = 0
        self.oplogs: dict[Connection, OpLog] = {}
        self.with_ops: set[Connection] = set()  # oplogs with ops to commit
        self.unknown: set[Connection] = set()  # oplogs whose last done op the store must tell
        self.newcomers: list[Connection] = []
        self.unwelcomed: set[Connection] = set()  # not yet sent their users and state
        self.held: dict[Connection, list[str]] = {}  # replies waiting for the welcome
        self.users_dirty = False
        self.observed: RoomState | None = None
        self.elsewhere = 0
        self.next_at = 0.0  # pacing: no pass before this loop time
        self.users_at = 0.0  # no broadcast of the user count alone before this one
        self.welcomes_at = 0.0  # no pass that only welcomes newcomers before this one
        self.delivering = False
        self.retry: asyncio.TimerHandle | None = None
        self.state_frame: tuple[RoomState | None, bytes] = (None, b"")

    # What the room notes, each asking for a pass.

    def welcome(self, websocket: Connection, session: str | None) -> None:
        """A user joined: the next pass sends it users, then state (and its last done op)."""
        self.newcomers.append(websocket)
        self.unwelcomed.add(websocket)
        if session is not None:
            self.oplogs[websocket] = OpLog(session)
            self.unknown.add(websocket)
        self.users_dirty = True
        self.flusher.schedule(self)
        if self.delivering or self.next_at > asyncio.get_running_loop().time():
            # Its welcome waits for a big room's broadcast and the pause
            # after it: its handshake need not (see Connection.hold_response).
            websocket.release_response()

    def leave(self, websocket: Connection) -> None:
        """A user left: the next pass sends the new count, and commits what it sent."""
        self.unwelcomed.discard(websocket)
        self.held.pop(websocket, None)
        self.unknown.discard(websocket)
        oplog = self.oplogs.get(websocket)
        if oplog is not None:
            oplog.gone = True
            if websocket not in self.with_ops:
                del self.oplogs[websocket]
        self.users_dirty = True
        self.flusher.schedule(self)

    def fits(self, delta: int) -> bool:
        """Tell whether one more action keeps the value within ±MAX_VALUE."""
        return abs(self.room.state.value + self.uncommitted + delta) <= MAX_VALUE

    def add(self, websocket: Connection, delta: int) -> None:
        """Count one accepted action without a session; the next pass commits it."""
        self.delta += delta
        self.uncommitted += delta
        self.senders[websocket] = self.senders.get(websocket, 0) + 1
        self.flusher.schedule(self)

    def take_op(self, websocket: Connection, op: int, delta: int, reason: str | None) -> str | None:
        """Take a session's op (``reason``: why it was rejected before the store); reply now?"""
        # Ops waiting that the store holds as done were forgotten when it said so.
        answer = self.oplogs[websocket].take(op, delta if reason is None else 0, reason)
        if answer is True:
            if reason is None:
                self.uncommitted += delta
            self.with_ops.add(websocket)
            self.flusher.schedule(self)
        elif isinstance(answer, str):
            return self.room.error_message(answer, op)
        elif answer is not False:
            return self.room.ack_message(answer)
        return None

    def observe(self, *, state: RoomState | None = None, elsewhere: int | None = None) -> None:
        """Learn what other instances did; shown by the next pass, like every change."""
        if state is not None and (self.observed is None or state.is_newer_than(self.observed)):
            self.observed = state
        if elsewhere is not None and elsewhere != self.elsewhere:
            self.elsewhere = elsewhere
            self.users_dirty = True
        self.flusher.schedule(self)

    def welcoming(self, websocket: Connection) -> bool:
        """Whether ``websocket`` is still waiting for its first messages (users, state)."""
        return websocket in self.unwelcomed

    def hold(self, websocket: Connection, replies: tuple[str, ...]) -> bool:
        """Keep replies for a connection not yet welcomed, to send after its users and state."""
        if websocket not in self.unwelcomed:
            return False
        self.held.setdefault(websocket, []).extend(replies)
        return True

    def _has_work(self) -> bool:
        return self.users_dirty or self._has_news()

    def _has_news(self) -> bool:
        """Whether something is owed that may not wait: changes, ops, newcomers."""
        return bool(
            self.senders or self.with_ops or self.unknown or self.newcomers or self.observed
        )

    def ready_at(self) -> float:
        """The loop time from which a pass may take this room (pacing, the count's, welcomes')."""
        if self.senders or self.with_ops or self.observed:
            return self.next_at  # a change: at once
        if self.newcomers or self.unknown:
            return max(self.next_at, self.welcomes_at)
        if self.users_dirty and self.room.users:
            return max(self.next_at, self.users_at)
        return self.next_at  # nobody left to tell: the room goes at once

    # The pass's side.

    def take(self) -> Taken:
        """Take everything owed since the last pass, as one change for the store."""
        senders, self.senders = self.senders, {}
        delta, self.delta = self.delta, 0
        batches: list[tuple[Connection, OpLog, OpBatch]] = []
        for websocket in self.with_ops:
            oplog = self.oplogs[websocket]
            if (batch := oplog.batch()) is not None:
                batches.append((websocket, oplog, batch))
            if oplog.gone:
                del self.oplogs[websocket]
        self.with_ops = set()
        lookups = [(websocket, self.oplogs[websocket]) for websocket in self.unknown]
        self.unknown = set()
        change = None
        if senders or batches or lookups:
            change = Change(
                self.room.name,
                delta,
                tuple(batch for _, _, batch in batches),
                tuple(oplog.session for _, oplog in lookups),
            )
        newcomers, self.newcomers = self.newcomers, []
        observed, self.observed = self.observed, None
        now = asyncio.get_running_loop().time()
        if newcomers or lookups:
            self.welcomes_at = now + WELCOME_PERIOD
        if self.users_dirty:
            self.flusher.store.share_users(self.room.name, len(self.room.users))
        # Everyone is told the user count at most every USERS_PERIOD: in a
        # join storm, every join would otherwise be a broadcast to the whole
        # room. A newcomer gets the current count in its welcome anyway.
        users_changed = self.users_dirty and (now >= self.users_at or not self.room.users)
        if users_changed:
            self.users_dirty = False
            self.users_at = now + USERS_PERIOD
        # The users now are the ones this pass writes to; one who joins
        # while it commits is a newcomer of the next pass. A pass that can
        # write nothing to everyone (no count, no change: in a join storm,
        # most passes only welcome newcomers) needs no copy of them.
        to_everyone = users_changed or change is not None or observed is not None
        return Taken(
            self,
            change,
            senders,
            batches,
            lookups,
            newcomers,
            list(self.room.users) if to_everyone else [],
            users_changed,
            observed,
        )

    def finish(
        self, taken: Taken, outcome: Outcome | None, failure: StoreUnavailable | None
    ) -> None:
        """Take in what the store did, then write to everyone what changed, once."""
        room = self.room
        replies: dict[Connection, list[str]] = {}
        if outcome is not None:
            self._committed(taken, outcome, replies)
        elif failure is not None:
            self._rejected(taken, failure, replies)
        else:
            self.uncommitted -= self._in_flight(taken)
        old = room.state
        for candidate in (taken.observed, outcome.state if outcome is not None else None):
            if candidate is not None and candidate.is_newer_than(room.state):
                room.state = candidate
        if room.state.epoch != old.epoch:
            self._history_lost()
        state_changed = (room.state.value, room.state.epoch) != (old.value, old.epoch)
        self._deliver(taken, state_changed, replies)

    def _history_lost(self) -> None:
        """The store started a new history: what session clients know of op numbers is void.

        They are closed with 1012: on reconnecting, each is told its last done
        op in the new history (0) and sends its unacked ops again from 1.
        """
        for websocket in list(self.oplogs):
            websocket.ended_by = "shutdown"
            self.flusher.supervisor.start(
                websocket.close(CloseCode.SERVICE_RESTART, "counter history lost; reconnect"),
                name="close after history lost",
            )

    def _in_flight(self, taken: Taken) -> int:
        """The net change a taken pass carried, for the range check of what follows."""
        ops = sum(sum(batch.deltas) for _, _, batch in taken.batches)
        return (taken.change.delta if taken.change is not None else 0) + ops

    def _committed(
        self, taken: Taken, outcome: Outcome, replies: dict[Connection, list[str]]
    ) -> None:
        room, metrics = self.room, self.flusher.metrics
        self.uncommitted -= self._in_flight(taken)
        counted = 0
        if taken.senders:
            if outcome.applied:
                counted += sum(taken.senders.values())
            else:
                self._tell_senders(taken.senders, "value out of range", "out_of_range", replies)
        for websocket, oplog, batch in taken.batches:
            before, after = outcome.done[batch.session]
            errors, ack, applied = oplog.committed(batch, before, after, applied=outcome.applied)
            self.uncommitted -= oplog.forget_done()  # ops taken meanwhile, done elsewhere
            counted += applied
            answers = replies.setdefault(websocket, [])
            answers.extend(room.error_message(reason, op) for reason, op in errors)
            answers.append(room.ack_message(ack))
        acked = {websocket for websocket, _, _ in taken.batches}
        for websocket, oplog in taken.lookups:
            _, after = outcome.done[oplog.session]
            oplog.done = max(oplog.done or 0, after)
            self.uncommitted -= oplog.forget_done()
            if websocket not in acked:
                replies.setdefault(websocket, []).append(room.ack_message(oplog.done))
        if counted:
            metrics.accepted_actions.inc(counted)

    def _rejected(
        self, taken: Taken, failure: StoreUnavailable, replies: dict[Connection, list[str]]
    ) -> None:
        """The store took nothing: tell every sender, and keep asking for what newcomers need."""
        self.uncommitted -= self._in_flight(taken)
        self._tell_senders(taken.senders, "store unavailable", "store_unavailable", replies)
        reason = f"store unavailable: {failure}; action not counted"
        for websocket, oplog, batch in taken.batches:
            errors = oplog.failed(batch, reason)
            replies.setdefault(websocket, []).extend(
                self.room.error_message(why, op) for why, op in errors
            )
            if not oplog.gone:
                self.with_ops.add(websocket)
        for websocket, _ in taken.lookups:
            if websocket in self.oplogs:
                self.unknown.add(websocket)
        if self.with_ops or self.unknown:
            self._retry_later()

    def _retry_later(self) -> None:
        """Ask for a pass once the store may be back, for the numbers it still must hear of."""
        if self.retry is None:
            loop = asyncio.get_running_loop()
            self.retry = loop.call_later(STORE_RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self.retry = None
        if self.with_ops or self.unknown:
            self.flusher.schedule(self)

    def _tell_senders(
        self,
        senders: dict[Connection, int],
        reason: str,
        result: str,
        replies: dict[Connection, list[str]],
    ) -> None:
        """Tell each sender without a session how many of its actions were not applied."""
        if not senders:
            return
        self.flusher.metrics.actions.labels(result).inc(sum(senders.values()))
        for websocket, count in senders.items():
            message = self.room.error_message(f"{reason}: {count} action(s) not applied")
            replies.setdefault(websocket, []).append(message)

    def _deliver(
        self, taken: Taken, state_changed: bool, replies: dict[Connection, list[str]]
    ) -> None:
        """Write this pass's messages: users and state once for all, then each one's replies."""
        room = self.room
        newcomers = [ws for ws in taken.newcomers if ws in room.users]
        users = text_frame(room.users_message()) if taken.users_changed or newcomers else b""
        state = self._state_frame() if state_changed or newcomers else b""
        for websocket in newcomers:
            self.unwelcomed.discard(websocket)
            if (held := self.held.pop(websocket, None)) is not None:
                replies[websocket] = held + replies.get(websocket, [])
        extras = {
            websocket: b"".join(text_frame(message) for message in messages)
            for websocket, messages in replies.items()
            if websocket in room.users and websocket not in self.unwelcomed
        }
        for websocket in replies.keys() & self.unwelcomed:  # joined during the commit
            self.held.setdefault(websocket, []).extend(replies[websocket])
        if taken.users_changed or state_changed:
            self.flusher.metrics.broadcasts.inc(taken.users_changed + state_changed)
        delivery = Delivery(
            taken.targets,
            everyone=(users if taken.users_changed else b"") + (state if state_changed else b""),
            welcome=users + state,
            newcomers=newcomers,
            extras=extras,
        )
        if not (delivery.everyone or newcomers or extras):
            self._delivered(0.0)
            return
        self.delivering = True
        self.flusher.fan_out.deliver(delivery, self, self._delivered)

    def _state_frame(self) -> bytes:
        """The room's state as a frame, built once per state: a join storm welcomes with it."""
        state = self.room.state
        if self.state_frame[0] is not state:
            self.state_frame = (state, text_frame(self.room.state_message()))
        return self.state_frame[1]

    def _delivered(self, busy: float) -> None:
        """The pass's writes are done: pace the next one, or let the room go if nobody is in it."""
        self.delivering = False
        if busy:
            self.next_at = asyncio.get_running_loop().time() + FLUSH_PAUSE_RATIO * busy
        if self._has_work():
            self.flusher.schedule(self)
        elif not self.room.users and self.retry is None:
            self.on_empty()

    def latest_messages(self, websocket: Connection) -> tuple[str, ...]:
        """Users, state and the last ack: what a lagging connection needs to catch up."""
        room = self.room
        oplog = self.oplogs.get(websocket)
        if oplog is None or oplog.done is None:
            return room.users_message(), room.state_message()
        return room.users_message(), room.state_message(), room.ack_message(oplog.done)
