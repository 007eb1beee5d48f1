"""The measurements, one function per phase, run against one server at a time.

`measure_server()` runs two sessions, each on a fresh server process:

1. traffic: join storm -> idle memory -> driver joins -> burst -> steady
   -> ingest (counter-sync only: the peers know no sessions);
2. capacity (:mod:`bench.capacity`): hold as many idle connections as the
   server takes, then one action to all of them.

The capacity test gets its own process so that its memory reading starts
from a clean baseline and the first session's connections do not count.
`measure_join_floor()` runs the join storm alone against the bare
websockets server (:mod:`bench.peers.handshake_only`), the join storm's floor.

Every phase also records how busy the server and the load generator were
(CPU seconds / wall seconds). On one machine the listeners pay for every
frame a server sends, so a server that sends many frames can make the
generator the bottleneck; `loadgen_busy` near 1.0 says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.capacity import session_capacity
from bench.ingest import SESSION_SERVERS, summarize_ingest
from bench.loadgen import LoadGen, LoadGenError, Usage
from bench.proc import listen_overflows, rss_bytes, wait_idle
from bench.reporting import Report, say, spread_ms
from bench.senders import MODES
from bench.servers import JOIN_FLOOR, RunningServer, ServerSpec, start_server

__all__ = ["BenchSettings", "measure_join_floor", "measure_server"]

Result = Report

# Seconds between telling the load processes to send and their first write:
# every process has the command by then, so all senders start together.
START_DELAY = 0.1


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
    capacity_concurrency: int
    timeout: float
    workers: int
    senders: int
    actions_per_sender: int
    ingest_reps: int
    log_dir: Path

    @classmethod
    def for_tool(
        cls, *, host: str, listeners: int, workers: int, timeout: float, log_dir: Path,
        rate: float = 1.0, duration: float = 1.0,
    ) -> BenchSettings:  # fmt: skip
        """Settings for a tool that runs only join storms (and a steady phase): the rest unused."""
        return cls(
            host=host,
            listeners=listeners,
            burst=1,
            rate=rate,
            duration=duration,
            max_connections=listeners,
            capacity_timeout=timeout,
            capacity_concurrency=200,
            timeout=timeout,
            workers=workers,
            senders=1,
            actions_per_sender=1,
            ingest_reps=1,
            log_dir=log_dir,
        )

    @property
    def steady_actions(self) -> int:
        return max(1, round(self.rate * self.duration))


Session = Callable[[RunningServer, LoadGen, BenchSettings, Result], None]


def measure_server(spec: ServerSpec, load: LoadGen, settings: BenchSettings) -> Result:
    """Every phase against `spec`; a failing phase is recorded, not raised."""
    result: Result = {"description": spec.description}
    sessions: tuple[tuple[ServerSpec, Session], ...] = (
        (spec, session_traffic),
        (spec.for_capacity(), session_capacity),
    )
    for session_spec, session in sessions:
        in_session(session_spec, session, load, settings, result)
    return result


def in_session(
    spec: ServerSpec, session: Session, load: LoadGen, settings: BenchSettings, result: Result
) -> None:
    """`session` against a fresh server; afterwards every connection is dropped.

    A failure is added to ``result["errors"]``, not raised.
    """
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


def measure_join_floor(load: LoadGen, settings: BenchSettings) -> Result:
    """The join storm against the bare websockets server: the floor of counter-sync's."""
    result: Result = {"description": JOIN_FLOOR.description}

    def session_join(server: RunningServer, load: LoadGen, s: BenchSettings, out: Result) -> None:
        say(f"join storm floor: {s.listeners} handshakes, bare websockets")
        out["join"] = phase_join(server, load, s, protocol=False)

    in_session(JOIN_FLOOR, session_join, load, settings, result)
    return result


def measure_join_beside(spec: ServerSpec, load: LoadGen, settings: BenchSettings) -> Result:
    """The join storm against `spec`, to every first message as counter-sync's: beside the floor."""
    result: Result = {"description": spec.description}

    def session_join(server: RunningServer, load: LoadGen, s: BenchSettings, out: Result) -> None:
        say(f"join storm: {s.listeners} listeners, {spec.name}")
        out["join"] = phase_join(server, load, s)

    in_session(spec, session_join, load, settings, result)
    return result


def session_traffic(server: RunningServer, load: LoadGen, s: BenchSettings, result: Result) -> None:
    baseline_rss = rss_bytes(server.pid)
    say(f"join storm: {s.listeners} listeners")
    result["join"] = join = phase_join(server, load, s)
    if join["connected"] == 0:
        return
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
    if server.spec.name in SESSION_SERVERS:
        wait_idle(server.pid, timeout=s.timeout)
        say(
            f"ingest: {s.senders} senders x {s.actions_per_sender} actions, "
            f"plain and with sessions, {s.ingest_reps} times"
        )
        result["ingest"] = phase_ingest(server, load, s)


def phase_join(
    server: RunningServer, load: LoadGen, s: BenchSettings, *, protocol: bool = True
) -> Result:
    """All listeners connect at once; time until every handshake completed, and more.

    With `protocol`, also until each listener got its first message and
    until each saw users == N. The server's CPU runs from just before the
    first connect until it is idle again, per connection that got in.
    """
    overflows = listen_overflows()
    usage = Usage(server, load)
    join = load.join_storm(server.url, s.listeners, s.timeout, protocol=protocol)
    used = usage.stop()
    idle = wait_idle(server.pid, timeout=s.timeout)
    cpu = usage.server_seconds()
    return {
        "listeners": s.listeners,
        "connected": join.connected,
        "failed": join.failed,
        "reached": join.reached,
        "seconds": join.seconds,
        "handshakes_seconds": join.handshakes_seconds,
        "first_message_seconds": join.first_message_seconds,
        "first_messages": join.first_messages,
        "listen_overflows": listen_overflows() - overflows,
        "connect_errors": join.errors,
        **used,
        "server_idle_after": idle,
        "cpu_until_idle_seconds": cpu,
        "cpu_us_per_handshake": cpu / join.connected * 1e6 if join.connected else None,
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
        # Checked against the steady floor's: a floor of other sizes is not the same work.
        "payload_bytes_per_frame": progress.payload_bytes_per_frame,
        "error_events": progress.errors,
        "driver": load.drive("driver_status", 5),
        **used,
        "deliveries": deliveries,
        "cpu_us_per_delivery": used["server_cpu_seconds"] / deliveries * 1e6,
    }


def phase_ingest(server: RunningServer, load: LoadGen, s: BenchSettings) -> Result:
    """Senders write actions as fast as they can: plain, then with sessions, `ingest_reps` times.

    The senders of both modes stay connected throughout, so every run fans
    out to the same connections; the modes alternate, so a machine that gets
    busier midway weighs on both alike.
    """
    values = []
    for mode in MODES:
        calls = {
            i: (
                "senders_connect",
                {"url": server.url, "mode": mode, "count": n, "limit": s.timeout},
            )
            for i, n in zip(load.listener_ids, load.split(s.senders), strict=True)
        }
        replies = load.ask(calls, s.timeout).values()
        if sum(r["ready"] for r in replies) < s.senders:
            errors = [e for r in replies for e in r["errors"]]
            raise RuntimeError(f"ingest: {mode} senders did not all connect: {errors}")
        values += [r["value"] for r in replies if r["value"] is not None]
    # Everyone has seen every sender join: the runs start from a quiet server.
    load.expect(users=s.listeners + 1 + len(MODES) * s.senders)
    load.wait("users", s.timeout)
    value = max(values)
    runs: dict[str, list[Result]] = {mode: [] for mode in MODES}
    for _ in range(s.ingest_reps):
        for mode in MODES:
            wait_idle(server.pid, timeout=s.timeout)
            run = ingest_once(server, load, s, mode, start_value=value)
            runs[mode].append(run)
            if not run["converged"]:  # the next run's target would be wrong
                return summarize_ingest(s.senders, s.actions_per_sender, runs)
            value = run["final_value"]
    return summarize_ingest(s.senders, s.actions_per_sender, runs)


def ingest_once(
    server: RunningServer, load: LoadGen, s: BenchSettings, mode: str, *, start_value: int
) -> Result:
    """Every sender of `mode` writes its actions; time and server CPU until all are counted.

    Counted means every listener shows the final value and, with sessions,
    every sender has the ack of its last op.
    """
    actions = s.senders * s.actions_per_sender
    final = start_value + actions
    load.expect(value=final)
    usage = Usage(server, load)
    start_at = time.monotonic() + START_DELAY
    calls = {
        i: ("senders_send", {"mode": mode, "count": s.actions_per_sender, "start_at": start_at})
        for i in load.listener_ids
    }
    sent = list(load.ask(calls, s.timeout).values())
    started = min(r["started"] for r in sent)
    writing = max(r["writing"] for r in sent)
    progress = load.wait("value", s.timeout)
    acks = load.each("senders_wait", s.timeout, mode=mode, limit=s.timeout)
    used = usage.stop()
    # What the server does after the last ack (freeing buffers) is part of the cost.
    idle = wait_idle(server.pid, timeout=s.timeout)
    cpu = usage.server_seconds()
    acked, numbered = sum(r["acked"] for r in acks), sum(r["numbered"] for r in acks)
    converged = (
        sum(r["sent"] for r in sent) == actions
        and progress.reached == s.listeners
        and acked == numbered
    )
    ends = [t for t in (progress.last, *(r["last"] for r in acks)) if t is not None]
    seconds = max(ends) - started if converged and ends else None
    return {
        "mode": mode,
        "actions": actions,
        "final_value": final,
        "converged": converged,
        "reached": progress.reached,
        "acked": acked,
        "ack_frames": sum(r["acks"] for r in acks),
        "error_events": sum(r["errors"] for r in acks),  # to the senders: listeners send nothing
        "seconds": seconds,
        "writing_seconds": writing,
        "actions_per_second": actions / seconds if seconds else None,
        **used,
        "server_cpu_seconds": cpu,
        "server_idle_after": idle,
        "cpu_us_per_action": cpu / actions * 1e6,
    }
