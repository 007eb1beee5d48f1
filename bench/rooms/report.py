"""The rooms bench's report: each phase's lines, and the targets with their verdicts."""

from __future__ import annotations

from collections.abc import Callable

from bench.floor import floor_line
from bench.reporting import Report, fmt, meets, targets_table, verdict
from bench.rooms.floor import in_kernel, rooms_floor_line
from bench.rooms.phases import Options

__all__ = ["TARGETS", "render", "targets"]

Result = Report

# Targets: (key, label, op, bound). The measured values are filled in by targets().
TARGETS = (
    ("fanout_exact", "fan-out: connections on their room's exact value", "==", "all"),
    ("fanout_floor", "fan-out: server CPU per delivery (x rooms floor)", "<=", 1.5),
    # The same goal asked of the plainest server on the library's asyncio API:
    # whether it is within reach of any server built on it.
    ("fanout_library", "fan-out: bare websockets rooms server (x rooms floor)", "<=", 1.5),
    ("cost_ratio", "cost per action: with the others / alone (median)", "<=", 1.2),
    ("memory_growth", "memory: RSS after the rooms - before (MiB)", "<=", 4.0),
    ("isolation_p99", "isolation: small room p99 during the bursts (ms)", "<", 100.0),
)


def targets(phases: dict[str, Result], o: Options) -> list[Result]:
    """Each target's measured value and verdict; n/a for a phase not run or failed."""
    fan, cost = phases.get("fanout", {}), phases.get("cost", {})
    memory, isolation = phases.get("memory", {}), phases.get("isolation", {})
    fan_check = fan.get("check")
    measured: Result = {
        "fanout_exact": fan.get("converged") if fan_check else None,
        "fanout_floor": fan.get("x_room_floor"),
        "fanout_library": (fan.get("library_floor") or {}).get("x_room_floor"),
        "cost_ratio": cost.get("ratio"),
        "memory_growth": memory.get("growth_mib"),
        "isolation_p99": (isolation.get("bursting") or {}).get("p99_ms"),
    }
    shown: dict[str, str] = {
        "fanout_exact": f"{fmt(fan_check['exact'])}/{fmt(o.rooms * o.per_room)}"
        if fan_check
        else "-",
    }
    out = []
    for key, label, op, bound in TARGETS:
        value = measured[key]
        # "all": the value is whether every connection ended exact.
        passed = (
            (None if value is None else bool(value)) if bound == "all" else meets(value, op, bound)
        )
        out.append(
            {
                "target": label,
                "measured": value,
                "shown": shown.get(key, fmt(value)),
                "op": op,
                "bound": bound,
                "verdict": verdict(passed),
            }
        )
    return out


def lines_fanout(r: Result) -> list[str]:
    check, delays, joined = r["check"], r["check"]["delays"], r["join"]
    wrong = f"  ({'; '.join(check['wrong'])})" if check["wrong"] else ""
    missing = f", {fmt(check['missing'])} never seen" if check["missing"] else ""
    lines = [
        f"   joined {fmt(joined['connected'])} of {fmt(joined['planned'])}"
        f" in {joined['seconds']:.1f} s (server counts {fmt(r['server_users'])} users);"
        f" {fmt(r['actions'])} actions sent, latest {fmt(r['late_send_max_ms'])} ms late",
        f"   on the room's exact value: {fmt(check['exact'])} of {fmt(check['listeners'])}{wrong}",
        f"   delivery delay p50/p99/max (ms): {fmt(delays['p50_ms'])} / {fmt(delays['p99_ms'])}"
        f" / {fmt(delays['max_ms'])} over {fmt(delays['count'])} deliveries{missing}",
        f"   server CPU: {fmt(r['server_cpu_seconds'])} s for {fmt(r['deliveries'])} deliveries"
        f" = {fmt(r['cpu_us_per_delivery'])} us each ({fmt(r['cpu_us_per_action'])} us per"
        f" action); rooms floor {fmt(r['room_floor_us_per_delivery'])} us"
        f" -> x{fmt(r['x_room_floor'])}",
        *kernel_line("server CPU", r),
        f"   (floor.py's socket.send rounds: {fmt(r['floor_us_per_delivery'])} us"
        f" -> x{fmt(r['x_floor'])})",
        f"   CPU busy: server {r['server_busy']:.0%}, busiest load process {r['loadgen_busy']:.0%}",
        *line_beside("bare websockets rooms server", r.get("library_floor")),
        *line_beside("sans-I/O sketch", r.get("sansio_sketch")),
    ]
    if r.get("x_library_floor") is not None:
        ratio = fmt(r["x_library_floor"])
        lines.append(f"   counter-sync: x{ratio} the bare websockets rooms server")
    return lines


def kernel_line(name: str, r: Result) -> list[str]:
    """`name`'s share of CPU in the kernel as a line of its own, if it was measured."""
    clause = in_kernel(r.get("server_kernel_share"), r["cpu_us_per_action"])
    return [f"   {name}: {clause.removeprefix('; ')}"] if clause else []


def line_beside(name: str, other: Result | None) -> list[str]:
    """The same work on another server (`name`), measured beside counter-sync, if it was."""
    if not other:
        return []
    check = other["check"]
    return [
        f"   {name} ({other['server']}): {fmt(other['cpu_us_per_delivery'])} us per"
        f" delivery -> x{fmt(other['x_room_floor'])} the rooms floor;"
        f" exact {fmt(check['exact'])} of {fmt(check['listeners'])}"
        f"{in_kernel(other.get('server_kernel_share'), other['cpu_us_per_action'])}",
    ]


def lines_cost(r: Result) -> list[str]:
    def row(name: str, c: Result) -> str:
        values = ", ".join(fmt(v) for v in c["cpu_us_per_action"])
        return (
            f"   {name}: CPU per action (us) {values}; median {fmt(c['median_us'])}"
            f" (idle server: {fmt(c['idle_cpu_ms_per_s'])} ms CPU/s)"
        )

    return [
        row("alone         ", r["alone"]),
        row("among others  ", r["crowded"]),
        f"   others connected: {fmt(r['fill']['connected'])} (server counts"
        f" {fmt(r['server_users'])} users in all); ratio of medians {fmt(r['ratio'])}",
    ]


def lines_memory(r: Result) -> list[str]:
    stored = r["stored"]
    return [
        f"   visited {fmt(r['visited'])} of {fmt(r['rooms'])} rooms, {fmt(r['pluses'])} with a"
        f" plus; the file holds {fmt(stored['rows'])} rows for them, {fmt(stored['at_one'])} at 1;"
        f" users after: {fmt(r['users_after'])}",
        f"   server RSS (MiB): start {r['rss_start_mib']:.1f}, after half the rooms"
        f" {r['rss_half_mib']:.1f}, peak {r['rss_peak_mib']:.1f}, end {r['rss_end_mib']:.1f}"
        f" (end - start {r['growth_mib']:+.2f}); {r['concurrency']} rooms at a time",
    ]


def lines_isolation(r: Result) -> list[str]:
    def row(name: str, s: Result) -> str:
        unanswered = f", {s['unanswered']} unanswered" if s["unanswered"] else ""
        return (
            f"   {name}: small room sees its own action p50/p99/max (ms) {fmt(s['p50_ms'])} /"
            f" {fmt(s['p99_ms'])} / {fmt(s['max_ms'])} over {fmt(s['count'])} probes{unanswered}"
        )

    seconds = r["burst_seconds"]
    return [
        row("quiet   ", r["quiet"]),
        row("bursting", r["bursting"]),
        f"   bursts done: {r['bursts_done']}, each {fmt(min(seconds, default=None))}-"
        f"{fmt(max(seconds, default=None))} s until all {fmt(r['big_room'])} listeners had it;"
        f" exact values: {fmt(r['check']['exact'])} of {fmt(r['check']['listeners'])}",
    ]


TITLES: dict[str, Callable[[Options], str]] = {
    "fanout": lambda o: (
        f"1. fan-out: {fmt(o.rooms)} rooms x {o.per_room} connections, "
        f"{o.rate:g} action/s per room for {o.duration:g} s"
    ),
    "cost": lambda o: (
        f"2. cost follows the room: {o.cost_users}-user room, {o.cost_actions} actions at "
        f"{o.cost_rate:g}/s, alone vs {fmt(o.others)} others in {fmt(o.other_rooms)} rooms"
    ),
    "memory": lambda o: f"3. memory: {fmt(o.memory_rooms)} rooms joined and left once, --state",
    "isolation": lambda o: (
        f"4. isolation: {o.bursts} bursts of {fmt(o.burst)} in a "
        f"{fmt(o.big_room)}-listener room, a {o.small_room}-user room acting every "
        f"{o.probe_interval * 1e3:g} ms"
    ),
}
LINES: dict[str, Callable[[Result], list[str]]] = {
    "fanout": lines_fanout,
    "cost": lines_cost,
    "memory": lines_memory,
    "isolation": lines_isolation,
}


def connect_errors(result: Result) -> list[str]:
    """The commonest connection failures of a phase, wherever they happened in it."""
    steps = [result, *(result.get(step) or {} for step in ("join", "fill"))]
    return [e for step in steps for e in step.get("connect_errors", [])]


def render(run: Result, report: Result, o: Options) -> str:
    """One run's report: its floors, each phase's lines, its targets (`report`: the command)."""
    env = report["environment"]
    lines = [
        f"command: {report['command']}",
        f"commit {env['commit']}, Python {env['python']}, websockets {env['websockets']}, "
        f"uvloop {env['uvloop']}, {env['cpus']} CPUs, load average before "
        f"{run['loadavg'][0]:.2f}, after {run['loadavg_after'][0]:.2f}",
    ]
    if run["floor"]:
        lines.append(floor_line(run["floor"]))
    if run["room_floor"]:
        lines.append(rooms_floor_line(run["room_floor"]))
    for name in o.phases:
        result = run["phases"].get(name, {})
        lines.append("")
        lines.append(TITLES[name](o))
        if "server" in result:
            lines.append(f"   server: {result['server']}")
        for error in [*result.get("errors", []), *connect_errors(result)]:
            lines.append(f"   error: {error}")
        if "converged" in result:
            lines.extend(LINES[name](result))
            if not result["converged"]:
                lines.append("   NOT CONVERGED: see the JSON")
    lines += ["", "Targets (measured in this run):", targets_table(run["targets"])]
    return "\n".join(lines)
