"""Attacks 3 to 6: silent sockets, one address's crowd, pipelined requests, garbage."""

from __future__ import annotations

import contextlib
import math
import resource
import time

from bench.attack import clients, raw
from bench.attack.channel import Attacker, AttackError
from bench.attack.figures import (
    Figure,
    Outcome,
    all_of,
    at_most,
    below,
    exactly,
    info,
    pair,
    show,
)
from bench.attack.run import (
    GARBAGE_SOURCE,
    HEALTH_SOURCE,
    LEGIT_NETWORK,
    LEGIT_SOURCE,
    PIPELINE_SOURCE,
    SILENT_SOURCE,
    SOCKETS_PER_PROCESS,
    Run,
    loopback_addresses,
)
from bench.attack.subject import Subject
from bench.loadgen import shares
from bench.proc import CpuWatch, wait_idle
from bench.reporting import Report
from bench.serverlog import log_stats, lowered_caps, open_files_warning
from counter_sync.config import MAX_USERS_PER_IP

__all__ = [
    "attack_garbage",
    "attack_per_address",
    "attack_pipelined",
    "attack_silent",
    "attack_silent_limit",
]


def silent_sockets(
    run: Run, stack: contextlib.ExitStack, subject: Subject, count: int, *, concurrency: int
) -> Attacker:
    """A process that opens ``count`` silent sockets from SILENT_SOURCE and holds them."""
    return run.attacker(
        stack,
        clients.silent_sockets,
        port=subject.port,
        source=SILENT_SOURCE,
        count=count,
        concurrency=concurrency,
        connect_timeout=3.0,
        limit=3 * run.timeout,
    )


def ordinary_clients(
    run: Run,
    stack: contextlib.ExitStack,
    subject: Subject,
    sources: list[str],
    *,
    health_source: str | None = None,
) -> Report:
    """Ordinary clients from ``sources`` try to get in (and ``/healthz`` from ``health_source``).

    Returns their report once they are done; the kernel's side is read then.
    """
    legit = run.attacker(
        stack,
        clients.legit_clients,
        port=subject.port,
        sources=sources,
        health_source=health_source,
    )
    result = legit.result(run.timeout)
    subject.snapshot_kernel()
    return result


def attack_silent(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """3a. Silent sockets from one host against a server held to 1024 open files."""
    args = run.args
    subject = run.serve(stack, "silent", open_files_limit=args.silent_open_files)
    caps = open_files_warning(subject.lines_since(0))
    silent = silent_sockets(run, stack, subject, args.silent, concurrency=256)
    opened = silent.ready(2 * run.timeout)
    result = ordinary_clients(run, stack, subject, [LEGIT_SOURCE], health_source=HEALTH_SOURCE)
    held = silent.finish(run.timeout)
    client, health = result["clients"][0], result["health"]
    health_ok = health.get("status") == 200 and health.get("seconds", math.inf) < 1
    outcome.figures += [
        info("lowered caps (server log)", lowered_caps(caps)),
        info(
            f"silent sockets from {SILENT_SOURCE}: connected / open at end",
            f"{opened['connected']:,} of {args.silent:,} / {held['still_open']:,}",
        ),
        below(
            f"WebSocket from {LEGIT_SOURCE}: connect to first event (s)", client.get("seconds"), 1
        ),
        Figure(
            f"/healthz from {HEALTH_SOURCE}",
            f"{health.get('status', health.get('error'))} in {show(health.get('seconds'))} s",
            "200 in < 1 s",
            health_ok,
        ),
    ]
    outcome.details.update(caps_line=caps, opened=opened, held=held, legit=result)
    return subject


def attack_silent_limit(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """3b. More silent sockets than this machine's open-files limit, then ten ordinary clients."""
    args = run.args
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        raise AttackError("the open-files limit is unlimited: nothing to exceed")
    count = hard + args.silent_extra
    subject = run.serve(stack, "silent-limit")
    # One process cannot hold more sockets than the limit: several share them.
    attackers = [
        silent_sockets(run, stack, subject, share, concurrency=512)
        for share in shares(count, math.ceil(count / SOCKETS_PER_PROCESS))
    ]
    opened = [attacker.ready(2 * run.timeout) for attacker in attackers]
    result = ordinary_clients(run, stack, subject, loopback_addresses(LEGIT_NETWORK, args.legit))
    held = [attacker.finish(run.timeout) for attacker in attackers]
    times = [client["seconds"] for client in result["clients"] if "seconds" in client]
    outcome.figures += [
        info("open-files limit (ulimit -Hn)", hard),
        info(
            f"silent sockets from {SILENT_SOURCE}: connected / open at end",
            f"{sum(o['connected'] for o in opened):,} of {count:,} / "
            f"{sum(h['still_open'] for h in held):,}",
        ),
        all_of(f"ordinary clients from {LEGIT_NETWORK}x that got in", len(times), args.legit),
        info("  slowest connect to first event (s)", max(times, default=None)),
    ]
    outcome.details.update(silent_sockets=count, opened=opened, held=held, legit=result)
    return subject


def attack_per_address(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """4. One address opens --fill connections: only the per-address cap gets in."""
    args = run.args
    subject = run.serve(stack, "per-address", "--max-users", str(args.fill_max_users))
    fill = run.attacker(
        stack,
        clients.fill_connections,
        port=subject.port,
        source=SILENT_SOURCE,
        count=args.fill,
        concurrency=args.fill_concurrency,
        limit=3 * run.timeout,
    )
    outcomes = fill.ready(2 * run.timeout)["outcomes"]
    mark = subject.mark()
    result = ordinary_clients(run, stack, subject, [LEGIT_SOURCE] * args.legit)
    held = fill.finish(run.timeout)
    others = {k: v for k, v in outcomes.items() if k not in ("in", "429")}
    got_in = sum("seconds" in client for client in result["clients"])
    rejections = sum("rejected" in line for line in subject.lines_since(0))
    outcome.figures += [
        exactly(
            f"connections from {SILENT_SOURCE} that got in", outcomes.get("in", 0), MAX_USERS_PER_IP
        ),
        exactly("  refused with 429", outcomes.get("429", 0), args.fill - MAX_USERS_PER_IP),
        info("  any other outcome", others or "none"),
        all_of(f"clients from {LEGIT_SOURCE} that got in", got_in, args.legit),
        info("rejection warnings in the log (throttled)", rejections),
    ]
    outcome.details.update(outcomes=outcomes, held=held, legit=result, log_after_fill=mark)
    return subject


def attack_pipelined(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """5. Two HTTP requests in one packet, --tries times: the first is answered, nothing breaks."""
    args = run.args
    subject = run.serve(stack, "pipelined")
    mark = subject.mark()
    client = run.attacker(
        stack,
        raw.pipelined_requests,
        port=subject.port,
        source=PIPELINE_SOURCE,
        tries=args.tries,
        limit=3 * run.timeout,
    )
    report = client.result(4 * run.timeout)
    subject.stop()  # every line the attack caused is in the log now
    stats = log_stats(subject.lines_since(mark))
    outcome.figures += [
        all_of("first request answered (200)", report["first_answered"], args.tries),
        info("  second one answered too", report["both_answered"]),
        exactly("ERROR lines in the server log", stats["errors"], 0),
        exactly("tracebacks in the server log", stats["tracebacks"], 0),
    ]
    outcome.details.update(report=report, log=stats)
    return subject


def attack_garbage(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """6. --garbage-clients send bad messages as fast as they can: the log stays small."""
    args = run.args
    subject = run.serve(stack, "garbage")
    senders = run.attacker(
        stack,
        clients.garbage_senders,
        port=subject.port,
        source=GARBAGE_SOURCE,
        clients=args.garbage_clients,
        seconds=args.garbage_seconds,
    )
    senders.ready(run.timeout)
    mark, server = subject.mark(), CpuWatch(subject.pid)
    time.sleep(args.garbage_seconds / 2)
    subject.snapshot_kernel()  # while it flows
    report = senders.result(args.garbage_seconds + run.timeout)
    busy = server.busy()
    wait_idle(subject.pid, timeout=run.timeout)  # what it read, it has answered and logged
    stats = log_stats(subject.lines_since(mark))
    outcome.figures += [
        at_most("WARNING lines in the server log", stats["warnings"], args.max_warnings),
        info("  all lines / bytes of log", f"{stats['lines']:,} / {stats['bytes']:,}"),
        info(
            "bad messages queued by the clients / answered",
            pair(report["messages_sent"], report["error_replies"]),
        ),
        info("server CPU meanwhile (%)", busy * 100),
    ]
    outcome.details.update(report=report, log=stats, server_busy=busy)
    return subject
