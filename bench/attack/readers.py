"""Attacks 1 and 2: clients that flood pings and never read, and clients that stop reading."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from bench.attack import clients, raw
from bench.attack.figures import (
    Figure,
    Outcome,
    all_of,
    at_most,
    below,
    info,
    kib,
    pair,
)
from bench.attack.run import (
    FLOOD_SOURCE,
    MIB,
    STALL_DRIVER_SOURCE,
    STALL_PING_INTERVAL,
    STALL_PING_TIMEOUT,
    STALL_SOURCE,
    Run,
    delivery_latency,
    dropped_after,
    fate,
    join_listeners,
    seen_all,
    sent_by,
)
from bench.attack.subject import Subject
from bench.loadgen import Progress
from bench.proc import CpuWatch, rss_bytes
from bench.reporting import Report, ratio
from bench.serverlog import dropped_line, lifetimes

__all__ = ["attack_flood", "attack_stall", "attack_stall_paced"]

STALL_SNAPSHOT = 1.5  # seconds after it stopped reading: the kernel's share is read then


def attack_flood(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """1. One client sends --pings ping frames as fast as it can and never reads.

    The listeners' delivery latency is measured without the flood, then with
    it, in the same run, so the ratio compares like with like. The server
    keeps its default keepalive, so the flooder's fate is what it would be
    in production.
    """
    args = run.args
    subject = run.serve(stack, "flood")
    value = join_listeners(run, subject, count=args.listeners, driver=True)
    calm = delivery_latency(run, subject, value)
    before, mark = rss_bytes(subject.pid), subject.mark()
    server = CpuWatch(subject.pid)
    flooder = run.attacker(
        stack,
        raw.flood_pings,
        port=subject.port,
        source=FLOOD_SOURCE,
        pings=args.pings,
        repeat=False,
        limit=args.fate_timeout + run.timeout,
    )
    ready = flooder.ready(run.timeout)
    peer = f"{FLOOD_SOURCE}:{ready['port']}"
    flooded = delivery_latency(run, subject, calm["end_value"])
    busy = server.busy()
    kernel = subject.snapshot_kernel([peer])
    fate_text = fate(subject, peer, mark, since=ready["started"], limit=args.fate_timeout)
    flood = flooder.finish(run.timeout)["floods"][0]
    growth = (subject.sampler.peak_rss(since=server.started) - before) / MIB
    queues = kernel.get("peers", {}).get(peer, {})
    outcome.figures += [
        below("server RSS growth while flooding (MiB)", growth, 8),
        info(
            "pings the flooder wrote (into its socket)",
            f"{flood['pings_sent']:,} of {args.pings:,}",
        ),
        info("delivery p50 without / with flood (ms)", pair(calm["p50_ms"], flooded["p50_ms"])),
        at_most("  p50 with flood / without", ratio(flooded["p50_ms"], calm["p50_ms"]), 2),
        info("delivery p99 without / with flood (ms)", pair(calm["p99_ms"], flooded["p99_ms"])),
        at_most("  p99 with flood / without", ratio(flooded["p99_ms"], calm["p99_ms"]), 2),
        all_of("  listeners that saw every action, flooded", seen_all(flooded), args.listeners),
        info("server CPU without / with flood (%)", pair(calm["server_busy"] * 100, busy * 100)),
        info("flooder's fate", fate_text),
        info(
            "kernel: its unread pings / queued pongs (KiB)",
            pair(kib(queues.get("r")), kib(queues.get("w"))),
        ),
    ]
    outcome.details.update(
        calm=calm,
        flooded=flooded,
        flood=flood,
        flood_server_busy=busy,
        rss_before_flood_bytes=before,
        rss_growth_mib=growth,
        fate=fate_text,
        kernel_during_flood=kernel,
    )
    return subject


def attack_stall(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """2. A client stops reading while updates are queued for it as fast as they go.

    Thousands of updates back up behind it before its first keepalive ping
    is due (the case that once broke the server): the ping then waits behind
    them, so only the liveness deadline can drop it in time.
    """
    return stalled_reader(run, stack, outcome, name="stall", pace=0.0)


def attack_stall_paced(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """2b. The same, with updates paced so that its buffers fill after the first ping.

    The ping goes out, its pong never comes, and the keepalive fails the
    connection: the drop must come as soon, whatever the pace.
    """
    return stalled_reader(run, stack, outcome, name="stall-paced", pace=run.args.stall_pace)


def stalled_reader(
    run: Run, stack: contextlib.ExitStack, outcome: Outcome, *, name: str, pace: float
) -> Subject:
    """Attack 2 at one pace: time the drop, and check that everyone hears of it."""
    args = run.args
    subject = run.serve(
        stack,
        name,
        *("--ping-interval", f"{STALL_PING_INTERVAL:g}"),
        *("--ping-timeout", f"{STALL_PING_TIMEOUT:g}"),
        *("--rate", "0"),  # the driver acts hundreds of times a second
    )
    listeners = args.stall_listeners
    join_listeners(run, subject, count=listeners, driver=False)
    driver = run.attacker(
        stack,
        clients.one_at_a_time,
        port=subject.port,
        source=STALL_DRIVER_SOURCE,
        path="/",
        updates=args.stall_updates,
        pace=pace,
        reconnect=False,
        limit=3 * run.timeout,
    )
    driver.ready(run.timeout)
    run.load.expect(users=listeners + 1)
    run.load.wait("users", run.timeout)
    mark = subject.mark()
    stalled = run.attacker(
        stack,
        raw.stalled_readers,
        port=subject.port,
        source=STALL_SOURCE,
        count=1,
        path="/",
        repeat=False,
        limit=2 * run.timeout,
    )
    ready = stalled.ready(run.timeout)
    driver.tell("go")
    run.load.expect(users=listeners + 2)  # everyone saw it come in...
    run.load.wait("users", run.timeout)
    run.load.expect(users=listeners + 1)  # ...and then go
    peer = f"{STALL_SOURCE}:{ready['ports'][0]}"
    # Before any drop (the deadline is 2 s): what the kernel holds for it by then.
    time.sleep(max(0.0, ready["stopped_at"] + STALL_SNAPSHOT - time.monotonic()))
    kernel = subject.snapshot_kernel([peer])
    progress = run.load.wait("users", run.timeout)
    subject.wait_for_line(dropped_line(peer), mark, run.timeout)
    ended = lifetimes(subject.lines_since(mark), STALL_SOURCE)
    noticed = stalled.finish(run.timeout)["noticed"]
    driven = driver.finish(run.timeout)
    outcome.figures += stall_figures(ready, ended, progress, driven, listeners)
    queued = kernel.get("peers", {}).get(peer, {}).get("w")
    outcome.figures.append(
        info(f"kernel: queued for it at {STALL_SNAPSHOT:g} s (KiB)", kib(queued))
    )
    outcome.details.update(
        stalled=ready, ended=ended, noticed=noticed, driver=driven, kernel_while_stalled=kernel
    )
    return subject


def stall_figures(
    ready: Report,
    ended: Sequence[tuple[str, float, str]],
    progress: Progress,
    driven: Report,
    listeners: int,
) -> list[Figure]:
    deadline = STALL_PING_INTERVAL + STALL_PING_TIMEOUT + 1
    driver_saw = bool(driven["users"]) and driven["users"][-1][1] == listeners + 1
    first_ping = ready["stopped_at"] + STALL_PING_INTERVAL
    return [
        at_most("seconds from its last read to the drop", ended[0][1] if ended else None, deadline),
        info("  why (server log)", ended[0][2] if ended else "no line"),
        all_of("clients that got the new user count", progress.reached + driver_saw, listeners + 1),
        info(
            "  seconds until every listener had it",
            None if progress.last is None else progress.last - ready["stopped_at"],
        ),
        info("updates sent before its first ping was due", sent_by(driven["timeline"], first_ping)),
        info("updates sent before the drop", dropped_after(driven["users"], listeners + 1)),
        info("  one at a time, per second", driven["sent"] / driven["seconds"] or None),
    ]
