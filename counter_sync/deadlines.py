"""Deadlines for many, kept by one timer: the handshakes' (see ``admission.Gate``).

A timer per deadline is an ``asyncio.TimerHandle`` made and cancelled for
each one: a join storm of 1,000 handshakes pays it 1,000 times, though
almost every handshake ends long before its deadline. Deadlines of a few
lengths keep instead in one queue per length: each queue in the order its
deadlines were set, so they come due in that order too, and one timer is set
for the earliest front. Setting one is an insert, dropping one a removal.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

Key = TypeVar("Key")


class Deadlines(Generic[Key]):
    """Each key's deadline, ``length`` seconds after it was set; ``expired(key)`` once past it."""

    def __init__(self, expired: Callable[[Key], None]) -> None:
        self.expired = expired
        # Per length: the keys by deadline, in the order they were set (an
        # OrderedDict: its first item is found and removed in O(1)).
        self.queues: dict[float, OrderedDict[Key, float]] = {}
        self.timer: asyncio.TimerHandle | None = None

    def set(self, key: Key, length: float) -> None:
        """Give ``key`` a deadline ``length`` seconds from now (the loop's clock)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + length
        queue = self.queues.get(length)
        if queue is None:
            queue = self.queues[length] = OrderedDict()
        queue[key] = deadline
        if self.timer is None or deadline < self.timer.when():
            self._wake_at(deadline)

    def discard(self, key: Key) -> None:
        """Drop ``key``'s deadline, if it has one (its timer stays: it finds nothing due)."""
        for queue in self.queues.values():
            queue.pop(key, None)

    def _wake_at(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Call ``expired`` for every key past its deadline; set the timer for the next one."""
        self.timer = None
        now = asyncio.get_running_loop().time()
        for queue in self.queues.values():
            while queue:
                key, deadline = next(iter(queue.items()))
                if deadline > now:
                    break
                del queue[key]
                self.expired(key)
        fronts = [next(iter(queue.values())) for queue in self.queues.values() if queue]
        if fronts:
            self._wake_at(min(fronts))
