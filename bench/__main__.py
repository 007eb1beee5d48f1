"""Measure counter-sync against the servers a user would otherwise pick.

`python -m bench` runs every server in turn on this machine, with the same
load generator, and prints one table plus the ratios the project's targets
are stated in. The full results go to a JSON file (bench/results/latest.json
by default, ignored by git). See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.floor import measure_floor
from bench.loadgen import LoadGen, LoadGenError, raise_fd_limit
from bench.measure import Settings, measure_server
from bench.servers import NODE_DIR, REPO_ROOT, SERVERS, node_ready

__all__ = ["main"]

BASELINE = "inline-broadcast"
# A load generator worker this busy may have been the bottleneck (table: *).
SATURATED = 0.9
SUBJECT = "counter-sync"
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Values used when a flag is not given: a full run, or --quick for a smoke run.
FULL = {
    "listeners": 1000,
    "burst": 500,
    "rate": 10.0,
    "duration": 5.0,
    "max_connections": 10_000,
    "capacity_timeout": 60.0,
    "timeout": 60.0,
}
QUICK = {
    "listeners": 20,
    "burst": 20,
    "rate": 20.0,
    "duration": 1.0,
    "max_connections": 200,
    "capacity_timeout": 10.0,
    "timeout": 15.0,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure counter-sync and its peers side by side on this machine.",
        epilog="Numbers in [brackets] are the full run's defaults; --quick uses "
        + ", ".join(f"{k}={v:g}" for k, v in QUICK.items())
        + ".",
    )
    add = parser.add_argument
    add("-n", "--listeners", type=int, help="listening clients [1000]")
    add("-k", "--burst", type=int, help="pipelined plus actions in the burst [500]")
    add("--rate", type=float, help="steady actions per second [10]")
    add("--duration", type=float, help="seconds of steady actions [5]")
    add("--max-connections", type=int, help="idle connections to try to hold [10000]")
    add("--capacity-timeout", type=float, help="seconds allowed to open them [60]")
    add("--timeout", type=float, help="seconds any other phase may take [60]")
    add(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated servers to run (default: %(default)s)",
    )
    add(
        "--workers",
        type=int,
        default=2,
        help="load generator processes for the listeners (default: %(default)s)",
    )
    add("--host", default="127.0.0.1", help="loopback address (default: %(default)s)")
    add(
        "--output",
        type=Path,
        default=RESULTS_DIR / "latest.json",
        help="JSON results path (default: bench/results/latest.json)",
    )
    add("--chart", type=Path, help="also draw a PNG chart here (needs matplotlib)")
    add("--quick", action="store_true", help="a small smoke run (seconds, not minutes)")
    add("--no-floor", action="store_true", help="skip the raw socket.send floor")
    add(
        "--no-install",
        action="store_true",
        help="never run npm ci for the Node peer (skip it instead)",
    )
    args = parser.parse_args(argv)
    for name in FULL:
        if getattr(args, name) is None:
            setattr(args, name, (QUICK if args.quick else FULL)[name])
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {list(SERVERS)}")
    try:
        loopback = ipaddress.IPv4Address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error("--host must be an IPv4 loopback address: the bench sends nothing elsewhere")
    for name in (*FULL, "workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def available(names: list[str], *, install: bool) -> tuple[list[str], dict[str, str]]:
    """The servers that can run here, and why each of the others cannot."""
    runnable: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == SUBJECT and not (REPO_ROOT / "server.py").exists():
            skipped[name] = "server.py not found in the repo root"
        elif name == "node-ws" and (reason := node_ready()) is not None:
            if install and shutil.which("node") is not None:
                print("node-ws: installing its packages (npm ci) ...", file=sys.stderr)
                setup = subprocess.run(
                    ["npm", "ci", "--no-audit", "--no-fund"],
                    cwd=NODE_DIR,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                reason = node_ready() if setup.returncode == 0 else setup.stderr.strip()[-300:]
            if reason is None:
                runnable.append(name)
            else:
                skipped[name] = reason
        else:
            runnable.append(name)
    return runnable, skipped


def environment() -> dict[str, Any]:
    """What the numbers depend on, stored beside them."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def run(argv: list[str]) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    ws_package = NODE_DIR / "node_modules" / "ws" / "package.json"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "websockets": version("websockets"),
        "picows": version("picows"),
        "uvloop": version("uvloop"),
        "node": run(["node", "--version"]),
        "ws": json.loads(ws_package.read_text())["version"] if ws_package.exists() else None,
        # "-dirty" when tracked files (server.py, say) differ from the commit.
        "commit": run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]),
        "loadavg": loadavg(),
    }


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: was anything else using the CPUs?"""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# --------------------------------------------------------------------------
# Ratios and targets
# --------------------------------------------------------------------------


def dig(result: dict[str, Any] | None, *path: str) -> Any:
    """result[a][b]..., or None where anything on the way is missing."""
    for key in path:
        if not isinstance(result, dict):
            return None
        result = result.get(key)
    return result


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def targets(
    servers: dict[str, Any], floor_us: float | None, settings: Settings
) -> list[dict[str, Any]]:
    """The issue's targets, each as measured value, bound, and verdict."""
    subject, baseline = servers.get(SUBJECT), servers.get(BASELINE)

    def faster(*path: str) -> tuple[float | None, str]:
        # A baseline that never converged took longer than the phase timeout,
        # so timeout / subject is a lower bound on the ratio.
        mine, theirs = dig(subject, *path), dig(baseline, *path)
        if dig(baseline, path[0]) is not None and theirs is None and mine:
            return settings.timeout / mine, "lower bound: inline-broadcast timed out"
        return ratio(theirs, mine), ""

    burst_time, burst_note = faster("burst", "seconds")
    join_time, join_note = faster("join", "seconds")
    capacity = dig(subject, "capacity")
    held = None
    if capacity is not None:
        counts = [c for c in (capacity["held"], capacity["server_users"]) if c is not None]
        held = min(counts) if counts else None
    rows = [
        ("burst convergence vs inline-broadcast (x faster)", burst_time, ">=", 50, burst_note),
        (
            "burst server CPU vs inline-broadcast (x less)",
            ratio(
                dig(baseline, "burst", "server_cpu_seconds"),
                dig(subject, "burst", "server_cpu_seconds"),
            ),
            ">=",
            30,
            "",
        ),
        ("join storm vs inline-broadcast (x faster)", join_time, ">=", 10, join_note),
        (
            "steady CPU per delivery (x socket.send floor)",
            ratio(dig(subject, "steady", "cpu_us_per_delivery"), floor_us),
            "<=",
            1.5,
            "",
        ),
        (
            "server memory per idle connection (KiB)",
            dig(subject, "memory", "kib_per_connection"),
            "<=",
            15,
            "",
        ),
        (
            "concurrent connections held",
            held,
            ">=",
            10_000,
            "" if settings.max_connections >= 10_000 else f"only {settings.max_connections} tried",
        ),
    ]
    out = []
    for name, value, op, bound, note in rows:
        if value is None or (bound == 10_000 and value >= settings.max_connections < bound):
            # Holding every connection of a smaller run proves nothing about 10,000.
            verdict = "n/a"
        elif op == ">=":
            verdict = "PASS" if value >= bound else "FAIL"
        else:
            verdict = "PASS" if value <= bound else "FAIL"
        out.append(
            {
                "target": name,
                "measured": value,
                "op": op,
                "bound": bound,
                "verdict": verdict,
                "note": note,
            }
        )
    return out


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A number with `digits` significant digits; '-' for nothing measured."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


Row = tuple[str, Callable[[dict[str, Any]], str]]


def rows(settings: Settings, floor_us: float | None, base: dict[str, Any] | None) -> list[Row]:
    n, k = settings.listeners, settings.burst

    def timed(path: tuple[str, ...], reached: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            if dig(r, *path[:1]) is None:
                return "-"
            seconds = dig(r, *path)
            if seconds is None:
                return f"timeout ({fmt(dig(r, path[0], reached))}/{n})"
            return fmt(seconds)

        return cell

    def times(path: tuple[str, ...], reference: float | None) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt(ratio(dig(r, *path), reference))

    def vs_base(
        path: tuple[str, ...], smaller_is_better: bool = True
    ) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            mine, theirs = dig(r, *path), dig(base, *path)
            value = ratio(theirs, mine) if smaller_is_better else ratio(mine, theirs)
            return f"{fmt(value)}x" if value is not None else "-"

        return cell

    def steady_delays(r: dict[str, Any]) -> str:
        s = r.get("steady")
        if s is None or s["p50_ms"] is None:
            return "-"
        missing = f" ({s['missing']} missed)" if s["missing"] else ""
        return f"{s['p50_ms']:.1f}/{s['p99_ms']:.1f}/{s['max_ms']:.1f}{missing}"

    def capacity(r: dict[str, Any]) -> str:
        c = r.get("capacity")
        return "-" if c is None else f"{fmt(c['held'])} in {c['seconds']:.0f}s"

    def server_users(r: dict[str, Any]) -> str:
        c = r.get("capacity")
        if c is None:
            return "-"
        return "no answer" if c["server_users"] is None else fmt(c["server_users"])

    def per_listener(path: tuple[str, ...]) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt(ratio(dig(r, *path), n), 2)

    def join_counts(r: dict[str, Any]) -> str:
        j = r.get("join")
        return "-" if j is None else f"{j['connected']}/{j['failed']}/{j['listen_overflows']}"

    def busy(phase: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            p = r.get(phase)
            if p is None:
                return "-"
            flag = "*" if p["loadgen_busy"] >= SATURATED else ""
            return f"{p['server_busy']:.0%} / {p['loadgen_busy']:.0%}{flag}"

        return cell

    return [
        (f"join storm: all {n} see users={n} (s)", timed(("join", "seconds"), "reached")),
        ("  faster than inline-broadcast", vs_base(("join", "seconds"))),
        ("  CPU busy: server / loadgen", busy("join")),
        ("  connected / failed / SYN drops", join_counts),
        ("idle memory per connection (KiB)", lambda r: fmt(dig(r, "memory", "kib_per_connection"))),
        (f"burst: all see +{k} (s)", timed(("burst", "seconds"), "reached")),
        ("  faster than inline-broadcast", vs_base(("burst", "seconds"))),
        ("  CPU busy: server / loadgen", busy("burst")),
        ("  server CPU (s)", lambda r: fmt(dig(r, "burst", "server_cpu_seconds"))),
        ("  less CPU than inline-broadcast", vs_base(("burst", "server_cpu_seconds"))),
        ("  CPU per delivery (us)", lambda r: fmt(dig(r, "burst", "cpu_us_per_delivery"))),
        ("  x socket.send floor", times(("burst", "cpu_us_per_delivery"), floor_us)),
        ("  frames per listener", per_listener(("burst", "frames_received"))),
        (f"steady {settings.rate:g}/s: delay p50/p99/max (ms)", steady_delays),
        ("  server CPU per delivery (us)", lambda r: fmt(dig(r, "steady", "cpu_us_per_delivery"))),
        ("  x socket.send floor", times(("steady", "cpu_us_per_delivery"), floor_us)),
        (
            "  x inline-broadcast",
            vs_base(("steady", "cpu_us_per_delivery"), smaller_is_better=False),
        ),
        (f"capacity: held of {settings.max_connections:,}", capacity),
        ("  server's own users count", server_users),
        ("  memory per connection (KiB)", lambda r: fmt(dig(r, "capacity", "kib_per_connection"))),
    ]


def render_table(report: dict[str, Any], settings: Settings) -> str:
    servers: dict[str, Any] = report["servers"]
    floor = report.get("floor")
    floor_us = floor["cpu_us_per_message"] if floor else None
    names = list(servers)
    table = [["", *names]]
    for label, cell in rows(settings, floor_us, servers.get(BASELINE)):
        table.append([label, *(cell(servers[name]) for name in names)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            text.ljust(widths[0]) if i == 0 else text.rjust(widths[i]) for i, text in enumerate(row)
        )
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    if floor:
        lines.append("")
        lines.append(
            f"socket.send floor: {floor['cpu_us_per_message']:.2f} us CPU per delivered "
            f"{floor['frame_bytes']}-byte frame ({floor['delivered']:,} of "
            f"{floor['messages']:,} delivered over {floor['connections']} sockets)"
        )
    for name, result in servers.items():
        for error in result.get("errors", []):
            lines.append(f"{name}: {error}")
        for phase in ("burst", "steady"):
            to_driver = dig(result, phase, "driver", "errors") or 0
            to_listeners = dig(result, phase, "error_events") or 0
            if to_driver or to_listeners:
                lines.append(
                    f"{name}: {phase}: {to_driver} error events to the driver, "
                    f"{to_listeners} to listeners (see the server log)"
                )
    for name, reason in report["skipped"].items():
        lines.append(f"{name}: skipped ({reason})")
    if any(
        (dig(result, phase, "loadgen_busy") or 0) >= SATURATED
        for result in servers.values()
        for phase in ("join", "burst")
    ):
        lines.append(
            f"* a load generator worker was >= {SATURATED:.0%} busy: that time is an upper bound"
        )
    load = report["environment"]["loadavg"]
    if load[0] > 1.0:
        lines.append(
            f"note: load average was {load[0]:.2f} before the run: other processes shared "
            f"the {report['environment']['cpus']} CPUs, so times and CPU figures are noisier"
        )
    lines.append("")
    lines.append(f"Targets ({SUBJECT} vs {BASELINE}, measured in this run):")
    for t in report["targets"]:
        note = f"  ({t['note']})" if t["note"] else ""
        lines.append(
            f"  {t['verdict']:4}  {t['target']:48} {fmt(t['measured']):>8}  "
            f"target {t['op']} {t['bound']:,}{note}"
        )
    return "\n".join(lines)


def draw_chart(report: dict[str, Any], path: Path) -> str:
    """A PNG of the headline numbers; matplotlib is optional."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    panels = [
        ("join storm (s)", ("join", "seconds")),
        ("burst convergence (s)", ("burst", "seconds")),
        ("burst server CPU (s)", ("burst", "server_cpu_seconds")),
        ("steady CPU per delivery (us)", ("steady", "cpu_us_per_delivery")),
        ("steady p99 delay (ms)", ("steady", "p99_ms")),
        ("memory per idle conn (KiB)", ("memory", "kib_per_connection")),
    ]
    names = list(report["servers"])
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), layout="constrained")
    for ax, (title, key) in zip(axes.flat, panels, strict=True):
        values = [dig(report["servers"][name], *key) or 0 for name in names]
        ax.bar(names, values, color=["C0" if n == SUBJECT else "C7" for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
        if all(v > 0 for v in values) and max(values) / min(values) > 50:
            ax.set_yscale("log")
    floor = report.get("floor")
    if floor:
        axes.flat[3].axhline(
            floor["cpu_us_per_message"], color="C3", linestyle="--", label="socket.send floor"
        )
        axes.flat[3].legend()
    fig.suptitle(
        f"counter-sync bench, {report['settings']['listeners']} listeners, "
        f"{report['environment']['date']}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return f"chart written to {path}"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_fd_limit()
    settings = Settings(
        host=args.host,
        listeners=args.listeners,
        burst=args.burst,
        rate=args.rate,
        duration=args.duration,
        max_connections=args.max_connections,
        capacity_timeout=args.capacity_timeout,
        timeout=args.timeout,
        workers=args.workers,
        log_dir=args.output.parent / "logs",
    )
    per_worker = settings.max_connections // settings.workers + 64
    if per_worker > limit:
        print(
            f"warning: {per_worker} descriptors per worker needed, limit is {limit}",
            file=sys.stderr,
        )
    names, skipped = available(args.servers.split(","), install=not args.no_install)
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})", file=sys.stderr)

    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    load = LoadGen(workers=settings.workers, host=settings.host)
    try:
        for name in names:
            if not load.healthy():
                # Also restarts the workers after a server that broke them.
                load.close()
                load.start()
            print(f"{name}: {SERVERS[name].description} ...", file=sys.stderr, flush=True)
            try:
                report["servers"][name] = measure_server(SERVERS[name], load, settings)
            except Exception as exc:  # one server's failure must not lose the others'
                report["servers"][name] = {"errors": [f"{type(exc).__name__}: {exc}"]}
                load.close()
            # Saved after every server, so an interrupted run keeps what it measured.
            args.output.write_text(json.dumps(report, indent=2) + "\n")
    except LoadGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        load.close()
    report["seconds"] = time.monotonic() - started
    report["environment"]["loadavg_after"] = loadavg()
    floor_us = report["floor"]["cpu_us_per_message"] if report["floor"] else None
    report["targets"] = targets(report["servers"], floor_us, settings)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print(render_table(report, settings))
    print(f"\nresults written to {args.output} ({report['seconds']:.0f}s)")
    if args.chart is not None:
        print(draw_chart(report, args.chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
