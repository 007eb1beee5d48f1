"""Both ends of an attacking process's pipe: it reports "ready" and "done", hears "go" and "stop".

The main process starts each attacker as its own process (:class:`Attacker`),
so the load never competes with the measuring process's event loop, and
steers it with a word at a time; the attacker (:class:`Channel`) answers
with a report, or with the error that ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from bench.proc import raise_fd_limit
from bench.reporting import Report

__all__ = ["AttackError", "Attacker", "Channel", "describe"]


class Channel:
    """An attacker's end of its pipe: report "ready" and "done", hear "go" and "stop"."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.heard: set[str] = set()

    def send(self, kind: str, **report: Any) -> None:
        self.conn.send((kind, report))

    def ready(self, **report: Any) -> None:
        self.send("ready", **report)

    def done(self, **report: Any) -> None:
        self.send("done", **report)

    def heard_of(self, word: str, wait: float = 0.0) -> bool:
        """Whether the main process has said ``word``, waiting up to ``wait`` seconds for it."""
        deadline = time.monotonic() + wait
        while word not in self.heard:
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                return False
            self.heard.add(self.conn.recv())
        return True

    async def hear(self, word: str, limit: float) -> bool:
        """:meth:`heard_of` for a coroutine: the event loop keeps running meanwhile."""
        deadline = time.monotonic() + limit
        while not self.heard_of(word):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def run_child(conn: Connection, attack: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Entry point of an attacking process: run ``attack``, report a failure instead of dying."""
    raise_fd_limit()
    channel = Channel(conn)
    try:
        outcome = attack(channel, **kwargs)
        if inspect.iscoroutine(outcome):
            asyncio.run(outcome)
    except Exception as exc:
        with contextlib.suppress(OSError):
            channel.send("error", error=f"{type(exc).__name__}: {exc}")


def describe(result: object) -> str:
    """One word for how a connection attempt ended: "in", an HTTP status, or the error."""
    if isinstance(result, ClientConnection):
        return "in"
    if isinstance(result, InvalidStatus):
        return str(result.response.status_code)
    return type(result).__name__


class AttackError(RuntimeError):
    """An attacking process failed, died, or did not report in time."""


class Attacker:
    """One attacking process, steered over a pipe: its "ready", "go", "stop" and report."""

    def __init__(self, attack: Callable[..., Any], **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = attack.__name__
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=run_child, args=(child, attack, kwargs), daemon=True, name=self.name
        )
        self.process.start()
        child.close()

    def tell(self, word: str) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(word)

    def expect(self, kind: str, timeout: float) -> Report:
        """The next report of ``kind`` ("ready" or "done"), or :exc:`AttackError`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not self.conn.poll(remaining):
                    raise AttackError(f"{self.name}: no {kind} report within {timeout:g} s")
                got, report = self.conn.recv()
            except (EOFError, OSError) as exc:
                raise AttackError(f"{self.name} died") from exc
            if got == "error":
                raise AttackError(f"{self.name}: {report['error']}")
            if got == kind:
                return dict(report)

    def ready(self, timeout: float) -> Report:
        return self.expect("ready", timeout)

    def result(self, timeout: float) -> Report:
        return self.expect("done", timeout)

    def finish(self, timeout: float) -> Report:
        """Tell it to stop, and return its final report."""
        self.tell("stop")
        return self.result(timeout)

    def close(self) -> None:
        """Kill it if it still runs: every attack ends with its processes gone."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()
