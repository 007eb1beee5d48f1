"""Where the counters live: the interface every store implements, and the default one.

The hub commits the changes of every room that flushes in one pass with one
:meth:`Store.commit` call, never one call per action. Three stores implement
it: :class:`MemoryStore` below (the default and the model),
:mod:`counter_sync.sqlite_store` (``--state``: durable) and
:mod:`counter_sync.redis_store` (``--redis``: shared by several instances).
Stores import this module, :mod:`counter_sync.config` and
:mod:`counter_sync.tasks`, nothing else of the server, so imports go one way:
the server knows the stores, the stores know only this interface.

A counter is named by its room: ``"/"`` (:data:`DEFAULT_ROOM`) is the one at
``/``, and ``"votes"`` the one at ``/c/votes``.

**Versions.** Every value a store hands out comes with its version: ``seq``
grows with each committed change of the room (by one or more: stores draw it
from one counter for all their rooms, so a room forgotten and opened again
never goes back), and ``epoch`` names the store's history. A new epoch means
the history is gone (a new memory store, a Redis that lost its data): values
and sessions start over, and nothing of the old epoch compares with the new.

**Sessions.** A client that wants each click counted exactly once numbers its
actions (ops) 1, 2, 3... per session and room. The store keeps, for each
(room, session), the last op it holds as done, and changes it in the same
atomic step as the value: so an op that reaches the store twice (a retry
after a reconnect, maybe through another instance) counts once. An op that
was rejected before the store (rate limit, say) still counts as done: it
reaches the store with a delta of 0, so that its number is used up.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from counter_sync.config import FORGET_AFTER, LOG_INTERVAL, MAX_SESSIONS, MAX_VALUE, SESSION_TTL

__all__ = [
    "DEFAULT_ROOM",
    "Change",
    "MemoryStore",
    "Observer",
    "OpBatch",
    "Outcome",
    "RoomState",
    "Sessions",
    "Store",
    "StoreError",
    "StoreInDoubt",
    "StoreUnavailable",
    "apply_batch",
    "apply_change",
    "new_epoch",
    "one_line",
]

log = logging.getLogger("counter_sync.store")

DEFAULT_ROOM = "/"  # the counter at /, the one every version of the server had


class StoreUnavailable(Exception):
    """The store did not apply a change; nothing of it was counted.

    The text is the reason the senders are given, e.g. "store unavailable".
    """


class StoreInDoubt(Exception):
    """A change may or may not have been applied (say, fsync failed), and nobody can tell.

    The server must not answer "not applied" then: it stops, with one line for
    the operator, so that clients reconnect to a restarted server and see the
    truth.
    """


class StoreError(Exception):
    """The store cannot be opened at start-up; the text is one line for the operator."""


@dataclasses.dataclass(frozen=True, slots=True)
class RoomState:
    """A room's value and its version: ``(epoch, seq)`` orders the values of one room."""

    value: int
    seq: int
    epoch: str

    def is_newer_than(self, other: RoomState) -> bool:
        """Tell whether this state may replace ``other``: a later seq, or another history."""
        return self.epoch != other.epoch or self.seq > other.seq


@dataclasses.dataclass(frozen=True, slots=True)
class OpBatch:
    """One session's numbered ops in one commit: ``deltas[i]`` is op ``first + i``.

    A delta is what the op adds: +1 or -1 for a click, any integer for the
    API's add (kept as a one-op session by its Idempotency-Key), or 0 for an
    op that was rejected before the store and only uses up its number.
    """

    session: str
    first: int
    deltas: tuple[int, ...]

    @property
    def last(self) -> int:
        return self.first + len(self.deltas) - 1


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """What one room's flush (or one API request) asks of the store.

    ``delta`` is the net change of the actions sent without a session; ``ops``
    the numbered ops of sessions; ``lookups`` the sessions whose last done op
    the server wants to know (they just joined). ``set_to`` (the API's set)
    makes the value that, before the deltas, unless one of the ``ops`` is a
    retry: a set sent again must not undo what came after it.
    """

    room: str
    delta: int = 0
    ops: tuple[OpBatch, ...] = ()
    lookups: tuple[str, ...] = ()
    set_to: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What the store did with one :class:`Change`.

    ``applied`` is False when the change would have taken the value beyond
    ±MAX_VALUE: then none of its deltas counted, but its ops are done (used
    up) all the same. ``done`` maps every session of the change's ops and
    lookups to ``(before, after)``: its last done op before this commit and
    after it. Ops up to ``before`` were retries and counted nothing; a batch
    whose first op is above ``before + 1`` skipped ahead and was not applied
    (``after == before``).
    """

    state: RoomState
    applied: bool
    done: dict[str, tuple[int, int]]


def apply_batch(last_done: int, batch: OpBatch) -> tuple[int, int]:
    """Where a batch starts counting, and the last op done after it, given the last before.

    Returns ``(start, after)``: the deltas from op ``start`` on count. A batch
    that skips ahead counts nothing (``start`` past its end). This is the one
    rule every store applies (the Redis script and SQL repeat it).
    """
    if batch.first > last_done + 1:
        return batch.last + 1, last_done
    return max(batch.first, last_done + 1), max(last_done, batch.last)


def apply_change(
    change: Change, value: int, last_done: Callable[[str], int]
) -> tuple[int, bool, dict[str, tuple[int, int]]]:
    """What ``change`` makes of ``value``: the new value, whether it was applied, the ops done.

    ``last_done(session)`` is the last op the store holds as done for a
    session of the room; the ops done are ``(before, after)`` per session.
    A set sent again does not undo what came after it; a change that would
    leave ±MAX_VALUE is not applied (the value stays, the ops' numbers are
    still done). The stores in Python apply it; the Redis script repeats it.
    """
    delta = change.delta
    done: dict[str, tuple[int, int]] = {}
    retried = False
    for batch in change.ops:
        if batch.session in done:
            first_before, before = done[batch.session]
        else:
            first_before = before = last_done(batch.session)
        start, after = apply_batch(before, batch)
        retried |= start != batch.first
        delta += sum(batch.deltas[start - batch.first :])
        done[batch.session] = (first_before, after)
    for session in change.lookups:
        if session not in done:
            last = last_done(session)
            done[session] = (last, last)
    start_value = value if change.set_to is None or retried else change.set_to
    applied = abs(start_value + delta) <= MAX_VALUE
    return (start_value + delta if applied else value), applied, done


def new_epoch() -> str:
    """A name for a new history: random, so that two never meet."""
    return uuid.uuid4().hex[:16]


def one_line(error: BaseException | str) -> str:
    """An error's text on one line, for the operator: SQLite's and Redis's can span lines.

    An exception with no text is named by its type.
    """
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        return type(error).__name__
    return text


class Observer(Protocol):
    """Who a shared store tells what the other instances did (the hub)."""

    def observe(
        self, room: str, *, state: RoomState | None = None, elsewhere: int | None = None
    ) -> None:
        """Learn a newer state of ``room`` another instance committed, or its users there."""


class Store(Protocol):
    """Where the counters are kept, and how their changes reach other instances.

    A store that other instances change too (``--redis``) reports what they
    did to the observer given to :meth:`watch`, for the rooms it was asked to
    :meth:`load` and not yet to :meth:`release`. A local store never calls the
    observer.
    """

    @property
    def epoch(self) -> str:
        """The name of the store's current history."""

    async def open(self) -> None:
        """Get ready at start-up; raise :exc:`StoreError` with one line if it cannot."""

    async def load(self, room: str) -> RoomState:
        """Return the state of ``room`` (0 for a new one): someone joins it here.

        Raise :exc:`StoreUnavailable` if it cannot be read now.
        """

    async def commit(self, changes: Sequence[Change]) -> list[Outcome]:
        """Apply the changes of one flush pass, each room's atomically; one outcome each, in order.

        Raise :exc:`StoreUnavailable` if none was applied, :exc:`StoreInDoubt`
        if nobody can tell. Never applies part of one room's change.
        """

    def release(self, room: str) -> None:
        """Nobody here watches ``room`` any more: stop doing work for it."""

    async def peek(self, room: str) -> tuple[RoomState, int]:
        """Read ``room`` without joining it: its state, and its users on other instances.

        Raise :exc:`StoreUnavailable` if it cannot be read now.
        """

    async def counters(self, prefix: str, after: str, limit: int) -> list[tuple[str, RoomState]]:
        """Up to ``limit`` counters kept, by name: those starting with ``prefix``, after ``after``.

        Raise :exc:`StoreUnavailable` if they cannot be read now.
        """

    async def forget(self, room: str) -> RoomState:
        """Reset ``room`` to 0 and forget it; return its new state.

        Its sessions are kept (they lapse after their TTL): a client connected
        now goes on numbering where it was.

        Raise :exc:`StoreUnavailable` if it was not done.
        """

    def can_open(self, room: str) -> bool:
        """Tell whether ``room`` may be opened now (a memory store keeps a bounded number)."""

    def healthy(self) -> bool:
        """Tell whether changes can be applied right now (for ``/readyz``)."""

    async def close(self) -> None:
        """Release the store; every change ``commit`` returned for is already applied."""

    def watch(self, observer: Observer) -> None:
        """Report the other instances' changes to ``observer`` from now on."""

    def share_users(self, room: str, here: int) -> None:
        """Count the ``here`` users of ``room`` on this instance on every instance."""


class Sessions:
    """The last done op of each (room, session), for at least ``ttl`` seconds, at most ``limit``.

    In memory, every entry is a few integers: the oldest idle entries go first
    when there are too many (counted in :attr:`evicted`), and any entry idle
    for longer than ``ttl`` goes when the next one is written.
    """

    def __init__(self, *, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        # Oldest write first: (room, session) -> (last done op, when written).
        self.entries: collections.OrderedDict[tuple[str, str], tuple[int, float]] = (
            collections.OrderedDict()
        )
        self.evicted = 0

    def last_done(self, room: str, session: str) -> int:
        """The last done op of ``session`` in ``room``; 0 if none is remembered."""
        entry = self.entries.get((room, session))
        return 0 if entry is None else entry[0]

    def set_done(self, room: str, session: str, op: int) -> None:
        """Remember ``op`` as done; drop the entries idle past ``ttl``, then any over ``limit``."""
        now = time.monotonic()
        key = (room, session)
        self.entries[key] = (op, now)
        self.entries.move_to_end(key)
        self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        entries = self.entries
        while entries:
            key, (_, written) = next(iter(entries.items()))
            if now - written > self.ttl:
                del entries[key]
            elif len(entries) > self.limit:
                del entries[key]
                self.evicted += 1
            else:
                break


class MemoryStore:
    """The default store: the values live in this process and die with it.

    It keeps a counter for as long as someone uses it: while anyone here is in
    its room, and ``forget_after`` seconds after the last change or join.
    When it keeps ``max_counters`` of them, the one used least recently with
    nobody in it is forgotten to make room (counted in :attr:`forgotten`). A
    forgotten counter reads as 0 again, with the store's latest ``seq``. Each
    start is a new epoch.
    """

    def __init__(
        self,
        *,
        max_counters: int,
        forget_after: float = FORGET_AFTER,
        session_ttl: float = SESSION_TTL,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        # Least recently used first: room -> (its state, when last used).
        self.values: collections.OrderedDict[str, tuple[RoomState, float]] = (
            collections.OrderedDict()
        )
        self.in_use: set[str] = set()  # loaded and not released: never forgotten
        self.max_counters = max_counters
        self.forget_after = forget_after
        self.forgotten = 0  # counters dropped to make room
        self.unreported = 0  # of those, not yet in a log line
        self.report_at = 0.0
        self.sessions = Sessions(ttl=session_ttl, limit=max_sessions)
        self.seq = 0  # one sequence for every room, so a forgotten room never goes back
        self._epoch = new_epoch()

    @property
    def epoch(self) -> str:
        return self._epoch

    async def open(self) -> None:
        pass

    async def load(self, room: str) -> RoomState:
        self.in_use.add(room)
        state = self._state(room)
        self._keep(room, state)
        return state

    async def commit(self, changes: Sequence[Change]) -> list[Outcome]:
        return self.apply_all(changes)

    def apply_all(self, changes: Sequence[Change]) -> list[Outcome]:
        """:meth:`commit`, at once: nothing here waits (the flush needs no task for it)."""
        return [self._apply(change) for change in changes]

    def _apply(self, change: Change) -> Outcome:
        room = change.room
        state = self._state(room)
        value, applied, done = apply_change(
            change, state.value, lambda session: self.sessions.last_done(room, session)
        )
        if value != state.value:
            self.seq += 1
            state = RoomState(value, self.seq, self._epoch)
        self._keep(room, state)
        for session, (before, after) in done.items():
            if after != before:
                self.sessions.set_done(room, session, after)
        return Outcome(state, applied, done)

    def _state(self, room: str) -> RoomState:
        kept = self.values.get(room)
        return RoomState(0, self.seq, self._epoch) if kept is None else kept[0]

    def _keep(self, room: str, state: RoomState) -> None:
        """Remember ``room`` as used now; forget the stale, then the least used if too many."""
        now = time.monotonic()
        values = self.values
        values[room] = (state, now)
        values.move_to_end(room)
        for _ in range(len(values)):  # at most one look at each: in use ones go to the back
            name, (_, used) = next(iter(values.items()))
            stale = now - used > self.forget_after
            if len(values) <= self.max_counters and not stale:
                break
            if name in self.in_use:
                values.move_to_end(name)
                continue
            del values[name]
            self.seq += 1  # it reads as 0 again, at a seq past the one it had
            if not stale:
                self.forgotten += 1
                self.unreported += 1
        if self.unreported and now >= self.report_at:
            log.warning(
                "memory store full: forgot %d counter(s) used least recently, with nobody in "
                "them, to make room (--max-rooms %d counters are kept)",
                self.unreported,
                self.max_counters,
            )
            self.unreported = 0
            self.report_at = now + LOG_INTERVAL

    def release(self, room: str) -> None:
        self.in_use.discard(room)
        if room in self.values:
            self._keep(room, self.values[room][0])  # left just now: recently used

    async def peek(self, room: str) -> tuple[RoomState, int]:
        return self._state(room), 0

    async def counters(self, prefix: str, after: str, limit: int) -> list[tuple[str, RoomState]]:
        names = sorted(name for name in self.values if name.startswith(prefix) and name > after)
        return [(name, self.values[name][0]) for name in names[:limit]]

    async def forget(self, room: str) -> RoomState:
        self.values.pop(room, None)
        self.seq += 1
        state = RoomState(0, self.seq, self._epoch)
        if room in self.in_use:
            self._keep(room, state)
        return state

    def can_open(self, room: str) -> bool:
        return True  # the least used counter makes room; the hub caps the rooms in use

    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    def watch(self, observer: Observer) -> None:
        pass  # nobody else changes these counters

    def share_users(self, room: str, here: int) -> None:
        pass
