"""The measurements, one function per phase, run against one server at a time.

`measure_server()` runs two sessions, each on a fresh server process:

1. traffic: join storm -> idle memory -> driver joins -> burst -> steady;
2. capacity: hold as many idle connections as the server takes.

The capacity test gets its own process so that its memory reading starts
from a clean baseline and the first session's connections do not count.

Every phase also records how busy the server and the load generator were
(CPU seconds / wall seconds). On one machine the listeners pay for every
frame a server sends, so a server that sends many frames can make the
generator the bottleneck; `loadgen_busy` near 1.0 says so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import LoadGen, LoadGenError
from bench.proc import CpuWatch, listen_overflows, rss_bytes, wait_idle
from bench.reporting import Report, say, spread_ms
from bench.servers import RunningServer, ServerSpec, start_server

__all__ = ["BenchSettings", "Usage", "measure_server"]

Result = Report


@dataclass(frozen=True)
class BenchSettings:
    """Every knob of one ``python -m bench`` run; filled from the command line."""

    host: str
    listeners: int
    burst: int
    rate: float
    duration: float
    max_connections: int
    capacity_timeout: float
    timeout: float
    workers: int
    log_dir: Path

    @property
    def steady_actions(self) -> int:
        return max(1, round(self.rate * self.duration))


class Usage:
    """CPU used by the server and by each load generator worker over a phase."""

    def __init__(self, server: RunningServer, load: LoadGen) -> None:
        self.load = load
        self.server = CpuWatch(server.pid)
        self.loadgen_cpu = load.cpu()

    def server_seconds(self) -> float:
        return self.server.seconds()

    def stop(self) -> Result:
        wall = time.monotonic() - self.server.started
        server = self.server_seconds()
        loadgen = [b - a for a, b in zip(self.loadgen_cpu, self.load.cpu(), strict=True)]
        return {
            "wall_seconds": wall,
            "server_cpu_seconds": server,
            "server_busy": server / wall,
            "loadgen_busy": max(loadgen) / wall,
        }


def measure_server(spec: ServerSpec, load: LoadGen, settings: BenchSettings) -> Result:
    """Every phase against `spec`; a failing phase is recorded, not raised."""
    result: Result = {"description": spec.description}
    for session in (session_traffic, session_capacity):
        server: RunningServer | None = None
        try:
            server = start_server(
                spec,
                settings.host,
                settings.log_dir / f"{spec.name}-{session.__name__}.log",
                timeout=20,
            )
            session(server, load, settings, result)
        except (LoadGenError, RuntimeError, OSError) as exc:
            result.setdefault("errors", []).append(f"{session.__name__}: {exc}")
        finally:
            if server is not None:
                server.stop()
            try:
                load.reset()
            except LoadGenError as exc:
                result.setdefault("errors", []).append(f"reset: {exc}")
    return result


def session_traffic(server: RunningServer, load: LoadGen, s: BenchSettings, result: Result) -> None:
    baseline_rss = rss_bytes(server.pid)
    say(f"join storm: {s.listeners} listeners")
    result["join"] = join = phase_join(server, load, s)
    if join["connected"] == 0:
        return
    wait_idle(server.pid, timeout=s.timeout)
    rss = rss_bytes(server.pid)
    result["memory"] = {
        "baseline_rss_bytes": baseline_rss,
        "rss_bytes": rss,
        "connections": join["connected"],
        "kib_per_connection": (rss - baseline_rss) / 1024 / join["connected"],
    }

    # The driver is one more user; wait for everyone to see it, so the burst
    # starts from a quiet server.
    value = load.connect_driver(server.url, listeners=s.listeners, timeout=s.timeout)
    wait_idle(server.pid, timeout=s.timeout)
    say(f"burst: {s.burst} pipelined actions")
    result["burst"] = phase_burst(server, load, s, start_value=value)
    wait_idle(server.pid, timeout=s.timeout)
    say(f"steady: {s.steady_actions} actions at {s.rate:g}/s")
    result["steady"] = phase_steady(server, load, s, start_value=value + s.burst)


def phase_join(server: RunningServer, load: LoadGen, s: BenchSettings) -> Result:
    """All listeners connect at once; time until each has seen users == N."""
    overflows = listen_overflows()
    usage = Usage(server, load)
    join = load.join_storm(server.url, s.listeners, s.timeout)
    return {
        "listeners": s.listeners,
        "connected": join.connected,
        "failed": join.failed,
        "reached": join.reached,
        "seconds": join.seconds,
        "listen_overflows": listen_overflows() - overflows,
        "connect_errors": join.errors,
        **usage.stop(),
    }


def phase_burst(
    server: RunningServer, load: LoadGen, s: BenchSettings, *, start_value: int
) -> Result:
    """K pipelined actions; time until every listener shows the final value."""
    final = start_value + s.burst
    load.expect(value=final)
    usage = Usage(server, load)
    started = load.drive("burst", s.timeout, count=s.burst)["started"]
    progress = load.wait("value", s.timeout)
    converged = progress.last is not None and progress.reached == s.listeners
    usage_until_converged = usage.stop()
    # Whatever the server still does after the last listener converged (the
    # driver's copies, freeing buffers) is part of the burst's cost.
    idle = wait_idle(server.pid, timeout=s.timeout)
    cpu_used = usage.server_seconds()
    # Deliveries as a client sees them: every action reaches every connection
    # (listeners and the driver), whether or not the server coalesced it.
    deliveries = s.burst * (s.listeners + 1)
    return {
        "actions": s.burst,
        "final_value": final,
        "converged": converged,
        "reached": progress.reached,
        "open": progress.open,
        "seconds": progress.last - started if converged and progress.last is not None else None,
        "frames_received": progress.frames,
        "error_events": progress.errors,
        "driver": load.drive("driver_status", 5),
        **usage_until_converged,
        "server_cpu_seconds": cpu_used,
        "server_idle_after": idle,
        "deliveries": deliveries,
        "cpu_us_per_delivery": cpu_used / deliveries * 1e6,
    }


def phase_steady(
    server: RunningServer, load: LoadGen, s: BenchSettings, *, start_value: int
) -> Result:
    """Actions at a fixed rate; per listener and action, the delay to see it."""
    count = s.steady_actions
    usage = Usage(server, load)
    sends, progress = load.steady(start_value, rate=s.rate, count=count, timeout=s.timeout)
    wait_idle(server.pid, timeout=s.timeout)
    used = usage.stop()
    delays, missing = load.delays(sends, s.timeout)
    deliveries = count * (s.listeners + 1)
    return {
        "actions": count,
        "rate": s.rate,
        "converged": progress.reached == s.listeners and missing == 0,
        "missing": missing,
        **spread_ms(delays),
        "mean_ms": statistics.fmean(delays) * 1e3 if delays else None,
        "frames_received": progress.frames,
        "error_events": progress.errors,
        "driver": load.drive("driver_status", 5),
        **used,
        "deliveries": deliveries,
        "cpu_us_per_delivery": used["server_cpu_seconds"] / deliveries * 1e6,
    }


def session_capacity(
    server: RunningServer, load: LoadGen, s: BenchSettings, result: Result
) -> None:
    """Open up to `max_connections` idle connections and count what is held."""
    baseline_rss = rss_bytes(server.pid)
    overflows = listen_overflows()
    say(f"capacity: up to {s.max_connections} idle connections")
    usage = Usage(server, load)
    fill = load.fill(server.url, s.max_connections, concurrency=200, timeout=s.capacity_timeout)
    used = usage.stop()
    idle = wait_idle(server.pid, timeout=min(s.timeout, 10))
    held = load.count_open()
    rss = rss_bytes(server.pid)
    try:
        users = load.drive("probe", s.timeout, url=server.url, limit=min(s.timeout, 10))["users"]
    except LoadGenError:
        users = None
    result["capacity"] = {
        "tried": s.max_connections,
        "handshakes": fill["connected"],
        "failed": fill["failed"],
        "held": held,
        # The probe is one more user, so the server's count includes it.
        "server_users": users - 1 if users is not None else None,
        "time_limit": s.capacity_timeout,
        "seconds": used["wall_seconds"],
        **used,
        "server_idle_after": idle,
        "listen_overflows": listen_overflows() - overflows,
        "kib_per_connection": (rss - baseline_rss) / 1024 / held if held else None,
        "connect_errors": fill["errors"],
    }
