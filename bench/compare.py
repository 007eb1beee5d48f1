"""``python -m bench``'s report: the side-by-side table, the targets, and the chart.

Every target is a ratio between counter-sync and ``inline-broadcast``, or a
figure against a bound, all measured in the same run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.capacity import UPDATE_WITHIN
from bench.floor import floor_line
from bench.ingest import Target, ingest_rows, ingest_targets
from bench.measure import BenchSettings
from bench.reporting import Report, fmt, meets, ratio, table, targets_table, verdict
from bench.servers import JOIN_BESIDE, NODE_DIR, node_ready
from bench.steady_floor import steady_floor_line
from testkit.processes import ROOT

__all__ = [
    "BASELINE",
    "CAPACITY_GOAL",
    "SUBJECT",
    "available",
    "draw_chart",
    "join_beside_line",
    "join_floor_line",
    "render_table",
    "targets",
]

BASELINE = "inline-broadcast"
SUBJECT = "counter-sync"
# A load generator worker this busy may have been the bottleneck (table: *).
SATURATED = 0.9
# Connections one process must hold (the open-files hard limit here is 20,000).
CAPACITY_GOAL = 19_000


def available(names: list[str], *, install: bool) -> tuple[list[str], dict[str, str]]:
    """The servers that can run here, and why each of the others cannot."""
    runnable: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == SUBJECT and not (ROOT / "server.py").exists():
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


def dig(result: Report | None, *path: str) -> Any:
    """result[a][b]..., or None where anything on the way is missing."""
    for key in path:
        if not isinstance(result, dict):
            return None
        result = result.get(key)
    return result


def targets(
    servers: Report,
    floor_us: float | None,
    join_floor: Report | None,
    settings: BenchSettings,
) -> list[Report]:
    """The project's targets, each as measured value, bound, and verdict.

    The goals against floors come first, each floor measured in the same
    run: the join storm against the bare websockets server's, steady CPU
    against the steady floor's (a ``send()`` loop to the same listeners,
    `floor_us` per delivery); then the garbage collector's longest
    pause and the capacity. The rest compare counter-sync with
    ``inline-broadcast``, or with itself (ingest).
    """
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
    tried = settings.max_connections
    # Holding every connection of a smaller run proves nothing about CAPACITY_GOAL.
    small = f"only {fmt(tried)} tried" if tried < CAPACITY_GOAL else ""
    gc_name = f"longest GC pause while {fmt(tried)} connections join (ms)"
    shown = {gc_name: gc_shown(dig(subject, "capacity", "gc"))}
    rows: list[Target] = [
        (
            "join storm: every first message (x bare websockets' handshakes)",
            ratio(
                dig(subject, "join", "first_message_seconds"),
                dig(join_floor, "join", "handshakes_seconds"),
            ),
            "<=",
            1.15,
            "",
        ),
        (
            "steady CPU per delivery (x steady floor: send() loop to the same listeners)",
            ratio(dig(subject, "steady", "cpu_us_per_delivery"), floor_us),
            "<=",
            1.3,
            "",
        ),
        (
            gc_name,
            dig(subject, "capacity", "gc", "longest_ms"),
            "<=",
            10,
            dig(subject, "capacity", "gc", "error") or "",
        ),
        ("capacity: connections held", held, ">=", CAPACITY_GOAL, small),
        (
            f"capacity: connections that got the update within {UPDATE_WITHIN:g} s",
            dig(subject, "capacity", "update", "within"),
            ">=",
            CAPACITY_GOAL,
            small,
        ),
        (
            "capacity: server memory per connection (KiB)",
            dig(subject, "capacity", "kib_per_connection"),
            "<=",
            16,
            "",
        ),
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
            "server memory per idle connection (KiB)",
            dig(subject, "memory", "kib_per_connection"),
            "<=",
            15,
            "",
        ),
        *ingest_targets(subject),
    ]
    out = []
    for name, value, op, bound, note in rows:
        passed = meets(value, op, bound)
        if bound == CAPACITY_GOAL and small:
            passed = None
        out.append(
            {
                "target": name,
                "measured": value,
                "shown": shown.get(name) or fmt(value),
                "op": op,
                "bound": bound,
                "verdict": verdict(passed),
                "note": note,
            }
        )
    return out


def gc_shown(gc: Report | None) -> str:
    """The phase's longest collector pause: exact, or "<= bound" from the histogram."""
    if gc is None or gc["longest_ms"] is None:
        return "-"
    return fmt(gc["longest_ms"]) if gc["exact"] else f"<= {fmt(gc['longest_ms'])}"


Row = tuple[str, Callable[[Report], str]]


def rows(
    settings: BenchSettings,
    floors: tuple[float | None, float | None, float | None],
    base: Report | None,
) -> list[Row]:
    """The table's rows, one (label, cell of a server's result) each.

    ``floors``: the steady floor's and the drain floor's CPU per delivery
    (us), and the join storm floor's time until every handshake (s).
    """
    floor_us, drain_us, join_floor_s = floors
    n, k = settings.listeners, settings.burst

    def timed(path: tuple[str, ...], reached: str) -> Callable[[Report], str]:
        def cell(r: Report) -> str:
            if dig(r, *path[:1]) is None:
                return "-"
            seconds = dig(r, *path)
            if seconds is None:
                return f"timeout ({fmt(dig(r, path[0], reached))}/{n})"
            return fmt(seconds)

        return cell

    def times(path: tuple[str, ...], reference: float | None) -> Callable[[Report], str]:
        return lambda r: fmt(ratio(dig(r, *path), reference))

    def vs_base(path: tuple[str, ...], smaller_is_better: bool = True) -> Callable[[Report], str]:
        def cell(r: Report) -> str:
            mine, theirs = dig(r, *path), dig(base, *path)
            value = ratio(theirs, mine) if smaller_is_better else ratio(mine, theirs)
            return f"{fmt(value)}x" if value is not None else "-"

        return cell

    def steady_delays(r: Report) -> str:
        s = r.get("steady")
        if s is None or s["p50_ms"] is None:
            return "-"
        missing = f" ({s['missing']} missed)" if s["missing"] else ""
        return f"{s['p50_ms']:.1f}/{s['p99_ms']:.1f}/{s['max_ms']:.1f}{missing}"

    def capacity(r: Report) -> str:
        c = r.get("capacity")
        return "-" if c is None else f"{fmt(c['held'])} in {c['seconds']:.0f}s"

    def server_users(r: Report) -> str:
        c = r.get("capacity")
        if c is None:
            return "-"
        return "no answer" if c["server_users"] is None else fmt(c["server_users"])

    def update(r: Report) -> str:
        u, c = dig(r, "capacity", "update"), r.get("capacity")
        if c is None or u is None:
            return "-"
        return f"{fmt(u['within'])}/{fmt(c['held'])}"

    def update_delays(r: Report) -> str:
        u = dig(r, "capacity", "update")
        return "-" if u is None else f"{fmt(u['p99_ms'])} / {fmt(u['max_ms'])}"

    def gc_longest(r: Report) -> str:
        if r.get("capacity") is None:
            return "-"
        gc = dig(r, "capacity", "gc")
        return "n/a" if gc is None else gc_shown(gc) if "error" not in gc else "no answer"

    def full_collections(r: Report) -> str:
        if dig(r, "capacity", "gc") is None:
            return "-"
        return fmt(dig(r, "capacity", "gc", "generations", "2", "collections"))

    def collecting(r: Report) -> str:
        generations = dig(r, "capacity", "gc", "generations")
        if generations is None:
            return "-"
        return fmt(sum(g["seconds"] for g in generations.values()) * 1e3)

    def capped(r: Report) -> str:
        c = r.get("capacity")
        if c is None or dig(r, "capacity", "gc") is None:  # only counter-sync fits its caps
            return "-"
        return "yes (below)" if c["capped"] else "no"

    def per_listener(path: tuple[str, ...]) -> Callable[[Report], str]:
        return lambda r: fmt(ratio(dig(r, *path), n), 2)

    def join_counts(r: Report) -> str:
        j = r.get("join")
        return "-" if j is None else f"{j['connected']}/{j['failed']}/{j['listen_overflows']}"

    def busy(phase: str) -> Callable[[Report], str]:
        def cell(r: Report) -> str:
            p = r.get(phase)
            if p is None:
                return "-"
            flag = "*" if p["loadgen_busy"] >= SATURATED else ""
            return f"{p['server_busy']:.0%} / {p['loadgen_busy']:.0%}{flag}"

        return cell

    def figure(*path: str) -> Callable[[Report], str]:
        return lambda r: fmt(dig(r, *path))

    return [
        (f"join storm: all {n} see users={n} (s)", timed(("join", "seconds"), "reached")),
        ("  faster than inline-broadcast", vs_base(("join", "seconds"))),
        ("  every handshake done (s)", figure("join", "handshakes_seconds")),
        ("  every first message (s)", figure("join", "first_message_seconds")),
        ("  x bare websockets' handshakes", times(("join", "first_message_seconds"), join_floor_s)),
        ("  server CPU per handshake (us)", figure("join", "cpu_us_per_handshake")),
        ("  CPU busy: server / loadgen", busy("join")),
        ("  connected / failed / SYN drops", join_counts),
        ("idle memory per connection (KiB)", figure("memory", "kib_per_connection")),
        (f"burst: all see +{k} (s)", timed(("burst", "seconds"), "reached")),
        ("  faster than inline-broadcast", vs_base(("burst", "seconds"))),
        ("  CPU busy: server / loadgen", busy("burst")),
        ("  server CPU (s)", figure("burst", "server_cpu_seconds")),
        ("  less CPU than inline-broadcast", vs_base(("burst", "server_cpu_seconds"))),
        ("  CPU per delivery (us)", figure("burst", "cpu_us_per_delivery")),
        ("  x steady floor", times(("burst", "cpu_us_per_delivery"), floor_us)),
        ("  frames per listener", per_listener(("burst", "frames_received"))),
        (f"steady {settings.rate:g}/s: delay p50/p99/max (ms)", steady_delays),
        ("  server CPU per delivery (us)", figure("steady", "cpu_us_per_delivery")),
        ("  bytes per frame (payload)", figure("steady", "payload_bytes_per_frame")),
        ("  x steady floor (same listeners)", times(("steady", "cpu_us_per_delivery"), floor_us)),
        ("  x drain floor (selectors reader)", times(("steady", "cpu_us_per_delivery"), drain_us)),
        (
            "  x inline-broadcast",
            vs_base(("steady", "cpu_us_per_delivery"), smaller_is_better=False),
        ),
        *ingest_rows(settings.senders, settings.actions_per_sender),
        (f"capacity: held of {settings.max_connections:,}", capacity),
        ("  server's own users count", server_users),
        ("  memory per connection (KiB)", figure("capacity", "kib_per_connection")),
        (f"  got one update within {UPDATE_WITHIN:g} s", update),
        ("  its delay p99 / max (ms)", update_delays),
        ("  longest GC pause while joining (ms)", gc_longest),
        ("  full collections while joining", full_collections),
        ("  time in collections while joining (ms)", collecting),
        ("  caps lowered to fit open files", capped),
    ]


def join_floor_line(join_floor: Report) -> str:
    """The join storm floor's figures in one sentence, for a report."""
    j = join_floor.get("join")
    if j is None:
        return f"join storm floor: failed ({'; '.join(join_floor.get('errors', []))})"
    return (
        f"join storm floor, bare websockets ({join_floor['description']}): "
        f"{fmt(j['connected'])} of {fmt(j['listeners'])} handshakes done in "
        f"{fmt(j['handshakes_seconds'])} s, "
        f"server CPU {fmt(j['cpu_us_per_handshake'])} us per handshake, "
        f"{fmt(j['listen_overflows'])} SYN drops"
    )


def join_beside_line(name: str, result: Report, floor_seconds: float | None) -> str:
    """A join storm measured beside the floor (`name` says whose), as a multiple of the floor's."""
    j = result.get("join")
    if j is None:
        return f"join storm, {name}: failed ({'; '.join(result.get('errors', []))})"
    first = j["first_message_seconds"]
    ratio = first / floor_seconds if first and floor_seconds else None
    return (
        f"join storm, {name} ({result['description']}): every first message"
        f" of {fmt(j['connected'])} in {fmt(first)} s, x{fmt(ratio)} the floor's handshakes;"
        f" server CPU {fmt(j['cpu_us_per_handshake'])} us per handshake"
    )


def render_table(report: Report, settings: BenchSettings, skipped: dict[str, str]) -> str:
    """One run's table, its floors, what went wrong, and its targets."""
    servers: Report = report["servers"]
    steady_floor, drain_floor = report.get("steady_floor"), report.get("drain_floor")
    join_floor = report.get("join_floor")
    floors = (
        dig(steady_floor, "cpu_us_per_delivery"),
        dig(drain_floor, "cpu_us_per_message"),
        dig(join_floor, "join", "handshakes_seconds"),
    )
    names = list(servers)
    cells = [["", *names]]
    for label, cell in rows(settings, floors, servers.get(BASELINE)):
        cells.append([label, *(cell(servers[name]) for name in names)])
    lines = [table(cells, align="<" + ">" * len(names), rule_after=1)]
    if steady_floor or drain_floor or join_floor:
        lines.append("")
    if steady_floor:
        lines.append(steady_floor_line(steady_floor))
    if drain_floor:
        lines.append(floor_line(drain_floor))
    if join_floor:
        lines.append(join_floor_line(join_floor))
    for key, spec in JOIN_BESIDE.items():
        if beside := report.get(key):
            lines.append(join_beside_line(spec.name, beside, floors[2]))
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
        if capped := dig(result, "capacity", "capped"):
            lines.append(f"{name}: capacity: caps lowered to fit open files: {capped}")
    for name, reason in skipped.items():
        lines.append(f"{name}: skipped ({reason})")
    if any(
        (dig(result, phase, "loadgen_busy") or 0) >= SATURATED
        for result in servers.values()
        for phase in ("join", "burst")
    ):
        lines.append(
            f"* a load generator worker was >= {SATURATED:.0%} busy: that time is an upper bound"
        )
    load = report["loadavg"]
    if load[0] > 1.0:
        lines.append(
            f"note: load average was {load[0]:.2f} before the run: other processes shared "
            f"the CPUs, so times and CPU figures are noisier"
        )
    lines += ["", "Targets (measured in this run):"]
    lines.append(targets_table(report["targets"]))
    return "\n".join(lines)


def draw_chart(report: Report, whole: Report, path: Path) -> str:
    """A PNG of one run's headline numbers (`whole` has the settings, the date).

    matplotlib is optional: without it, the answer says so.
    """
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
    if (floor_us := dig(report.get("steady_floor"), "cpu_us_per_delivery")) is not None:
        axes.flat[3].axhline(floor_us, color="C3", linestyle="--", label="steady floor")
        axes.flat[3].legend()
    fig.suptitle(
        f"counter-sync bench, {whole['settings']['listeners']} listeners, "
        f"{whole['environment']['date']}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return f"chart written to {path}"
