"""The capacity phase: as many idle connections as the server takes, then one action to all.

On a fresh server process (started with its ``capacity_argv``: counter-sync
with ``--max-users 19000 --max-pending 400``), in this order:

1. the driver connects first, so that it is in whatever the server's caps;
2. ``--max-connections`` - 1 idle connections are opened over the load
   processes (each from its own loopback address, so no address runs out of
   ephemeral ports), ``--capacity-concurrency`` handshakes in flight in all,
   within ``--capacity-timeout``; counter-sync's ``/metrics`` is scraped
   before and after, for the garbage collector's pauses meanwhile;
3. once the server is idle: connections held (the driver's included), the
   server's own users count (the latest the driver was told, once it matches
   the connections held or :data:`COUNT_SETTLE` has passed: a server may send
   the count at most every so often, as counter-sync does), RSS growth per
   connection held;
4. the driver sends one ``plus``; every idle connection notes when it first
   sees the value it made: how many did within :data:`UPDATE_WITHIN`, the
   p99 and max delay.

Whether counter-sync lowered its caps to fit its open-files limit is read
from its log (the ``open-files limit`` warning).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from bench.listeners import Reply
from bench.loadgen import LoadGen, LoadGenError, Usage
from bench.proc import listen_overflows, rss_bytes, wait_idle
from bench.reporting import Report, say, spread_ms
from bench.scrape import Samples, gc_pauses, scrape_or_none
from bench.serverlog import lowered_caps, open_files_warning
from bench.servers import RunningServer

if TYPE_CHECKING:
    from bench.measure import BenchSettings

__all__ = ["UPDATE_WITHIN", "session_capacity"]

# The capacity target: with every connection held, each gets the update within 2 s.
UPDATE_WITHIN = 2.0
# How long the driver's users count may take to reach the connections held:
# counter-sync sends a count at most every USERS_PERIOD (0.1 s), and writing
# it to 19,000 connections takes a while more.
COUNT_SETTLE = 3.0


def session_capacity(
    server: RunningServer, load: LoadGen, s: BenchSettings, result: Report
) -> None:
    """Open up to `max_connections` connections, count what is held, deliver one action."""
    baseline_rss = rss_bytes(server.pid)
    overflows = listen_overflows()
    say(f"capacity: up to {s.max_connections} connections, the driver first")
    load.drive("driver_connect", s.timeout, url=server.url, limit=s.timeout)
    before = scrape_or_none(server.url) if server.spec.metrics else None
    usage = Usage(server, load)
    fill = load.fill(
        server.url,
        s.max_connections - 1,
        concurrency=s.capacity_concurrency,
        timeout=s.capacity_timeout,
    )
    used = usage.stop()
    idle = wait_idle(server.pid, timeout=min(s.timeout, 10))
    after = scrape_or_none(server.url) if server.spec.metrics else None
    view, held = settled_view(load)
    rss = rss_bytes(server.pid)
    warning = open_files_warning(server.child.lines)
    capacity: Report = {
        "tried": s.max_connections,
        "handshakes": fill["connected"] + 1,
        "failed": fill["failed"],
        "held": held,
        "server_users": view["users"],
        "time_limit": s.capacity_timeout,
        "seconds": used["wall_seconds"],
        **used,
        "server_idle_after": idle,
        "listen_overflows": listen_overflows() - overflows,
        "kib_per_connection": (rss - baseline_rss) / 1024 / held if held else None,
        "connect_errors": fill["errors"],
        "gc": gc_figures(server, before, after),
        "open_files_warning": warning,
        "capped": lowered_caps(warning) if warning else None,
    }
    result["capacity"] = capacity
    if view["closed"] or view["value"] is None:
        capacity["update"] = None
        return
    say("capacity: one action to every connection")
    try:
        capacity["update"] = deliver_one(load, int(view["value"]), s.timeout)
    except LoadGenError as exc:
        capacity["update"] = None
        result.setdefault("errors", []).append(f"capacity update: {exc}")


def settled_view(load: LoadGen) -> tuple[Reply, int]:
    """The driver's view and the connections held, once its users count matches them.

    Waits up to :data:`COUNT_SETTLE`: then the count the driver was last told,
    whatever it is.
    """
    deadline = time.monotonic() + COUNT_SETTLE
    while True:
        view = load.drive("driver_view", 5)
        held = load.count_open() + (not view["closed"])
        if view["closed"] or view["users"] == held or time.monotonic() >= deadline:
            return view, held
        time.sleep(0.1)


def gc_figures(
    server: RunningServer, before: Samples | None, after: Samples | None
) -> Report | None:
    """The collector's pauses between the scrapes; None for a server without the metrics."""
    if not server.spec.metrics:
        return None
    if before is None or after is None:
        return {"error": "/metrics did not answer", "longest_ms": None}
    return gc_pauses(before, after)


def deliver_one(load: LoadGen, value: int, timeout: float) -> Report:
    """The driver sends one plus; per connection, the delay until it saw the new value.

    The driver is one of the connections: its own copy of the update counts too.
    """
    load.arm(value + 1)
    load.drive("driver_expect", 5, value=value + 1)
    sent_at = float(load.drive("burst", 5, count=1)["started"])
    delays, missing, errors = load.armed_delays(sent_at, timeout)
    seen_at = load.drive("driver_seen", timeout, limit=timeout)["value_at"]
    if seen_at is None:
        missing += 1
    else:
        delays.append(seen_at - sent_at)
    return {
        "value": value + 1,
        "got": len(delays),
        "missing": missing,
        "error_events": errors,
        "within": sum(delay <= UPDATE_WITHIN for delay in delays),
        "within_seconds": UPDATE_WITHIN,
        **spread_ms(delays),
    }
