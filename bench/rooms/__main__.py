"""``python -m bench.rooms``: the rooms bench's command line, and one phase after the other.

See the package docstring (:mod:`bench.rooms`) for the phases.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from bench.flags import Flag, loopback, names_in, parse, positive, settings_from
from bench.floor import measure_floor
from bench.loadgen import LoadGen, LoadGenError, run_each
from bench.proc import raise_fd_limit
from bench.reporting import (
    RESULTS_DIR,
    Report,
    environment,
    loadavg,
    say,
    write_json,
)
from bench.rooms.floor import measure_rooms_floor
from bench.rooms.phases import PHASES, Options
from bench.rooms.report import render, targets
from bench.rooms.worker import RoomWorker
from bench.runs import conclude, end_run

__all__ = ["main"]

Result = Report

COUNT, SECONDS = positive(int), positive(float)
# A full run's value, then the --quick smoke run's where it differs.
FLAGS = (
    Flag("--rooms", "fan-out: rooms", COUNT, 1000, 6),
    Flag("--per-room", "fan-out: connections per room, its driver included", COUNT, 10, 3),
    Flag("--rate", "fan-out: actions per second in each room", SECONDS, 1.0, 4.0),
    Flag("--duration", "fan-out: seconds of actions", SECONDS, 10.0, 1.0),
    Flag("--cost-users", "cost: users in the measured room, its driver included", COUNT, 10, 3),
    Flag("--cost-actions", "cost: actions per measurement", COUNT, 200, 10),
    Flag("--cost-rate", "cost: actions per second", SECONDS, 100.0, 50.0),
    Flag("--others", "cost: idle users in other rooms for the second condition", COUNT, 10_000, 20),
    Flag("--other-rooms", "cost: idle rooms they are spread over", COUNT, 1000, 4),
    Flag("--reps", "cost: measurements per condition", COUNT, 5, 2),
    Flag("--memory-rooms", "memory: room names joined and left once each", COUNT, 10_000, 40),
    Flag("--plus-every", "memory: one room in this many gets a plus before it is left", COUNT, 10),
    Flag("--memory-concurrency", "memory: rooms visited at once per load process", COUNT, 5),
    Flag("--big-room", "isolation: listeners in the big room", COUNT, 2000, 10),
    Flag("--burst", "isolation: pipelined plus actions per burst", COUNT, 5000, 50),
    Flag("--bursts", "isolation: bursts, back to back", COUNT, 30, 2),
    Flag("--small-room", "isolation: users in the small room, the prober included", COUNT, 10, 3),
    Flag("--probe-interval", "isolation: seconds between the prober's actions", SECONDS, 0.05),
    Flag("--baseline", "isolation: seconds of probing before the bursts", SECONDS, 3.0, 0.3),
    Flag("--concurrency", "handshakes in flight per load process", COUNT, 100, 20),
    Flag("--timeout", "seconds any wait may take", SECONDS, 60.0, 20.0),
    Flag("--runs", "times to run everything, floors included (targets: medians)", COUNT, 3, 1),
    Flag("--phases", "comma-separated phases to run", names_in(PHASES), ",".join(PHASES)),
    Flag("--workers", "listener load processes", COUNT, 2),
    Flag("--host", "loopback address the server listens on", loopback, "127.0.0.1"),
    Flag("--output", "JSON results", Path, RESULTS_DIR / "rooms.json"),
    Flag("--no-floor", "skip the floors (fan-out shows no ratio)", None),
    Flag("--quick", "a small smoke run (seconds, not minutes)", None),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        "python -m bench.rooms",
        "Measure counter-sync's rooms: fan-out over many small rooms, cost per action "
        "among idle rooms, memory after many rooms, isolation from a burst.",
        FLAGS,
        argv,
    )
    o = settings_from(
        Options,
        args,
        phases=tuple(p for p in PHASES if p in args.phases),
        floor=not args.no_floor,
        log_dir=args.output.parent / "logs",
        tag=uuid.uuid4().hex[:8],
    )
    limit = raise_fd_limit()
    needed = max(o.rooms * o.per_room, o.others, o.big_room) // o.workers + 64
    if needed > limit:
        print(
            f"warning: {needed} descriptors per load process needed, limit is {limit}",
            file=sys.stderr,
        )
    command = shlex.join(
        ["python3", "-m", "bench.rooms", *(sys.argv[1:] if argv is None else argv)]
    )
    report: Result = {
        "command": command,
        "options": asdict(o),
        "environment": environment(),
        "runs": [],
    }
    started = time.monotonic()
    save = functools.partial(write_json, args.output, report)
    for number in range(1, args.runs + 1):
        say(f"run {number} of {args.runs}")
        # Each run's rooms are new: no two runs share a counter.
        run_options = dataclasses.replace(o, tag=f"{o.tag}r{number}")
        run: Result = {"loadavg": loadavg(), "floor": None, "room_floor": None, "phases": {}}
        report["runs"].append(run)
        if not run_once(run, run_options, save):
            return 2
        print(f"\nRun {number} of {args.runs}:")
        print(render(run, report, o), flush=True)
    conclude(report, args.output, started)
    return 0


def run_once(run: Result, o: Options, save: Callable[[], None]) -> bool:
    """The floors, then every phase, into `run`; False if the load generator failed."""
    started = time.monotonic()
    if "fanout" in o.phases and o.floor:
        say(f"floor: socket.send over {o.rooms * o.per_room} sockets at {o.rate:g} rounds/s")
        run["floor"] = measure_floor(
            connections=o.rooms * o.per_room, rate=o.rate, duration=o.duration, timeout=o.timeout
        )
        say(
            f"rooms floor: one epoll loop, {o.rooms} actors at {o.rate:g}/s, "
            f"{o.per_room} sockets each"
        )
        run["room_floor"] = measure_rooms_floor(
            rooms=o.rooms, per_room=o.per_room, rate=o.rate, duration=o.duration, timeout=o.timeout
        )
    load = LoadGen(workers=o.workers, host=o.host, kind=RoomWorker)
    floors = (run["floor"], run["room_floor"])

    def measure(name: str) -> Result:
        """One phase; a failure is recorded in its result, and the next phase still runs."""
        try:
            return PHASES[name](load, o, floors)
        except (LoadGenError, RuntimeError, OSError, KeyError) as exc:
            return {"errors": [f"{type(exc).__name__}: {exc}"]}

    ok = run_each(load, o.phases, measure, run["phases"], save)
    run["targets"] = targets(run["phases"], o)
    end_run(run, started, save)
    return ok


if __name__ == "__main__":
    sys.exit(main())
