"""Attacks 7 and 8: everything at once, and the costliest connection: the memory bound."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence

from bench.attack import clients, raw
from bench.attack.channel import Attacker
from bench.attack.figures import (
    Figure,
    Outcome,
    at_most,
    info,
    kib,
    pair,
    show,
)
from bench.attack.run import (
    BOUND_NETWORK,
    FILL_SOURCE_ALL,
    FLOOD_SOURCE,
    GARBAGE_SOURCE,
    MIB,
    PIPELINE_SOURCE,
    SILENT_SOURCE,
    STALL_DRIVER_SOURCE,
    STALL_PING_INTERVAL,
    STALL_PING_TIMEOUT,
    STALL_ROOM,
    STALL_SOURCE,
    Run,
    delivery_latency,
    join_listeners,
    loopback_addresses,
)
from bench.attack.subject import Subject
from bench.proc import CpuWatch, wait_idle, waiting_seconds
from bench.reporting import Report
from bench.serverlog import lifetimes

__all__ = ["attack_all", "attack_bound_ping", "attack_bound_text"]


def attack_all(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """7. Every attack at once against one server: its RSS stays within the per-connection bound.

    The server runs as in attack 2 (keepalive 1 s / 1 s, no rate limit), so
    that the flooder and the stalled readers are dropped within the window;
    they reconnect and attack again, as an attacker would.
    """
    args = run.args
    subject = run.serve(
        stack,
        "all-at-once",
        *("--ping-interval", f"{STALL_PING_INTERVAL:g}"),
        *("--ping-timeout", f"{STALL_PING_TIMEOUT:g}"),
        *("--rate", "0"),
    )
    value = join_listeners(run, subject, count=args.listeners, driver=True)
    server, waited = CpuWatch(subject.pid), waiting_seconds(subject.pid)
    attackers = start_everything(run, stack, subject)
    readies = {
        name: attacker.ready(2 * run.timeout)
        for name, attacker in attackers.items()
        if name != "pipelined"  # it reports only when done
    }
    attackers["stall driver"].tell("go")
    latency = delivery_latency(run, subject, value)
    subject.snapshot_kernel()
    time.sleep(max(0.0, server.started + args.all_seconds - time.monotonic()))
    subject.snapshot_kernel()
    elapsed = time.monotonic() - server.started
    busy = server.seconds() / elapsed
    starved = (waiting_seconds(subject.pid) - waited) / elapsed
    reports = {name: finish_attacker(name, attacker, run) for name, attacker in attackers.items()}
    subject.stop()
    stalled = lifetimes(subject.process.lines, STALL_SOURCE)
    outcome.figures += bound_figures(subject, args.bound_kib)
    outcome.figures += [
        info(
            "server on a CPU / waiting for one (% of the window)", pair(busy * 100, starved * 100)
        ),
        info("delivery p50 / p99 meanwhile (ms)", pair(latency["p50_ms"], latency["p99_ms"])),
        info("floods: connections / pings sent", flood_summary(reports["flood"])),
        info("stalled readers dropped / slowest drop (s)", stall_summary(stalled)),
        info(
            "fill: got in / 429",
            pair(readies["fill"]["outcomes"].get("in"), readies["fill"]["outcomes"].get("429")),
        ),
        info(
            "pipelined tries / first answered",
            pair(reports["pipelined"]["tries"], reports["pipelined"]["first_answered"]),
        ),
        info("garbage: error replies read", reports["garbage"]["error_replies"]),
    ]
    outcome.details.update(
        latency=latency,
        readies=readies,
        reports=reports,
        stalled=stalled,
        server_busy=busy,
        server_waiting_for_cpu=starved,
    )
    return subject


def bound_figures(subject: Subject, bound_kib: float) -> list[Figure]:
    """Peak RSS against the idle RSS plus ``bound_kib`` per connection held at the peak."""
    memory = subject.memory()
    allowed = subject.idle_rss + bound_kib * 1024 * memory["connections_at_peak"]
    return [
        info("connections held at the peak (open sockets)", memory["connections_at_peak"]),
        info(
            "server RSS idle / peak (MiB)",
            pair(subject.idle_rss / MIB, memory["peak_rss_bytes"] / MIB),
        ),
        Figure(
            "peak RSS / idle + bound x connections (MiB)",
            pair(memory["peak_rss_bytes"] / MIB, allowed / MIB),
            f"bound {bound_kib:g} KiB",
            memory["peak_rss_bytes"] <= allowed,
        ),
    ]


def attack_bound_text(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """8a. The most RSS a connection can cost: 6-byte text frames, never reading the replies."""
    return costliest_connections(run, stack, outcome, name="bound-text", frame=raw.EMPTY_TEXT)


def attack_bound_ping(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """8b. The same with 6-byte pings: each asks for a pong the client will not read."""
    return costliest_connections(run, stack, outcome, name="bound-ping", frame=raw.EMPTY_PING)


def costliest_connections(
    run: Run, stack: contextlib.ExitStack, outcome: Outcome, *, name: str, frame: bytes
) -> Subject:
    """--bound-clients connections each fill the server's receive buffer with ``frame``.

    The RSS growth per connection is the bound's measurement: no attack
    above costs a connection more. The kernel's share (``ss``) is apart.
    """
    args = run.args
    subject = run.serve(stack, name, "--rate", "0")
    sources = loopback_addresses(BOUND_NETWORK, math.ceil(args.bound_clients / 50))
    senders = run.attacker(
        stack,
        raw.smallest_frames,
        port=subject.port,
        sources=sources,
        per_source=args.bound_clients // len(sources),
        frame=frame,
        limit=3 * run.timeout,
    )
    ready = senders.ready(2 * run.timeout)
    wait_idle(subject.pid, timeout=run.timeout)  # parsed and answered all it will
    kernel = subject.snapshot_kernel()
    senders.finish(run.timeout)
    memory = subject.memory()
    growth = memory["peak_rss_bytes"] - subject.idle_rss
    outcome.figures += [
        info("connections / bytes they sent", pair(ready["connected"], ready["bytes_sent"])),
        at_most(
            "RSS growth per connection (KiB)", growth / 1024 / ready["connected"], args.bound_kib
        ),
        info(
            "kernel per socket: unread / queued to send (KiB)",
            pair(
                kib(kernel.get("received_unread_bytes", 0) / max(1, kernel.get("sockets", 1))),
                kib(kernel.get("queued_to_send_bytes", 0) / max(1, kernel.get("sockets", 1))),
            ),
        ),
    ]
    outcome.details.update(ready=ready, kernel_at_peak=kernel)
    return subject


def start_everything(
    run: Run, stack: contextlib.ExitStack, subject: Subject
) -> dict[str, Attacker]:
    """Every attacker of attacks 1-6, against one server, each from its own address."""
    args = run.args
    port = subject.port
    limit = args.all_seconds + 2 * run.timeout
    start = functools.partial(run.attacker, stack, port=port)
    return {
        "flood": start(
            raw.flood_pings, source=FLOOD_SOURCE, pings=args.pings, repeat=True, limit=limit
        ),
        "stalled": start(
            raw.stalled_readers,
            source=STALL_SOURCE,
            count=args.all_stalled,
            path=STALL_ROOM,
            repeat=True,
            limit=limit,
        ),
        "stall driver": start(
            clients.one_at_a_time,
            source=STALL_DRIVER_SOURCE,
            path=STALL_ROOM,
            updates=10**9,
            pace=0.0,
            reconnect=True,
            limit=limit,
        ),
        "silent": start(
            clients.silent_sockets,
            source=SILENT_SOURCE,
            count=args.silent,
            concurrency=256,
            connect_timeout=3.0,
            limit=limit,
        ),
        "fill": start(
            clients.fill_connections,
            source=FILL_SOURCE_ALL,
            count=args.fill,
            concurrency=args.fill_concurrency,
            limit=limit,
        ),
        "pipelined": start(
            raw.pipelined_requests, source=PIPELINE_SOURCE, tries=10**9, limit=args.all_seconds
        ),
        "garbage": start(
            clients.garbage_senders,
            source=GARBAGE_SOURCE,
            clients=args.garbage_clients,
            seconds=args.all_seconds,
        ),
    }


def finish_attacker(name: str, attacker: Attacker, run: Run) -> Report:
    """Its final report: those that hold connections are told to stop, the others have ended."""
    if name in ("pipelined", "garbage"):
        return attacker.result(run.timeout)
    return attacker.finish(run.timeout)


def flood_summary(report: Report) -> str:
    floods = report["floods"]
    return f"{len(floods)} / {sum(flood['pings_sent'] for flood in floods):,}"


def stall_summary(ended: Sequence[tuple[str, float, str]]) -> str:
    return f"{len(ended)} / {show(max((seconds for _, seconds, _ in ended), default=None))}"
