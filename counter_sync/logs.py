"""Logs for operators: bounded warnings, fields on every record, text or JSON lines.

A hostile client can make warnings as fast as it can send: every warning
about one connection's input, or one address's refused handshakes, goes
through a :class:`Throttle`, which lets one line through per interval and
says in the next how many it held back.

Records about a connection carry fields (``event``, ``peer``, ``room``,
``code``, ``reason``) besides their message: the text format shows the
message, ``--log-format json`` writes the fields as one JSON object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from counter_sync.config import LOG_BATCH_LINES, LOG_FLUSH_DELAY, LOG_INTERVAL, MAX_LOG_KEYS

__all__ = ["Throttle", "ThrottleByKey", "fields", "setup_logging"]

_FIELDS = ("event", "peer", "room", "kind", "code", "reason")


def fields(event: str, **values: object) -> dict[str, object]:
    """The ``extra=`` of a log call: the event's name and what it concerns."""
    return {"event": event, **values}


class Throttle:
    """At most one warning per interval; the next one says how many were held back."""

    __slots__ = ("held_back", "interval", "next_at")  # one per connection

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.held_back = 0

    def warning(self, logger: logging.Logger, message: str, *args: object, **extra: Any) -> None:
        """Log ``message`` unless this throttle let one through less than ``interval`` ago."""
        now = time.monotonic()
        if now < self.next_at:
            self.held_back += 1
            return
        if self.held_back:
            message += " (%d more like this held back)"
            args = (*args, self.held_back)
        self.held_back = 0
        self.next_at = now + self.interval
        logger.warning(message, *args, extra=extra)


class ThrottleByKey:
    """One :class:`Throttle` per key (a client address), forgetting idle keys."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.throttles: dict[str, Throttle] = {}

    def warning(
        self, key: str, logger: logging.Logger, message: str, *args: object, **extra: Any
    ) -> None:
        """Log ``message`` as :meth:`Throttle.warning` does, throttled for ``key`` alone."""
        throttle = self.throttles.get(key)
        if throttle is None:
            if len(self.throttles) >= MAX_LOG_KEYS:
                self._forget_idle()
            throttle = self.throttles[key] = Throttle(self.interval)
        throttle.warning(logger, message, *args, **extra)

    def _forget_idle(self) -> None:
        now = time.monotonic()
        self.throttles = {
            key: throttle
            for key, throttle in self.throttles.items()
            if throttle.next_at > now or throttle.held_back
        }
        if len(self.throttles) >= MAX_LOG_KEYS:
            self.throttles.clear()  # all busy: start over rather than grow


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for name in _FIELDS[1:]:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _BatchHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: one write per ``LOG_FLUSH_DELAY``, not one per line.

    A join storm logs a line per connection, one or two per loop turn;
    written one by one, each costs a system call, and those calls were a
    twentieth of a join's time. A line waits at most ``LOG_FLUSH_DELAY``,
    or until ``LOG_BATCH_LINES`` wait; an ERROR or worse, or a line logged
    with no loop running, is written at once with what waits (a crash loses
    nothing worth reading), and so is what waits at exit (logging's own
    shutdown flushes every handler).
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.waiting.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR or len(self.waiting) >= LOG_BATCH_LINES:
            self.flush()
        elif len(self.waiting) == 1:
            try:
                asyncio.get_running_loop().call_later(LOG_FLUSH_DELAY, self.flush)
            except RuntimeError:
                self.flush()  # no loop: now

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():  # other threads log too (SQLite's)
            if self.waiting:
                lines, self.waiting = "".join(self.waiting), []
                with contextlib.suppress(Exception):  # nowhere to say so: the stream failed
                    self.stream.write(lines)
        super().flush()


def setup_logging(log_format: str, *, levels: Mapping[str, int] | None = None) -> None:
    """Log to stderr as readable text (the default) or as JSON lines.

    Records carry no caller, thread or process: the formats show none, and
    finding the caller walks the stack, on every connect and disconnect line.
    """
    logging._srcfile = None  # the logging docs' own advice ("Optimization")
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _BatchHandler()
    if log_format == "json":
        formatter: logging.Formatter = _JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name, level in (levels or {}).items():
        logging.getLogger(name).setLevel(level)
