"""The flush passes: every dirty room's change in one store commit, then each room's delivery.

A room notes what it owes in its :class:`~counter_sync.flush.RoomFlush` and
asks the :class:`Flusher` for a pass (:meth:`Flusher.schedule`). The pass
runs on the next event-loop turn, after every message already read in this
one, and takes every room that is due: a thousand small rooms that change in
the same turn cost one store round trip. What a pass promises each room is
said in :mod:`counter_sync.flush`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from counter_sync.config import MIN_PACING_DELAY
from counter_sync.fanout import FanOut
from counter_sync.flush import RoomFlush, Taken
from counter_sync.logs import fields
from counter_sync.metrics import Metrics
from counter_sync.store import Change, MemoryStore, Outcome, Store, StoreInDoubt, StoreUnavailable
from counter_sync.tasks import Supervisor

__all__ = ["Flusher"]

log = logging.getLogger("counter_sync.passes")


class Flusher:
    """Runs the passes: every room with something to flush, one commit for all, then delivery.

    A pass is a callback on the event loop, not a task: a memory store
    commits at once, so a pass that writes ten frames costs no task. A store
    that waits (SQLite, Redis) gets a task for its commit, and no other pass
    runs before it returns: the rooms that get dirty meanwhile make the next.
    """

    def __init__(
        self,
        store: Store,
        fan_out: FanOut,
        metrics: Metrics,
        supervisor: Supervisor,
        *,
        on_doubt: Callable[[Exception], None],
    ) -> None:
        self.store = store
        self.fan_out = fan_out
        self.metrics = metrics
        self.supervisor = supervisor
        self.on_doubt = on_doubt  # a commit's outcome is unknown: the hub stops the server
        self.dirty: dict[RoomFlush, None] = {}  # an ordered set: first come, first flushed
        # The next pass, called soon or at a paced room's time, and when
        # (-inf: on the next loop turn, before any room's time).
        self.next_pass: asyncio.Handle | None = None
        self.next_pass_at = -math.inf
        self.committing: asyncio.Task[None] | None = None  # a store that waits
        # The memory store commits at once: its passes need no task.
        self.commit_now = store.apply_all if isinstance(store, MemoryStore) else None

    def schedule(self, room: RoomFlush) -> None:
        """Make sure ``room`` is flushed by a pass soon (idempotent).

        The pass is called on the next loop turn, after every message already
        read in this one: that is the whole coalescing.
        """
        self.dirty[room] = None
        if self.committing is not None:
            return  # the pass after the commit takes it
        if self.next_pass is not None and room.next_at >= self.next_pass_at:
            return  # the pass planned takes it (called for each action: kept cheap)
        loop = asyncio.get_running_loop()
        if self.next_pass is not None:
            if self.next_pass_at <= loop.time() or room.ready_at() >= self.next_pass_at:
                return
            self.next_pass.cancel()  # a paced room's timer: this one is due sooner
        self.next_pass_at = -math.inf
        self.next_pass = loop.call_soon(self._run)

    def _plan(self) -> None:
        """Call the next pass when the first dirty room is due, if any is waiting."""
        waits = [room.ready_at() for room in self.dirty if not room.delivering]
        if not waits or self.next_pass is not None:
            return  # each room still writing asks again when it is done
        loop = asyncio.get_running_loop()
        self.next_pass_at = max(min(waits), loop.time())
        self.next_pass = loop.call_at(self.next_pass_at, self._run)

    def _run(self, *, now_or_never: bool = False) -> None:
        """One pass over the rooms that are due (all of them, ``now_or_never``), then plan."""
        self.next_pass = None
        try:
            loop = asyncio.get_running_loop()
            due = loop.time() + MIN_PACING_DELAY
            rooms = [
                room
                for room in self.dirty
                if not room.delivering and (now_or_never or room.ready_at() <= due)
            ]
            for room in rooms:
                del self.dirty[room]
            if rooms and not self._flush(rooms):
                return  # its commit waits for the store: the task plans the next
        except Exception as exc:  # a bug: the hub stops the server, as for a task's
            self.supervisor.crashed("flush pass", exc)
            return
        self._plan()

    def _flush(self, rooms: list[RoomFlush]) -> bool:
        """Take each room's change and commit them all at once; False if that must wait."""
        taken = [room.take() for room in rooms]
        changes = [each.change for each in taken if each.change is not None]
        started = asyncio.get_running_loop().time()
        if changes and self.commit_now is None:
            self.committing = self.supervisor.start(
                self._commit_and_deliver(taken, changes, started), name="flush"
            )
            return False
        outcomes: list[Outcome] = []
        if changes and self.commit_now is not None:
            outcomes = self.commit_now(changes)
            self.metrics.store_commit_seconds.observe(asyncio.get_running_loop().time() - started)
        self._deliver(taken, outcomes, None, started)
        return True

    async def _commit_and_deliver(
        self, taken: list[Taken], changes: list[Change], started: float
    ) -> None:
        """Await the store's commit, then deliver; then the next pass."""
        loop = asyncio.get_running_loop()
        outcomes: list[Outcome] = []
        failure: StoreUnavailable | None = None
        was_up = self.store.healthy()
        try:
            outcomes = await self.store.commit(changes)
        except StoreUnavailable as exc:
            failure = exc
            if was_up:  # one line per outage
                log.warning(
                    "store unavailable, actions of %d room(s) rejected: %s",
                    len(changes),
                    exc,
                    extra=fields("store_unavailable", reason=str(exc)),
                )
        except StoreInDoubt as exc:
            # Applied or not, nobody can tell: answering "not applied"
            # could be a lie, so answer nothing and let the hub stop.
            self.committing = None
            self.on_doubt(exc)
            return
        self.metrics.store_commit_seconds.observe(loop.time() - started)
        self.committing = None
        self._deliver(taken, outcomes, failure, started)
        self._run()

    def _deliver(
        self,
        taken: list[Taken],
        outcomes: list[Outcome],
        failure: StoreUnavailable | None,
        started: float,
    ) -> None:
        """Hand each room what the store did with its change; each writes to its users."""
        results = iter(outcomes)
        for each in taken:
            outcome = next(results) if each.change is not None and failure is None else None
            each.room.finish(each, outcome, failure)
        self.metrics.flush_seconds.observe(asyncio.get_running_loop().time() - started)

    def idle(self) -> bool:
        """Nothing taken in is waiting for the store or a pass (for tests and a clean stop)."""
        return self.committing is None and not self.dirty

    async def drain(self) -> None:
        """Return once every change taken in has been committed, or failed to be; paced or not."""
        while not self.idle():
            if self.committing is not None:
                await asyncio.wait({self.committing})
            elif any(not room.delivering for room in self.dirty):
                if self.next_pass is not None:
                    self.next_pass.cancel()
                self._run(now_or_never=True)
            else:
                await asyncio.sleep(0)  # rooms still writing ask again when done
