"""Measure counter-sync against the servers a user would otherwise pick.

`python -m bench` runs every server in turn on this machine, with the same
load generator, and prints one table plus the ratios the project's targets
are stated in. The full results go to a JSON file (bench/results/latest.json
by default, ignored by git). See bench/README.md for what each number means.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.compare import available, draw_chart, render_table, targets
from bench.flags import Flag, loopback, names_in, parse, positive, settings_from
from bench.floor import measure_floor
from bench.loadgen import LoadGen, run_each
from bench.measure import BenchSettings, measure_server
from bench.proc import raise_fd_limit
from bench.reporting import RESULTS_DIR, Report, environment, loadavg, write_json
from bench.senders import SenderWorker
from bench.servers import SERVERS

__all__ = ["main"]

FLAGS = (
    Flag("--listeners", "listening clients", positive(int), 1000, quick=20, short="-n"),
    Flag("--burst", "pipelined plus actions in the burst", positive(int), 500, 20, short="-k"),
    Flag("--rate", "steady actions per second", positive(float), 10.0, quick=20.0),
    Flag("--duration", "seconds of steady actions", positive(float), 5.0, quick=1.0),
    Flag("--senders", "ingest: connections sending as fast as they can", positive(int), 50, 4),
    Flag("--actions-per-sender", "ingest: actions each sender writes", positive(int), 200, 20),
    Flag("--ingest-reps", "ingest: runs of each mode, alternating (median)", positive(int), 5, 1),
    Flag("--max-connections", "idle connections to try to hold", positive(int), 10_000, 200),
    Flag("--capacity-timeout", "seconds allowed to open them", positive(float), 60.0, 10.0),
    Flag("--timeout", "seconds any other phase may take", positive(float), 60.0, quick=15.0),
    Flag("--servers", "comma-separated servers to run", names_in(SERVERS), ",".join(SERVERS)),
    Flag("--workers", "load generator processes for the listeners", positive(int), 2),
    Flag("--host", "loopback address the servers listen on", loopback, "127.0.0.1"),
    Flag("--output", "JSON results", Path, RESULTS_DIR / "latest.json"),
    Flag("--chart", "also draw a PNG chart here (needs matplotlib)", Path),
    Flag("--quick", "a small smoke run (seconds, not minutes)", None),
    Flag("--no-floor", "skip the raw socket.send floor", None),
    Flag("--no-install", "never run npm ci for the Node peer (skip it instead)", None),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        "python -m bench",
        "Measure counter-sync and its peers side by side on this machine.",
        FLAGS,
        argv,
    )
    limit = raise_fd_limit()
    settings = settings_from(BenchSettings, args, log_dir=args.output.parent / "logs")
    per_worker = settings.max_connections // settings.workers + 64
    if per_worker > limit:
        print(
            f"warning: {per_worker} descriptors per worker needed, limit is {limit}",
            file=sys.stderr,
        )
    names, skipped = available(args.servers, install=not args.no_install)
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})", file=sys.stderr)

    report: Report = {
        "settings": asdict(settings),
        "environment": environment(),
        "skipped": skipped,
        "floor": None,
        "servers": {},
    }
    started = time.monotonic()
    if not args.no_floor:
        print("floor: plain socket.send loop ...", file=sys.stderr, flush=True)
        report["floor"] = measure_floor(
            connections=settings.listeners, rate=settings.rate, duration=settings.duration
        )
    load = LoadGen(workers=settings.workers, host=settings.host, kind=SenderWorker)

    def measure(name: str) -> Report:
        print(f"{name}: {SERVERS[name].description} ...", file=sys.stderr, flush=True)
        try:
            return measure_server(SERVERS[name], load, settings)
        except Exception as exc:  # one server's failure must not lose the others'
            load.close()
            return {"errors": [f"{type(exc).__name__}: {exc}"]}

    save = functools.partial(write_json, args.output, report)
    if not run_each(load, names, measure, report["servers"], save):
        return 2
    report["seconds"] = time.monotonic() - started
    report["environment"]["loadavg_after"] = loadavg()
    floor_us = report["floor"]["cpu_us_per_message"] if report["floor"] else None
    report["targets"] = targets(report["servers"], floor_us, settings)
    write_json(args.output, report)

    print(render_table(report, settings))
    print(f"\nresults written to {args.output} ({report['seconds']:.0f}s)")
    if args.chart is not None:
        print(draw_chart(report, args.chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
