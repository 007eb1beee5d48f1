"""A session's numbered ops on one connection: what was taken, what the store holds as done.

Exactly-once actions (see :mod:`counter_sync.store`) are kept by the store,
which tells a retry from a new op in the same atomic step as the change. What
a connection keeps here only saves the store work and answers early: a retry
of an op the store already said is done is acked at once, an op that skips
ahead is refused at once, and each op the store took is answered once, after
its commit (an ack, or an error naming it).
"""

from __future__ import annotations

from counter_sync.store import OpBatch

__all__ = ["OUT_OF_ORDER", "OUT_OF_RANGE", "OpLog"]

OUT_OF_RANGE = "value out of range; action not counted"
OUT_OF_ORDER = "op out of order"


class OpLog:
    """One session connection's numbered ops on their way to the store, and what is done.

    ``done`` is the last op the store holds as done for this session, as last
    heard (None until the store was asked); ``received`` the highest op number
    taken from this connection. The ops not yet committed are ``deltas``,
    op ``first`` onwards.
    """

    __slots__ = ("deltas", "done", "first", "gone", "reasons", "received", "session", "told")

    def __init__(self, session: str) -> None:
        self.session = session
        self.done: int | None = None
        self.received = 0
        self.first = 0
        self.deltas: list[int] = []
        self.reasons: dict[int, str] = {}  # ops rejected before the store, and why
        self.told = 0  # ops up to this one were already told they failed
        self.gone = False  # the connection ended: commit what it sent, then forget it

    def take(self, op: int, delta: int, reason: str | None) -> str | int | bool:
        """Take op number ``op``; say what to answer now.

        True: taken, the next pass answers. False: a retry of an op on its way
        to the store, whose ack is coming. An int: an ack to send at once (a
        retry of a done op). A str: an error (the op skipped ahead).
        """
        done, received = self.done, self.received
        if op != received + 1 or done is None or op <= done:  # not simply the next in line
            if done is not None and op <= done:
                return done
            if op <= received:
                return False
            if (done is not None or received) and op != max(received, done or 0) + 1:
                return OUT_OF_ORDER
        if not self.deltas:
            self.first = op
        self.deltas.append(delta)
        if reason is not None:
            self.reasons[op] = reason
        self.received = op
        return True

    def forget_done(self) -> int:
        """Drop waiting ops the store holds as done already (retries); return their net change."""
        if self.deltas and self.done is not None and self.first + len(self.deltas) <= self.done + 1:
            dropped = sum(self.deltas)
            self.deltas.clear()
            return dropped
        return 0

    def batch(self) -> OpBatch | None:
        """The ops to commit now, taken out; None if there are none."""
        if not self.deltas:
            return None
        batch = OpBatch(self.session, self.first, tuple(self.deltas))
        self.deltas = []
        return batch

    def committed(
        self, batch: OpBatch, before: int, after: int, *, applied: bool
    ) -> tuple[list[tuple[str, int]], int, int]:
        """Settle a committed batch: (errors by op, ack, actions counted)."""
        errors: list[tuple[str, int]] = []
        counted = 0
        if batch.first > before + 1 and after == before:  # skipped ahead: nothing applied
            errors = [(OUT_OF_ORDER, op) for op in range(batch.first, batch.last + 1)]
            self.received = after  # what may come next: after + 1
        elif not self.reasons and applied:  # the common case, without a loop per op
            fresh = batch.deltas[max(0, before + 1 - batch.first) :]
            counted = len(fresh) - fresh.count(0)
        else:
            for op in range(max(batch.first, before + 1), batch.last + 1):
                reason = self.reasons.pop(op, None)
                if reason is None and batch.deltas[op - batch.first]:
                    if applied:
                        counted += 1
                    else:
                        reason = OUT_OF_RANGE
                if reason is not None:
                    errors.append((reason, op))
        if self.reasons:
            for op in range(batch.first, batch.last + 1):
                self.reasons.pop(op, None)
        self.done = max(self.done or 0, after)
        return errors, self.done, counted

    def failed(self, batch: OpBatch, reason: str) -> list[tuple[str, int]]:
        """Settle a batch the store did not take: each op is told so, and its number kept.

        Each op is final (not applied), but its number must still reach the
        store, as done with a delta of 0, so that later ops follow on.
        """
        errors = [
            (self.reasons.pop(op, reason), op)
            for op in range(max(batch.first, self.told + 1), batch.last + 1)
        ]
        self.told = max(self.told, batch.last)  # a batch that fails again is not told twice
        self.first = batch.first
        self.deltas = [0] * len(batch.deltas) + self.deltas
        return errors
