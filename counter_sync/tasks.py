"""Background tasks that cannot die silently, and awaits that cannot hang a stop.

A task that raises keeps its exception to itself until someone awaits it; a
background task nobody awaits would end with a bug unseen, and whatever it
did (flushing rooms, sweeping dead connections) would stop for good. Every
background task of a server is started by its :class:`Supervisor`: a bug is
logged once with its traceback and handed to ``on_crash`` (the hub, which
stops the server: better a restart than a room gone quiet). A step of a stop
is awaited :func:`within` a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Supervisor", "within"]

log = logging.getLogger("counter_sync.tasks")

_T = TypeVar("_T")


class Supervisor:
    """Starts a server's background tasks, holds them, and reports the first bug in any."""

    def __init__(self, on_crash: Callable[[BaseException], None]) -> None:
        self.on_crash = on_crash
        # The event loop keeps only weak references to tasks: these keep them alive.
        self.tasks: set[asyncio.Task[Any]] = set()

    def start(self, coroutine: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
        """Run ``coroutine`` as a task; if it ever raises, log the traceback and call ``on_crash``.

        Cancellation is not a crash.
        """
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.crashed(task.get_name(), exc)

    def crashed(self, name: str, exc: BaseException) -> None:
        """A bug in ``name`` (a task, or a callback of ours): log the traceback; ``on_crash``."""
        log.error(
            "background task %r failed: %s",
            name,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"event": "bug"},
        )
        self.on_crash(exc)


async def within(seconds: float, awaitable: Awaitable[Any], *, quiet: bool = False) -> bool:
    """Await ``awaitable`` for at most ``seconds``; tell whether it finished in time.

    It runs as a task of its own, cancelled at the deadline and not waited
    for after: one that swallows its cancellation cannot hold the caller.
    What it raises in time is raised here, unless ``quiet`` (a store that is
    stopping does not care how its goodbye to a server failed).
    """
    task = asyncio.ensure_future(awaitable)
    # Fetch the outcome whenever it comes, so that it is not reported as lost.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        finished, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        task.cancel()
    if finished and not quiet:
        task.result()
    return bool(finished)
