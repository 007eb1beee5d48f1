"""Measure counter-sync against the servers a user would otherwise pick.

`python -m bench` runs the floors and every server in turn on this machine,
with the same load generator, and prints one table plus the ratios the
project's targets are stated in; ``--runs`` times over (3 by default), then
each target's median. The full results go to a JSON file
(bench/results/latest.json by default, ignored by git). See bench/README.md
for what each number means.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from bench.compare import SUBJECT, available, draw_chart, render_table, targets
from bench.flags import Flag, loopback, names_in, parse, positive, settings_from
from bench.floor import measure_floor
from bench.loadgen import LoadGen, run_each
from bench.measure import BenchSettings, measure_join_beside, measure_join_floor, measure_server
from bench.proc import ephemeral_ports, raise_fd_limit
from bench.reporting import RESULTS_DIR, Report, environment, loadavg, say, write_json
from bench.runs import conclude, end_run
from bench.senders import SenderWorker
from bench.servers import BASELINE, JOIN_BESIDE, JOIN_FLOOR, SERVERS, checkout_spec
from bench.steady_floor import NAME as STEADY_FLOOR
from bench.steady_floor import measure_steady_floor

__all__ = ["main"]

FLAGS = (
    Flag("--listeners", "listening clients", positive(int), 1000, quick=20, short="-n"),
    Flag("--burst", "pipelined plus actions in the burst", positive(int), 500, 20, short="-k"),
    Flag("--rate", "steady actions per second", positive(float), 10.0, quick=20.0),
    Flag("--duration", "seconds of steady actions", positive(float), 5.0, quick=1.0),
    Flag("--senders", "ingest: connections sending as fast as they can", positive(int), 50, 4),
    Flag("--actions-per-sender", "ingest: actions each sender writes", positive(int), 200, 20),
    Flag("--ingest-reps", "ingest: runs of each mode, alternating (median)", positive(int), 5, 1),
    Flag("--max-connections", "capacity: connections to try to hold", positive(int), 19_000, 200),
    Flag("--capacity-timeout", "capacity: seconds to open them in", positive(float), 60.0, 10.0),
    Flag(
        "--capacity-concurrency",
        "capacity: handshakes in flight, over all load processes",
        positive(int),
        200,
    ),
    Flag("--timeout", "seconds any other phase may take", positive(float), 60.0, quick=15.0),
    Flag("--runs", "times to run the whole comparison (targets: medians)", positive(int), 3, 1),
    Flag("--servers", "comma-separated servers to run", names_in(SERVERS), ",".join(SERVERS)),
    Flag(
        "--baseline",
        f"also run the server.py of this checkout (git worktree add PATH REV) as {BASELINE}",
        Path,
    ),
    Flag("--workers", "load generator processes for the listeners", positive(int), 2),
    Flag("--host", "loopback address the servers listen on", loopback, "127.0.0.1"),
    Flag("--output", "JSON results", Path, RESULTS_DIR / "latest.json"),
    Flag("--chart", "also draw a PNG chart of the last run here (needs matplotlib)", Path),
    Flag("--quick", "a small smoke run (seconds, not minutes)", None),
    Flag("--no-floor", "skip the floors (send() loops, bare websockets join storm)", None),
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
    if per_worker > min(limit, ports := ephemeral_ports()):
        print(
            f"warning: {per_worker} connections per load process, but each has {limit} "
            f"descriptors and its address {ports} ephemeral ports: raise --workers",
            file=sys.stderr,
        )
    names, skipped = available(args.servers, install=not args.no_install)
    if args.baseline is not None:
        if not (args.baseline / "server.py").is_file():
            print(f"python -m bench: --baseline: no server.py in {args.baseline}", file=sys.stderr)
            return 2
        # Side by side with this checkout's server: a change's before and after.
        SERVERS[BASELINE] = checkout_spec(args.baseline)
        names.insert(names.index(SUBJECT) + 1 if SUBJECT in names else 0, BASELINE)
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})", file=sys.stderr)

    report: Report = {
        "settings": asdict(settings),
        "environment": environment(),
        "skipped": skipped,
        "runs": [],
    }
    started = time.monotonic()
    save = functools.partial(write_json, args.output, report)
    for number in range(1, args.runs + 1):
        print(f"run {number} of {args.runs}", file=sys.stderr, flush=True)
        run: Report = {
            "loadavg": loadavg(),
            "steady_floor": None,
            "drain_floor": None,
            "join_floor": None,
            "servers": {},
        }
        report["runs"].append(run)
        if not run_once(run, names, settings, floors=not args.no_floor, save=save):
            return 2
        print(f"\nRun {number} of {args.runs}:")
        print(render_table(run, settings, skipped), flush=True)
    conclude(report, args.output, started)
    if args.chart is not None:
        print(draw_chart(report["runs"][-1], report, args.chart))
    return 0


def run_once(
    run: Report,
    names: list[str],
    settings: BenchSettings,
    *,
    floors: bool,
    save: Callable[[], None],
) -> bool:
    """The floors, then every server in turn, into `run`; False if the load generator failed."""
    started = time.monotonic()
    if floors:
        say("drain floor: send() loop to a selectors reader (for reference)")
        run["drain_floor"] = measure_floor(
            connections=settings.listeners, rate=settings.rate, duration=settings.duration
        )
    load = LoadGen(workers=settings.workers, host=settings.host, kind=SenderWorker)
    beside = {spec.name: spec for spec in JOIN_BESIDE.values()}

    def measure(name: str) -> Report:
        if name == JOIN_FLOOR.name:
            return measure_join_floor(load, settings)
        if name in beside:
            return measure_join_beside(beside[name], load, settings)
        if name == STEADY_FLOOR:
            say(f"steady floor: send() loop to {settings.listeners} listeners")
            try:
                return measure_steady_floor(
                    load,
                    host=settings.host,
                    listeners=settings.listeners,
                    rounds=settings.steady_actions,
                    rate=settings.rate,
                    # Counter-sync's value as its steady phase begins: a fresh
                    # server's 0 plus the burst's actions; the same digits, the
                    # same frame size.
                    welcome_value=settings.burst,
                    timeout=settings.timeout,
                )
            except Exception as exc:  # the servers still run without their floor
                load.close()
                return {"errors": [f"{type(exc).__name__}: {exc}"]}
        print(f"{name}: {SERVERS[name].description} ...", file=sys.stderr, flush=True)
        try:
            return measure_server(SERVERS[name], load, settings)
        except Exception as exc:  # one server's failure must not lose the others'
            load.close()
            return {"errors": [f"{type(exc).__name__}: {exc}"]}

    measured: Report = {}
    order = [JOIN_FLOOR.name, *beside, STEADY_FLOOR, *names] if floors else names
    ok = run_each(load, order, measure, measured, save)
    run["join_floor"] = measured.pop(JOIN_FLOOR.name, None)
    for key, spec in JOIN_BESIDE.items():
        run[key] = measured.pop(spec.name, None)
    run["steady_floor"] = measured.pop(STEADY_FLOOR, None)
    run["servers"] = measured
    if ok:
        floor_us = (run["steady_floor"] or {}).get("cpu_us_per_delivery")
        run["targets"] = targets(measured, floor_us, run["join_floor"], settings)
    end_run(run, started, save)
    return ok


if __name__ == "__main__":
    sys.exit(main())
