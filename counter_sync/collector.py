"""Python's cyclic garbage collector, kept from stopping the world for long.

A full collection looks at every object that may be in a reference cycle,
and the event loop stands still meanwhile. Each connection holds a couple of
hundred such objects for as long as it is open, so with 10,000 connections a
full collection took 0.05 to 0.9 s, and a join storm of 10,000 set off
several of them: every client waited.

So after each full collection, what survived it is frozen (``gc.freeze()``):
moved out of the collector's sight. The next full collection then looks only
at what was made since the last one, however many connections are open; and
full collections come often (``GC_THRESHOLDS``), so that is little: measured
while 10,000 connections joined, no pause over 10 ms.

The price: a frozen connection that closes is garbage the collector cannot
see, and its cycles are not freed. So once connections that closed add up to
a quarter of those open (``GC_THAW_SHARE``, and at least ``GC_THAW_MINIMUM``),
everything is thawed (``gc.unfreeze()``), and the next full collection, a
long one, frees them; what it leaves is frozen again. The memory this holds is
bounded by those closed connections; the long pause comes after churn, never
during a join storm.
"""

from __future__ import annotations

import gc

from counter_sync.config import GC_THAW_MINIMUM, GC_THAW_SHARE, GC_THRESHOLDS

__all__ = ["Collector"]


class Collector:
    """Freezes what survives each full collection; thaws it once enough connections closed.

    The garbage collector is one per process: several servers in one process
    (as in the tests) each keep their count, and any of them may thaw.
    """

    def __init__(self) -> None:
        self.closed = 0  # connections that closed since the last thaw

    def start(self) -> None:
        """Collect what start-up left, freeze the rest, and freeze after every full collection."""
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
        # After a full collection, every object left is live: freeze them all.
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()

    def connection_closed(self, still_open: int) -> None:
        """Count a closed connection; thaw once enough of them may hold frozen garbage."""
        self.closed += 1
        if self.closed >= max(GC_THAW_MINIMUM, int(still_open * GC_THAW_SHARE)):
            self.closed = 0
            gc.unfreeze()
