"""Join storms, interleaved: counter-sync, a checkout before a change, the peers, the floor.

``python -m bench`` measures one join storm per server in a run, so one run's
ratio moves with whatever else the machine did in that second (0.78 to 1.5
here). To tell a change of a few percent, ``python -m bench.joins`` runs
``--rounds`` rounds; in each, every server in turn gets a fresh process and
one storm of ``-n`` listeners from the same load processes: the join storm's
floor (bare handshakes, ``peers/handshake_only.py``), this checkout's
counter-sync, a ``--baseline`` checkout's, the least server on the
library's asyncio API (``peers/rooms_bare.py``) and the sans-I/O sketch.
Neighbours in a round share the machine's moment, so the ratios are taken
within the round; it prints each server's time over the floor's per round,
and the medians of those ratios and of its CPU per handshake.

Run: ``python -m bench.joins --rounds 20 --baseline /path/to/worktree``.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.flags import Flag, loopback, parse, positive
from bench.listeners import Worker
from bench.loadgen import LoadGen
from bench.measure import BenchSettings, phase_join
from bench.proc import raise_fd_limit, wait_idle
from bench.reporting import RESULTS_DIR, fmt, say
from bench.servers import (
    JOIN_FLOOR,
    ROOMS_LIBRARY_FLOOR,
    SANSIO_SKETCH,
    ServerSpec,
    checkout_spec,
    start_server,
)
from testkit.processes import ROOT

__all__ = ["main"]

PROG = "python -m bench.joins"

FLAGS = (
    Flag("--listeners", "listeners per join storm", positive(int), 1000, short="-n"),
    Flag("--rounds", "rounds: a storm against every server in each", positive(int), 10),
    Flag("--baseline", "another checkout, whose server.py is measured beside this one", Path),
    Flag("--workers", "load generator processes for the listeners", positive(int), 2),
    Flag("--host", "loopback address the servers listen on", loopback, "127.0.0.1"),
    Flag("--timeout", "seconds any wait may take", positive(float), 60.0),
)


def storm(spec: ServerSpec, load: LoadGen, s: BenchSettings) -> tuple[float, float]:
    """One storm against a fresh ``spec``: seconds to every first message (the floor's:
    every handshake), and CPU microseconds per handshake."""
    protocol = spec is not JOIN_FLOOR
    server = start_server(spec, s.host, s.log_dir / f"joins-{spec.name}.log", s.timeout)
    try:
        wait_idle(server.pid, timeout=s.timeout)
        join = phase_join(server, load, s, protocol=protocol)
    finally:
        server.stop()
        load.reset()
    if join["connected"] != s.listeners:
        raise RuntimeError(f"{spec.name}: {join['connected']} of {s.listeners} joined")
    seconds = join["first_message_seconds"] if protocol else join["handshakes_seconds"]
    return float(seconds), float(join["cpu_us_per_handshake"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(PROG, "Join storms, interleaved over fresh servers.", FLAGS, argv)
    raise_fd_limit()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    s = BenchSettings.for_tool(
        host=args.host,
        listeners=args.listeners,
        workers=args.workers,
        timeout=args.timeout,
        log_dir=RESULTS_DIR,
    )
    specs = [JOIN_FLOOR, checkout_spec(ROOT, "counter-sync")]
    if args.baseline is not None:
        specs.append(checkout_spec(args.baseline, f"baseline {args.baseline.name}"))
    specs += [ROOMS_LIBRARY_FLOOR, SANSIO_SKETCH]
    seen: dict[str, list[tuple[float, float]]] = {spec.name: [] for spec in specs}
    load = LoadGen(workers=args.workers, host=args.host, kind=Worker)
    load.start()
    try:
        for round_number in range(args.rounds):
            for spec in specs:
                seen[spec.name].append(storm(spec, load, s))
            floor = seen[JOIN_FLOOR.name][-1][0]
            line = ", ".join(f"{name} {fmt(times[-1][0] / floor)}" for name, times in seen.items())
            say(f"round {round_number + 1}: x floor: {line}")
    finally:
        load.close()
    floors = [seconds for seconds, _ in seen[JOIN_FLOOR.name]]
    print(f"join storms of {args.listeners}, {args.rounds} rounds, a fresh server each:")
    for name, times in seen.items():
        ratios = [seconds / floor for (seconds, _), floor in zip(times, floors, strict=True)]
        cpu = statistics.median(us for _, us in times)
        print(
            f"  {name}: x floor per round {', '.join(fmt(r) for r in ratios)};"
            f" median x{fmt(statistics.median(ratios))}, CPU {cpu:.0f} us per handshake"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
