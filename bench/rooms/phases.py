"""The rooms bench's four phases, each against a fresh server, and the steps they share."""

from __future__ import annotations

import contextlib
import json
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.listeners import Reply
from bench.loadgen import LoadGen, LoadGenError, Usage, shares
from bench.proc import Sampler, cpu_seconds, rss_bytes, wait_idle
from bench.reporting import Report, say, spread_ms
from bench.servers import (
    ROOMS_LIBRARY_FLOOR,
    SANSIO_SKETCH,
    SERVERS,
    RunningServer,
    ServerSpec,
    start_server,
)

__all__ = [
    "PHASES",
    "Floors",
    "Options",
    "deal",
    "phase_cost",
    "phase_fanout",
    "phase_isolation",
    "phase_memory",
]

# See the package docstring: pings would land in one phase's window and not another's.
NO_PINGS = ("--ping-interval", "0")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Options:
    """Every knob of one run; filled from the command line."""

    rooms: int
    per_room: int
    rate: float
    duration: float
    cost_users: int
    cost_actions: int
    cost_rate: float
    others: int
    other_rooms: int
    reps: int
    memory_rooms: int
    plus_every: int
    memory_concurrency: int
    big_room: int
    burst: int
    bursts: int
    small_room: int
    probe_interval: float
    baseline: float
    concurrency: int
    timeout: float
    workers: int
    host: str
    phases: tuple[str, ...]
    floor: bool
    log_dir: Path
    tag: str  # in every room name, so no two runs share a counter

    @property
    def actions_per_room(self) -> int:
        return max(1, round(self.rate * self.duration))


Result = Report
# floor.py's figure and the rooms floor's (bench.rooms.floor), each None when not measured.
Floors = tuple[Result | None, Result | None]


def deal(items: Sequence[Any], hands: int) -> list[list[Any]]:
    """Round-robin `items` into `hands` lists, so each gets a share of every stretch."""
    return [list(items[i::hands]) for i in range(hands)]


def ask_all(
    load: LoadGen, calls: dict[int, tuple[str, dict[str, Any]]], limit: float
) -> list[Reply]:
    """`load.ask` with replies in process order."""
    replies = load.ask(calls, limit)
    return [replies[i] for i in sorted(replies)]


def total(replies: list[Reply], key: str) -> int:
    return sum(r[key] for r in replies)


def summed(replies: list[Reply], *keys: str) -> Result:
    """The replies' counts under `keys` added up, and every connection error they name."""
    counts: Result = {key: total(replies, key) for key in keys}
    return {**counts, "connect_errors": [e for r in replies for e in r["errors"]]}


def server_command(spec: ServerSpec, host: str) -> str:
    """The server's command line as a person would type it (the port is picked per run)."""
    argv = ["python3", *spec.argv[1:]] if spec.argv[0] == sys.executable else list(spec.argv)
    return shlex.join([*argv, "--host", host, "--port", "0"])


@contextlib.contextmanager
def running(
    name: str,
    extra: tuple[str, ...],
    load: LoadGen,
    o: Options,
    result: Result,
    *,
    base: ServerSpec = SERVERS["counter-sync"],
) -> Iterator[RunningServer]:
    """A fresh server for one phase: the bench's `base` command (counter-sync) with `extra` flags.

    Its command line goes in ``result["server"]``. Afterwards the server is
    stopped and the load processes drop their connections.
    """
    spec = ServerSpec(f"rooms-{name}", base.description, (*base.argv, *extra))
    result["server"] = server_command(spec, o.host)
    server = start_server(spec, o.host, o.log_dir / f"{spec.name}.log", timeout=20)
    try:
        yield server
    finally:
        server.stop()
        try:
            load.reset()
        except LoadGenError:
            # A worker that cannot even drop its connections is restarted.
            load.restart()


def healthz(server: RunningServer) -> dict[str, Any]:
    """The server's own view: users connected, rooms in use."""
    url = server.url.replace("ws://", "http://") + "healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def join(
    load: LoadGen,
    url: str,
    plan: dict[int, dict[str, int]],
    drivers: dict[int, list[str]],
    o: Options,
) -> Result:
    """Open every planned connection (process -> room -> count); sum up the replies."""
    started = time.monotonic()
    calls = {
        w: (
            "join",
            {
                "base_url": url,
                "rooms": rooms,
                "drivers": drivers.get(w, []),
                "concurrency": o.concurrency,
                "limit": o.timeout,
            },
        )
        for w, rooms in plan.items()
    }
    replies = ask_all(load, calls, o.timeout)
    return {
        "planned": sum(sum(rooms.values()) for rooms in plan.values()),
        **summed(replies, "connected", "failed", "without_value", "drivers"),
        "seconds": time.monotonic() - started,
    }


def checked(replies: list[Reply]) -> Result:
    """check_rooms replies summed: exact, closed, examples of wrong values, delays."""
    return {
        "listeners": total(replies, "listeners"),
        "exact": total(replies, "exact"),
        "closed": total(replies, "closed"),
        "wrong": [w for r in replies for w in r["wrong"]][:5],
        "missing": total(replies, "missing"),
        "delays": spread_ms([d for r in replies for d in r["delays"]]),
    }


# --- phase 1: fan-out over many small rooms -----------------------------------


def phase_fanout(load: LoadGen, o: Options, floors: Floors) -> Result:
    """Rooms x connections, one action per room per 1/rate s; exact values, CPU, delays.

    `floors` are floor.py's figure and the rooms floor's (None when skipped): the
    target is the ratio to the rooms floor, measured in the same run. With
    the floors, the same work is then asked of the plainest server on the
    library's asyncio API (``ROOMS_LIBRARY_FLOOR``), and measured the same
    way: what the library itself costs, next to what counter-sync adds.
    """
    result = fan_out("fanout", SERVERS["counter-sync"], NO_PINGS, load, o, floors)
    if o.floor:
        library = fan_out("fanout-library", ROOMS_LIBRARY_FLOOR, (), load, o, floors)
        ours, theirs = result["cpu_us_per_delivery"], library["cpu_us_per_delivery"]
        result["library_floor"] = library
        result["x_library_floor"] = ours / theirs if ours and theirs else None
        result["sansio_sketch"] = fan_out("fanout-sketch", SANSIO_SKETCH, (), load, o, floors)
    return result


def fan_out(
    name: str,
    base: ServerSpec,
    extra: tuple[str, ...],
    load: LoadGen,
    o: Options,
    floors: Floors,
) -> Result:
    """The fan-out phase's work, on a fresh server run by `base` with `extra` flags."""
    names = [f"{name}-{o.tag}-{i}" for i in range(o.rooms)]
    hands = deal(names, o.workers)
    result: Result = {"rooms": o.rooms, "per_room": o.per_room}
    with running(name, extra, load, o, result, base=base) as server:
        say(f"{name}: joining {o.rooms} rooms x {o.per_room} on {base.name}")
        plan = {w: dict.fromkeys(hand, o.per_room) for w, hand in enumerate(hands)}
        result["join"] = join(load, server.url, plan, dict(enumerate(hands)), o)
        result["server_users"] = healthz(server)["users"]
        wait_idle(server.pid, timeout=o.timeout)
        actions = o.actions_per_room
        each = {w: ("expect_added", {"added": actions, "record": True}) for w in range(o.workers)}
        ask_all(load, each, 5)
        say(f"{name}: {actions} actions per room at {o.rate:g}/s")
        usage = Usage(server, load)
        start_at = time.monotonic() + 0.5
        index = {name: i for i, name in enumerate(names)}
        drive = {
            w: (
                "drive",
                {
                    "start_at": start_at,
                    "rate": o.rate,
                    "actions": actions,
                    # Room i acts i/rooms of a period after room 0: spread over the second.
                    "offsets": {name: index[name] / o.rooms / o.rate for name in hand},
                },
            )
            for w, hand in enumerate(hands)
        }
        drove = ask_all(load, drive, 1 + o.duration + o.timeout)
        waited = ask_all(load, {w: ("wait_rooms", {"limit": o.timeout}) for w in drive}, o.timeout)
        result["server_idle_after"] = wait_idle(server.pid, timeout=o.timeout)
        used = usage.stop()
        check = checked(ask_all(load, {w: ("check_rooms", {}) for w in drive}, o.timeout))
    sent = total(drove, "sent")
    deliveries = sent * o.per_room
    per_delivery = used["server_cpu_seconds"] / deliveries * 1e6 if deliveries else None
    floor_us, room_floor_us = (f["cpu_us_per_message"] if f else None for f in floors)
    result.update(
        {
            "actions": sent,
            "unsent": total(drove, "unsent"),
            "late_send_max_ms": max((r["late_max_ms"] or 0) for r in drove),
            "reached": total(waited, "reached"),
            "error_events": total(waited, "errors"),
            "check": check,
            "converged": check["exact"] == o.rooms * o.per_room and check["missing"] == 0,
            **used,
            "deliveries": deliveries,
            "cpu_us_per_delivery": per_delivery,
            "cpu_us_per_action": used["server_cpu_seconds"] / sent * 1e6 if sent else None,
            "floor_us_per_delivery": floor_us,
            "x_floor": per_delivery / floor_us if per_delivery and floor_us else None,
            "room_floor_us_per_delivery": room_floor_us,
            "x_room_floor": (
                per_delivery / room_floor_us if per_delivery and room_floor_us else None
            ),
        }
    )
    return result


# --- phase 2: the cost of an action, with and without others ------------------


def cost_measurement(load: LoadGen, server: RunningServer, room: str, o: Options) -> Result:
    """One run of `cost_actions` actions in the measured room; server CPU per action."""
    driver = load.driver_id
    ask_all(load, {driver: ("expect_added", {"added": o.cost_actions, "rooms": [room]})}, 5)
    before = cpu_seconds(server.pid)
    drive = {
        "start_at": time.monotonic() + 0.1,
        "rate": o.cost_rate,
        "actions": o.cost_actions,
        "offsets": {room: 0.0},
    }
    limit = o.cost_actions / o.cost_rate + o.timeout
    sent = ask_all(load, {driver: ("drive", drive)}, limit)[0]["sent"]
    ask_all(load, {driver: ("wait_rooms", {"limit": o.timeout, "rooms": [room]})}, o.timeout)
    idle = wait_idle(server.pid, timeout=o.timeout)
    cpu = cpu_seconds(server.pid) - before
    check = ask_all(load, {driver: ("check_rooms", {"rooms": [room]})}, o.timeout)[0]
    return {
        "actions": sent,
        "server_cpu_seconds": cpu,
        "cpu_us_per_action": cpu / sent * 1e6 if sent else None,
        "converged": check["exact"] == o.cost_users and sent == o.cost_actions,
        "server_idle_after": idle,
    }


def cost_condition(load: LoadGen, server: RunningServer, room: str, o: Options) -> Result:
    """A warm-up run, then `reps` measured ones; plus the server's idle CPU rate."""
    cost_measurement(load, server, room, o)  # warm-up: first-use costs are not per action
    runs = [cost_measurement(load, server, room, o) for _ in range(o.reps)]
    before, started = cpu_seconds(server.pid), time.monotonic()
    time.sleep(1.0)
    idle_rate = (cpu_seconds(server.pid) - before) / (time.monotonic() - started)
    per_action = [r["cpu_us_per_action"] for r in runs if r["cpu_us_per_action"] is not None]
    return {
        "runs": runs,
        "cpu_us_per_action": per_action,
        "median_us": statistics.median(per_action) if per_action else None,
        "converged": all(r["converged"] for r in runs),
        "idle_cpu_ms_per_s": idle_rate * 1e3,
    }


def phase_cost(load: LoadGen, o: Options) -> Result:
    """Server CPU per action in one room, alone and among `others` idle users."""
    room = f"cost-{o.tag}"
    result: Result = {"users": o.cost_users}
    with running("cost", NO_PINGS, load, o, result) as server:
        say(f"cost: one room of {o.cost_users}, {o.cost_actions} actions x {o.reps}, alone")
        plan = {load.driver_id: {room: o.cost_users}}
        result["join"] = join(load, server.url, plan, {load.driver_id: [room]}, o)
        wait_idle(server.pid, timeout=o.timeout)
        result["alone"] = cost_condition(load, server, room, o)
        say(f"cost: {o.others} idle users in {o.other_rooms} other rooms")
        sizes = {
            f"idle-{o.tag}-{i}": size for i, size in enumerate(shares(o.others, o.other_rooms))
        }
        fill = {
            w: (
                "fill_rooms",
                {
                    "base_url": server.url,
                    "rooms": {name: sizes[name] for name in hand},
                    "concurrency": o.concurrency,
                    "limit": o.timeout,
                },
            )
            for w, hand in enumerate(deal(list(sizes), o.workers))
        }
        result["fill"] = summed(ask_all(load, fill, o.timeout), "connected", "failed")
        wait_idle(server.pid, timeout=o.timeout)
        result["server_users"] = healthz(server)["users"]
        say("cost: the same room again, among them")
        result["crowded"] = cost_condition(load, server, room, o)
    alone, crowded = result["alone"]["median_us"], result["crowded"]["median_us"]
    result["ratio"] = crowded / alone if alone and crowded else None
    result["converged"] = (
        result["alone"]["converged"]
        and result["crowded"]["converged"]
        and result["server_users"] == o.cost_users + o.others
    )
    return result


# --- phase 3: memory after many rooms come and go ------------------------------


def counted_rows(path: Path, prefix: str) -> dict[str, int]:
    """Rows the SQLite file holds for the phase's rooms: all of them, and those at 1."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows, ones = db.execute(
            "SELECT count(*), coalesce(sum(value = 1), 0) FROM counter WHERE name LIKE ?",
            (f"{prefix}%",),
        ).fetchone()
    return {"rows": int(rows), "at_one": int(ones)}


def cycle(load: LoadGen, url: str, rooms: list[tuple[str, bool]], o: Options) -> Result:
    """Visit `rooms` (name, plus?) from every listener process; the replies summed."""
    calls = {
        w: (
            "cycle_rooms",
            {
                "base_url": url,
                "rooms": hand,
                "concurrency": o.memory_concurrency,
                "limit": o.timeout,
            },
        )
        for w, hand in enumerate(deal(rooms, o.workers))
    }
    return summed(ask_all(load, calls, o.timeout), "visited", "failed", "pluses")


def phase_memory(load: LoadGen, o: Options) -> Result:
    """Join and leave `memory_rooms` names once each with --state; RSS before, peak, after.

    The rooms go in two halves, with the RSS read between them: growth that
    goes on in the second half is per room (a leak), growth that does not is
    the first connections' one-time cost or the allocator keeping a peak.
    """
    prefix = f"mem-{o.tag}-"
    rooms = [(f"{prefix}{i}", i % o.plus_every == 0) for i in range(o.memory_rooms)]
    halves = (rooms[: len(rooms) // 2], rooms[len(rooms) // 2 :])
    with tempfile.TemporaryDirectory(prefix="rooms-bench-") as directory:
        state = Path(directory) / "rooms.sqlite"
        result: Result = {"halves": []}
        with running("memory", ("--state", str(state)), load, o, result) as server:
            result["server"] = result["server"].replace(str(state), "TMP/rooms.sqlite")
            wait_idle(server.pid, timeout=o.timeout)
            rss = [rss_bytes(server.pid)]
            say(f"memory: {o.memory_rooms} rooms joined and left, --state")
            with Sampler(server.pid, period=0.02) as peak:
                for half in halves:
                    visits = cycle(load, server.url, half, o)
                    result["halves"].append(visits)
                    result["server_idle_after"] = wait_idle(server.pid, timeout=o.timeout)
                    rss.append(rss_bytes(server.pid))
            health = healthz(server)
        stored = counted_rows(state, prefix)
    pluses = sum(plus for _, plus in rooms)
    visited = sum(h["visited"] for h in result["halves"])
    result.update(
        {
            "rooms": o.memory_rooms,
            "concurrency": o.memory_concurrency * o.workers,
            "visited": visited,
            "failed": sum(h["failed"] for h in result["halves"]),
            "pluses": sum(h["pluses"] for h in result["halves"]),
            "connect_errors": [e for h in result["halves"] for e in h["connect_errors"]],
            "users_after": health["users"],
            "rooms_in_use_after": health.get("rooms"),
            "stored": stored,
            "rss_start_mib": rss[0] / MIB,
            "rss_half_mib": rss[1] / MIB,
            "rss_peak_mib": peak.peak_rss() / MIB,
            "rss_end_mib": rss[2] / MIB,
            "growth_mib": (rss[2] - rss[0]) / MIB,
            "converged": visited == o.memory_rooms
            and stored == {"rows": pluses, "at_one": pluses}
            and health["users"] == 0,
        }
    )
    return result


# --- phase 4: a burst in a big room, a small room's round trips ----------------


def isolation_plan(load: LoadGen, big: str, small: str, o: Options) -> dict[int, dict[str, int]]:
    """Big room over the listener processes (+1 for its driver in the first), the
    prober alone in the driver process, the small room's other users with the listeners."""
    plan: dict[int, dict[str, int]] = {}
    small_shares = shares(o.small_room - 1, o.workers)
    for w, (n, m) in enumerate(zip(load.split(o.big_room), small_shares, strict=True)):
        plan[w] = {big: n + (w == 0), **({small: m} if m else {})}
    plan[load.driver_id] = {small: 1}
    return plan


def burst_once(load: LoadGen, big: str, o: Options) -> tuple[float, float | None]:
    """One pipelined burst in the big room; (its start, when the last listener had it)."""
    listeners = range(o.workers)
    ask_all(load, {w: ("expect_added", {"added": o.burst, "rooms": [big]}) for w in listeners}, 5)
    started = ask_all(load, {0: ("burst_room", {"room": big, "count": o.burst})}, o.timeout)[0]
    waited = ask_all(
        load,
        {w: ("wait_rooms", {"limit": o.timeout, "rooms": [big]}) for w in listeners},
        o.timeout,
    )
    done = total(waited, "reached") == total(waited, "open") and total(waited, "open") > 0
    last = max((r["last"] for r in waited if r["last"] is not None), default=None)
    return started["started"], last if done else None


def phase_isolation(load: LoadGen, o: Options) -> Result:
    """Probe a small room's round trip, first quiet, then during back-to-back bursts."""
    big, small = f"big-{o.tag}", f"small-{o.tag}"
    prober = load.driver_id
    result: Result = {"big_room": o.big_room, "burst": o.burst}
    with running("isolation", NO_PINGS, load, o, result) as server:
        say(f"isolation: {o.big_room} listeners in one room, {o.small_room} in another")
        drivers = {0: [big], prober: [small]}
        result["join"] = join(load, server.url, isolation_plan(load, big, small, o), drivers, o)
        wait_idle(server.pid, timeout=o.timeout)
        ask_all(load, {prober: ("probe_start", {"room": small, "interval": o.probe_interval})}, 5)
        quiet = (time.monotonic(), time.monotonic() + o.baseline)
        time.sleep(o.baseline)
        say(f"isolation: {o.bursts} bursts of {o.burst} while the small room probes")
        windows: list[tuple[float, float]] = []
        for _ in range(o.bursts):
            started, last = burst_once(load, big, o)
            if last is None:
                break
            windows.append((started, last))
        stopped = ask_all(
            load, {prober: ("probe_stop", {"room": small, "limit": o.timeout})}, o.timeout
        )[0]
        everyone = list(range(o.workers))
        ask_all(
            load, {w: ("expect_final", {"values": {small: stopped["value"]}}) for w in everyone}, 5
        )
        ask_all(
            load,
            {w: ("wait_rooms", {"limit": o.timeout, "rooms": [small]}) for w in everyone},
            o.timeout,
        )
        check = checked(
            ask_all(load, {w: ("check_rooms", {}) for w in [*everyone, prober]}, o.timeout)
        )
    probes: list[tuple[float, float | None]] = [(at, d) for at, d in stopped["probes"]]

    def during(windows: list[tuple[float, float]]) -> Result:
        inside = [d for at, d in probes if any(a <= at <= b for a, b in windows)]
        summary = spread_ms([d for d in inside if d is not None])
        return {**summary, "unanswered": sum(d is None for d in inside)}

    result.update(
        {
            "bursts_done": len(windows),
            "burst_seconds": [b - a for a, b in windows],
            "probes": len(probes),
            "quiet": during([quiet]),
            "bursting": during(windows),
            "check": check,
            "converged": len(windows) == o.bursts
            and check["exact"] == check["listeners"] == o.big_room + 1 + o.small_room
            and all(d is not None for _, d in probes),
        }
    )
    return result


# Each phase by its name on the command line, in the order they run.
PHASES: dict[str, Callable[[LoadGen, Options, Floors], Result]] = {
    "fanout": phase_fanout,
    "cost": lambda load, o, _: phase_cost(load, o),
    "memory": lambda load, o, _: phase_memory(load, o),
    "isolation": lambda load, o, _: phase_isolation(load, o),
}
