"""The command line: the flags (see :mod:`counter_sync.flags`), logging, signals, ``main()``.

Exit status: 0 after a signal; 2 for a bad flag, with one line naming it,
before anything starts; 1 for what only trying can tell (the port is taken,
the store cannot be opened or fails), with one line too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from websockets.frames import CloseCode

from counter_sync.app import App, start
from counter_sync.config import Settings
from counter_sync.flags import parse_args
from counter_sync.logs import setup_logging
from counter_sync.openfiles import fit_to_open_files
from counter_sync.store import StoreError

__all__ = ["CannotListen", "main", "run"]

log = logging.getLogger("counter_sync.cli")


# --- Running ------------------------------------------------------------------


class CannotListen(Exception):
    """The server cannot listen where ``--host`` and ``--port`` say; the message is one line."""


def _cannot_listen(settings: Settings, exc: OSError) -> CannotListen:
    """Say which flag to change, not only the system's ``[Errno ...]``."""
    if isinstance(exc, socket.gaierror):
        return CannotListen(f"--host {settings.host}: cannot look up this name ({exc.strerror})")
    where = f"cannot listen on --host {settings.host} --port {settings.port}"
    if exc.errno is None:
        return CannotListen(f"{where}: {exc}")
    reason = os.strerror(exc.errno).lower()
    if exc.errno == errno.EADDRINUSE:
        reason += "; another process listens there: pick another --port, or 0 for a free one"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason += "; no interface of this machine has that address (0.0.0.0 is every one)"
    elif exc.errno == errno.EACCES and settings.port < 1024:
        reason += "; ports below 1024 need privileges"
    return CannotListen(f"{where}: {reason}")


async def run(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM, then close every connection (drained, or at once).

    Return the exit status.

    A store that cannot tell whether a change was applied, or a bug in a
    background task, stops the server too, even in the middle of a drain:
    with one line, 1011 to every client, and status 1. Raises
    :exc:`CannotListen` or :exc:`~counter_sync.store.StoreError` if it
    cannot start.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        app = await start(settings)
    except OSError as exc:  # the stores turn their own into StoreError: this is the socket's
        raise _cannot_listen(settings, exc) from None
    if await _unless_failed(app, stop.wait()):
        if settings.drain_seconds <= 0:
            log.info("shutting down")
            await app.close()
            return 0
        log.info("draining: closing every connection with 1012 over %g s", settings.drain_seconds)
        # Still watching: a store that fails mid-drain must not be answered
        # with silence and exit status 0.
        if await _unless_failed(app, app.drain(settings.drain_seconds)):
            return 0
    log.critical("stopping: %s", app.hub.failed.result())
    await app.close(CloseCode.INTERNAL_ERROR, "server failed")
    return 1


async def _unless_failed(app: App, work: Coroutine[Any, Any, Any]) -> bool:
    """Run ``work`` until it ends (True) or the server fails first (False: it is cancelled)."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, app.hub.failed}, return_when=asyncio.FIRST_COMPLETED)
    if not app.hub.failed.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop when it is installed (the ``fast`` extra), else asyncio's own loop.

    uvloop's transports are written in C: measured with ``python -m bench``,
    they cut the CPU of each delivered message and the memory per connection.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: Sequence[str] | None = None, *, prog: str = "counter-sync") -> int:
    """Run the server until a signal stops it; return the exit status."""
    settings = parse_args(argv, prog=prog)
    # The library logs every connection and handshake too; ours says more.
    setup_logging(settings.log_format, levels={"websockets": logging.WARNING})
    settings = fit_to_open_files(settings)
    try:
        return event_loop_runner()(run(settings))
    except (CannotListen, StoreError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
