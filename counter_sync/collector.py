"""Python's cyclic garbage collector, kept from stopping the world, and from looking twice.

A collection looks at every object of the generations it collects that may
be in a reference cycle, and the event loop stands still meanwhile. Each
connection holds a couple of hundred such objects for as long as it is open:
left to Python's generations, a join storm has each of them looked at by a
young collection, again by a middle one, again by a full one; and with
10,000 connections open a full collection took 0.05 to 0.9 s.

So what survives a collection is frozen (``gc.freeze()``, which moves lists
and costs nothing): moved out of the collector's sight.

* After every full collection: the next one looks only at what was made
  since, however many connections are open, and full collections come often
  (``GC_THRESHOLDS``), so that is little.
* After a young collection too, while more connections are open than ever
  before: in a join storm (the first after a start, or one that brings more
  clients than any before), what survives is mostly new connections, which
  stay, and each is looked at once, by the young collection that finds it.
  Measured in a join storm of 1,000: 10 us of collection a connection,
  against 30 with full collections alone. Otherwise (steady traffic, churn,
  clients coming back after a drop) what a young collection finds alive is
  mostly short-lived, and left to the generations, which free it.

The price: an object frozen alive that later becomes garbage in a cycle (a
connection that closed, say) is not freed, since the collector cannot see
it. Everything is thawed (``gc.unfreeze()``) and collected in full, one long
pause that frees them, once the connections closed since the last thaw add
up to a quarter of those open (``GC_THAW_SHARE``, and at least
``GC_THAW_MINIMUM``), or once ``GC_FREEZES_PER_THAW`` collections have frozen
what they found: each freezes at most what was alive then, so the garbage
this holds is bounded by both. The long pause comes after churn, or after
hours of traffic, never during a join storm.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from counter_sync.config import (
    GC_FREEZES_PER_THAW,
    GC_THAW_MINIMUM,
    GC_THAW_SHARE,
    GC_THRESHOLDS,
)

__all__ = ["Collector"]


class Collector:
    """Freezes what survives each full collection, and each young one while connections grow.

    The garbage collector is one per process: several servers in one process
    (as in the tests) each keep their count, and any of them may freeze or thaw.
    """

    def __init__(self, count_open: Callable[[], int]) -> None:
        self.count_open = count_open  # connections open now
        self.peak = 0  # the most connections ever open here at a freeze
        self.closed = 0  # connections that closed since the last thaw
        self.freezes = 0  # collections whose survivors were frozen since the last thaw
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Collect what start-up left, freeze the rest, and freeze after collections from now."""
        self.loop = asyncio.get_running_loop()
        gc.collect()
        gc.set_threshold(*GC_THRESHOLDS)
        gc.freeze()
        gc.callbacks.append(self._collected)

    def stop(self) -> None:
        """Thaw, so that what this server leaves behind is collected. Idempotent."""
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)
            gc.unfreeze()

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        # Every object left is live now, or was when the collection began.
        if phase != "stop" or not (info["generation"] == 2 or self._growing()):
            return
        gc.freeze()
        self.freezes += 1
        if self.freezes == GC_FREEZES_PER_THAW and self.loop is not None:
            # Not from here: a collection cannot start inside another one,
            # and this may be another thread's (SQLite's writer).
            self.loop.call_soon_threadsafe(self.thaw)

    def _growing(self) -> bool:
        """Whether more connections are open than ever before at a freeze."""
        still_open = self.count_open()
        if still_open <= self.peak:
            return False
        self.peak = still_open
        return True

    def connection_closed(self, still_open: int) -> None:
        """Count a closed connection; thaw once enough of them may hold frozen garbage."""
        self.closed += 1
        if self.closed >= max(GC_THAW_MINIMUM, int(still_open * GC_THAW_SHARE)):
            self.thaw()

    def thaw(self) -> None:
        """Unfreeze everything, and free what is garbage in one full collection."""
        self.closed = self.freezes = 0
        gc.unfreeze()
        gc.collect()  # freezes what it leaves (see _collected)
