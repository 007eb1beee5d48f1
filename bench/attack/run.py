"""What every attack shares: who attacks from where, the run's steps, small helpers."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.attack.channel import Attacker, AttackError
from bench.attack.figures import Outcome
from bench.attack.subject import Subject
from bench.loadgen import LoadGen
from bench.proc import CpuWatch
from bench.reporting import Report, spread_ms
from bench.serverlog import dropped_line, lifetimes

__all__ = ["AttackFunction", "Run"]

# Who attacks from where. To the server each address is another host.
SILENT_SOURCE = "127.0.0.1"  # attacks 3 and 4 come from here
LEGIT_SOURCE = "127.0.0.2"
HEALTH_SOURCE = "127.0.0.3"
FLOOD_SOURCE = "127.0.0.4"
STALL_SOURCE = "127.0.0.5"
STALL_DRIVER_SOURCE = "127.0.0.6"
GARBAGE_SOURCE = "127.0.0.7"
PIPELINE_SOURCE = "127.0.0.8"
FILL_SOURCE_ALL = "127.0.0.9"  # in the all-at-once run, apart from the silent sockets
LEGIT_NETWORK = "127.0.2."  # attack 3b: ten legitimate clients, ten addresses
BOUND_NETWORK = "127.0.3."  # attack 8: 50 connections per address
# (The load generator's listeners and driver use 127.0.1.x: see bench/loadgen.py.)

# The stalled-reader attack's keepalive.
STALL_PING_INTERVAL = 1.0
STALL_PING_TIMEOUT = 1.0
STALL_ROOM = "/c/stalled"  # all-at-once: its driver's actions stay out of the latency room
# Open files one attacking process keeps below its limit, for itself.
SOCKETS_PER_PROCESS = 10_000
MIB = 1024 * 1024


@dataclass
class Run:
    """What every attack needs: the flags, the load generator's listeners, where logs go."""

    args: argparse.Namespace
    load: LoadGen
    log_dir: Path

    @property
    def timeout(self) -> float:
        return float(self.args.timeout)

    def serve(self, stack: contextlib.ExitStack, name: str, *flags: str, **kw: Any) -> Subject:
        """Start a server for one attack; it is stopped when the attack ends, however it ends."""
        subject = Subject(name, self.log_dir, *flags, **kw)
        stack.callback(subject.stop)
        return subject

    def attacker(
        self, stack: contextlib.ExitStack, attack: Callable[..., Any], **kw: Any
    ) -> Attacker:
        """Start an attacking process; it is killed when the attack ends if it still runs."""
        attacker = Attacker(attack, **kw)
        stack.callback(attacker.close)
        return attacker


def join_listeners(run: Run, subject: Subject, *, count: int, driver: bool) -> int:
    """``count`` listeners from the load generator (and its driver): wait until all are in.

    Returns the value the driver was given (0 without a driver).
    """
    join = run.load.join_storm(subject.url, count, run.timeout)
    if join.connected < count:
        raise AttackError(f"only {join.connected} of {count} listeners connected: {join.errors}")
    if not driver:
        return 0
    return run.load.connect_driver(subject.url, listeners=count, timeout=run.timeout)


def delivery_latency(run: Run, subject: Subject, start_value: int) -> Report:
    """The driver acts at --rate for --seconds; per listener and action, the delay to see it."""
    args = run.args
    count = max(1, round(args.rate * args.seconds))
    server = CpuWatch(subject.pid)
    sends, progress = run.load.steady(start_value, rate=args.rate, count=count, timeout=run.timeout)
    busy = server.busy()
    delays, missing = run.load.delays(sends, run.timeout)
    return {
        "actions": count,
        "end_value": start_value + count,
        **spread_ms(delays),
        "missing": missing,
        "listeners_reached": progress.reached,
        "server_busy": busy,
    }


def loopback_addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{index + 1}" for index in range(count)]


def dropped_after(users: Sequence[Sequence[float]], count: int) -> int | None:
    """Updates sent by the time the user count went down to ``count`` (from a higher one)."""
    higher = False
    for _, users_now, sent in users:
        if users_now > count:
            higher = True
        elif users_now == count and higher:
            return int(sent)
    return None


def sent_by(timeline: Sequence[Sequence[float]], moment: float) -> int:
    """Updates the driver had sent by ``moment`` (to the 50 it notes them by)."""
    return max((int(sent) for when, sent in timeline if when <= moment), default=0)


def seen_all(latency: Report) -> int:
    """Listeners that saw every action of a latency window (all of them, or none is claimed)."""
    return int(latency["listeners_reached"]) if latency["missing"] == 0 else 0


def fate(subject: Subject, peer: str, mark: int, *, since: float, limit: float) -> str:
    """What became of ``peer`` within ``limit`` seconds ``since``, in the server's words."""
    subject.wait_for_line(dropped_line(peer), mark, max(0.0, since + limit - time.monotonic()))
    for ended, seconds, why in lifetimes(subject.lines_since(mark), peer.partition(":")[0]):
        if ended == peer:
            return f"dropped after {seconds:.1f} s: {why}"
    return f"still connected after {limit:g} s"


AttackFunction = Callable[[Run, contextlib.ExitStack, Outcome], Subject]
