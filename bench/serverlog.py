"""Reading counter-sync's text log: levels, connection lifetimes, the caps it chose.

The server's own timestamps time what happened to a connection, to the
millisecond, however busy the measuring process was.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["dropped_line", "lifetimes", "log_stats", "lowered_caps", "open_files_warning"]

LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
CONNECTED = re.compile(r" INFO (\S+) connected to ")
# "disconnected (kind): code 1006, reason ..." (older servers: "lost: ...").
ENDED = re.compile(r" INFO (\S+) (?:lost|disconnected):? (.*)$")
CAPS = re.compile(r"serving up to (\d+) users, (\d+) pending handshakes, backlog (\d+)")


def log_stats(lines: Sequence[str]) -> dict[str, Any]:
    """Lines, bytes, and lines per level of a stretch of the server's log."""
    levels = Counter(match.group(1) for line in lines if (match := LEVEL.match(line)))
    return {
        "lines": len(lines),
        "bytes": sum(len(line.encode()) for line in lines),
        "warnings": levels["WARNING"],
        "errors": levels["ERROR"] + levels["CRITICAL"],
        "tracebacks": sum(line.startswith("Traceback") for line in lines),
    }


def logged_at(line: str) -> float | None:
    """The time a text log line was written, in seconds (only differences mean anything)."""
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


def lifetimes(lines: Sequence[str], source: str) -> list[tuple[str, float, str]]:
    """Each connection from ``source`` that ended: its peer, seconds from join to drop, why."""
    joined: dict[str, float] = {}
    ended = []
    prefix = f"{source}:"
    for line in lines:
        when = logged_at(line)
        if when is None:
            continue
        if (match := CONNECTED.search(line)) and match.group(1).startswith(prefix):
            joined[match.group(1)] = when
        elif (match := ENDED.search(line)) and match.group(1) in joined:
            peer = match.group(1)
            ended.append((peer, when - joined.pop(peer), match.group(2).strip()))
    return ended


def dropped_line(peer: str) -> str:
    """A pattern for the server's line when ``peer``'s connection ends."""
    return rf"{re.escape(peer)} (lost|disconnected)\b"


def open_files_warning(lines: Sequence[str]) -> str | None:
    """The server's warning that it lowered its caps to fit its open-files limit, if any."""
    return next((line.strip() for line in lines if "open-files limit" in line), None)


def lowered_caps(line: str | None) -> str:
    """The caps the server chose from its open-files warning, in a few words."""
    match = CAPS.search(line) if line else None
    if not match:
        return "no such line"
    users, pending, backlog = match.groups()
    return f"{users} users, {pending} pending, backlog {backlog}"
