"""Attacks 9 and 10: silent sockets from many addresses at the pending cap, and plain HTTP floods.

9. ``pending-flood``: 50 addresses hold 20 silent sockets each (each address
   within its own pending cap, together the whole ``--max-pending`` of a
   default server) and open a new one whenever the server drops one, while
   ordinary clients and ``/healthz`` probes from other addresses try to get in.
10. ``http-flood``: 64 connections request ``/healthz`` back to back from one
   address while the load generator's listeners measure delivery latency;
   ``http-flood-off`` is the same against ``--http-rate 0``, for comparison.

The attackers and the ordinary clients each run in a process of their own
(:class:`bench.attack.channel.Attacker`); this one steers them and reads the
server's CPU from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from bench.attack.channel import Channel, describe
from bench.attack.figures import Figure, Outcome, against, info, pair
from bench.attack.run import Run, delivery_latency, join_listeners
from bench.attack.subject import Subject
from bench.flags import Flag, positive
from bench.loadgen import shares
from bench.proc import CpuWatch
from bench.reporting import Report, spread_ms
from testkit.processes import TIMEOUT
from testkit.rawclient import HOST, connected_socket, upgrade_request

__all__ = [
    "FLAGS",
    "attack_http_flood",
    "attack_http_flood_off",
    "attack_pending_flood",
    "flood_requests",
    "ordinary_crowd",
    "silent_crowd",
]

# Who attacks from where, each kind from its own loopback addresses (the load
# generator uses 127.0.1.x).
SILENT_NETWORK = "127.0.0."  # 127.0.0.2 to .51: the silent sockets
SILENT_FIRST = 2
CLIENT_FIRST = 100  # 127.0.0.100 to .199: the ordinary clients, one address each in turn
PROBE_FIRST = 200  # 127.0.0.200 to .249: the health probes
FLOOD_SOURCE = "127.0.0.60"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: counter-sync\r\n\r\n"
# A liveness probe's patience: Kubernetes' default timeoutSeconds.
PROBE_TIMEOUT = 1.0
# An ordinary client's: a default server's handshake timeout.
CLIENT_TIMEOUT = 5.0
SAMPLE = re.compile(rb"^(counter_sync_\w+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)

COUNT, SECONDS = positive(int), positive(float)
FLAGS = (
    Flag("--pending-addresses", "addresses of the silent sockets (attack 9)", COUNT, 50),
    Flag(
        "--pending-per-address",
        "silent sockets each address holds (attack 9; a default server lets in 20 per address)",
        COUNT,
        20,
    ),
    Flag(
        "--pending-settle",
        "seconds the silent sockets run before the clients come (attack 9; longer than "
        "a default server's 5 s handshake timeout, so the reopening is under way)",
        SECONDS,
        7.0,
    ),
    Flag(
        "--pending-seconds",
        "seconds over which the clients and probes come (attack 9)",
        SECONDS,
        10.0,
    ),
    Flag("--pending-clients", "ordinary clients that try to get in (attack 9)", COUNT, 100),
    Flag("--pending-probes", "/healthz probes (attack 9)", COUNT, 30),
    Flag(
        "--pending-goal",
        "attack 9's target: the share (%%) of clients and of probes that must get in",
        SECONDS,
        95.0,
    ),
    Flag(
        "--flood-connections", "connections requesting /healthz back to back (attack 10)", COUNT, 64
    ),
    Flag(
        "--flood-processes",
        "processes the flooding connections are spread over (attack 10)",
        COUNT,
        2,
    ),
)


# --- Attack 9: silent sockets from many addresses --------------------------------------


def attack_pending_flood(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """9. Silent sockets from many addresses fill --max-pending; clients and probes come."""
    args = run.args
    subject = run.serve(stack, "pending-flood")
    sources = [f"{SILENT_NETWORK}{SILENT_FIRST + index}" for index in range(args.pending_addresses)]
    silent = run.attacker(
        stack,
        silent_crowd,
        port=subject.port,
        sources=sources,
        per_source=args.pending_per_address,
        limit=args.pending_settle + args.pending_seconds + 4 * run.timeout,
    )
    opened = silent.ready(2 * run.timeout)
    time.sleep(args.pending_settle)
    server = CpuWatch(subject.pid)
    silent.tell("go")
    ordinary = run.attacker(
        stack,
        ordinary_crowd,
        port=subject.port,
        clients=args.pending_clients,
        probes=args.pending_probes,
        seconds=args.pending_seconds,
    )
    result = ordinary.result(args.pending_seconds + 2 * run.timeout)
    busy = server.busy()
    held = silent.finish(run.timeout)
    clients, probes = result["clients"], result["probes"]
    clients_in = [c["seconds"] for c in clients if "seconds" in c]
    probes_ok = [p["seconds"] for p in probes if p.get("status") == 200]
    goal = args.pending_goal
    outcome.figures += [
        info(
            f"silent sockets from {len(sources)} addresses: first round / opens a second",
            pair(opened["connected"], held["opens_per_second"]),
        ),
        info(
            "pending handshakes / evicted as silent (server's /metrics)",
            pair(
                result["metrics"].get("counter_sync_pending_handshakes"),
                result["metrics"].get('counter_sync_handshakes_rejected_total{reason="silent"}'),
            ),
        ),
        *got_in(
            f"ordinary clients in within {CLIENT_TIMEOUT:g} s",
            "connect to first event",
            clients_in,
            len(clients),
            goal,
        ),
        *got_in(
            f"/healthz probes 200 within {PROBE_TIMEOUT:g} s",
            "probe time",
            probes_ok,
            len(probes),
            goal,
        ),
        info("  what became of the others", failures(clients + probes) or "none"),
        info("server CPU meanwhile (%)", busy * 100),
    ]
    outcome.details.update(opened=opened, held=held, ordinary=result, server_busy=busy)
    return subject


def got_in(
    name: str, timed: str, seconds: Sequence[float], total: int, goal: float
) -> list[Figure]:
    """The share of ``total`` that got in (``seconds``: the time each of those took), against
    ``goal`` (%), and their p50 and p99."""
    spread = spread_ms(seconds)
    return [
        against(f"{name} (%, of {total})", 100 * len(seconds) / total, ">=", goal),
        info(f"  {timed}, p50 / p99 (ms)", pair(spread["p50_ms"], spread["p99_ms"])),
    ]


def failures(reports: Sequence[Report]) -> dict[str, int]:
    return dict(
        Counter(
            str(r.get("error", r.get("status")))
            for r in reports
            if "error" in r or r.get("status") not in (None, 200)
        )
    )


async def silent_crowd(
    channel: Channel, *, port: int, sources: Sequence[str], per_source: int, limit: float
) -> None:
    """``per_source`` silent sockets from each of ``sources``, each reopened as soon as the
    server drops it, until told to stop; how many opened, and how fast once told "go"."""
    opens = Counter[str]()
    errors = Counter[str]()
    total = len(sources) * per_source
    first_round = asyncio.Event()

    async def hold(source: str) -> None:
        while True:
            try:
                async with asyncio.timeout(3):
                    sock = await connected_socket(port, source)
            except (OSError, TimeoutError) as exc:
                errors[describe(exc)] += 1
                await asyncio.sleep(0.1)  # refused: the attack goes on, a little later
                continue
            opens["all"] += 1
            if opens["all"] >= total:
                first_round.set()
            with sock, contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_recv(sock, 1)  # until dropped

    tasks = [asyncio.create_task(hold(source)) for source in sources for _ in range(per_source)]
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2 * TIMEOUT):
            await first_round.wait()
    channel.ready(connected=opens["all"], seconds=time.monotonic() - started)
    await channel.hear("go", limit)
    went, opens_before = time.monotonic(), opens["all"]
    await channel.hear("stop", limit)
    seconds = time.monotonic() - went
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    channel.done(
        opens=opens["all"],
        opens_per_second=(opens["all"] - opens_before) / seconds,
        errors=dict(errors),
    )


async def ordinary_crowd(
    channel: Channel, *, port: int, clients: int, probes: int, seconds: float
) -> None:
    """``clients`` WebSocket clients and ``probes`` ``GET /healthz``, each from its own address
    in turn, spread evenly over ``seconds``; then one scrape of ``/metrics``."""
    started = time.monotonic()

    async def timed(
        moment: float, limit: float, attempt: Callable[[], Awaitable[Report]]
    ) -> Report:
        """``attempt()`` at ``moment``, within ``limit``: what it reports, and how long it took."""
        await asyncio.sleep(max(0.0, started + moment - time.monotonic()))
        began = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                result = await attempt()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            return {"error": describe(exc)}
        return result if "error" in result else {**result, "seconds": time.monotonic() - began}

    async def join(source: str) -> Report:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        with contextlib.closing(writer):
            writer.write(upgrade_request(port))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                return {"error": head.split(b"\r\n")[0].decode(errors="replace")}
            await reader.readexactly(2)  # the first event's frame header: it is in
        return {}

    async def probe(source: str) -> Report:
        status, _ = await request(port, source, HEALTHZ)
        return {"status": status}

    def client(index: int) -> Awaitable[Report]:
        source = f"127.0.0.{CLIENT_FIRST + index % 100}"
        return timed(seconds * index / clients, CLIENT_TIMEOUT, lambda: join(source))

    def prober(index: int) -> Awaitable[Report]:
        source = f"127.0.0.{PROBE_FIRST + index % 50}"
        return timed(seconds * index / probes, PROBE_TIMEOUT, lambda: probe(source))

    results = await asyncio.gather(
        asyncio.gather(*(client(index) for index in range(clients))),
        asyncio.gather(*(prober(index) for index in range(probes))),
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            _, body = await request(port, f"127.0.0.{PROBE_FIRST + 50}", METRICS)
    except (OSError, TimeoutError):
        body = b""
    channel.done(clients=results[0], probes=results[1], metrics=samples(body))


METRICS = b"GET /metrics HTTP/1.1\r\nHost: counter-sync\r\n\r\n"


async def request(port: int, source: str, raw: bytes) -> tuple[int, bytes]:
    """Send ``raw`` from ``source`` and read to the end: the status and the body."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    with contextlib.closing(writer):
        writer.write(raw)
        response = await reader.read()
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if not status or not status[0].isdigit():
        raise ConnectionError("closed before an answer")
    return int(status[0]), body


def samples(body: bytes) -> dict[str, float]:
    """The counter_sync_* samples of a Prometheus text scrape, by name and labels."""
    found = {}
    for name, labels, value in SAMPLE.findall(body):
        key = name.decode() + (f"{{{labels.decode()}}}" if labels else "")
        found[key] = float(value)
    return found


# --- Attack 10: plain HTTP floods ----------------------------------------------------


def attack_http_flood(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """10. A /healthz flood against a default server (--http-rate on)."""
    return http_flood(run, stack, outcome, "http-flood")


def attack_http_flood_off(run: Run, stack: contextlib.ExitStack, outcome: Outcome) -> Subject:
    """10b. The same flood against --http-rate 0, for comparison."""
    return http_flood(run, stack, outcome, "http-flood-off", "--http-rate", "0")


def http_flood(
    run: Run, stack: contextlib.ExitStack, outcome: Outcome, name: str, *flags: str
) -> Subject:
    args = run.args
    subject = run.serve(stack, name, *flags)
    start = join_listeners(run, subject, count=args.listeners, driver=True)
    quiet = delivery_latency(run, subject, start)
    flooders = [
        run.attacker(
            stack,
            flood_requests,
            port=subject.port,
            source=FLOOD_SOURCE,
            connections=share,
            limit=args.seconds + 4 * run.timeout,
        )
        for share in shares(args.flood_connections, args.flood_processes)
    ]
    for flooder in flooders:
        flooder.ready(run.timeout)
    for flooder in flooders:
        flooder.tell("go")
    time.sleep(1)  # the flood under way
    flooded = delivery_latency(run, subject, int(quiet["end_value"]))
    reports = [flooder.finish(run.timeout) for flooder in flooders]
    statuses: Counter[str] = Counter()
    for report in reports:
        statuses.update(report["statuses"])
    per_second = sum(report["requests"] / report["seconds"] for report in reports)
    scrape = scrape_metrics(subject.port)
    outcome.figures += [
        info("delivery p50 / p99, quiet (ms)", pair(quiet["p50_ms"], quiet["p99_ms"])),
        info("delivery p50 / p99, flooded (ms)", pair(flooded["p50_ms"], flooded["p99_ms"])),
        info(
            "server CPU, quiet / flooded (%)",
            pair(quiet["server_busy"] * 100, flooded["server_busy"] * 100),
        ),
        info(f"flood from {FLOOD_SOURCE}: tries a second", per_second),
        info(
            "  answered 200 / 429 / reset or closed",
            pair(
                statuses["200"], f"{statuses['429']:,} / {statuses['reset'] + statuses['closed']:,}"
            ),
        ),
        info(
            "healthz 200 / 429 counted in /metrics",
            pair(
                scrape.get('counter_sync_http_requests_total{endpoint="healthz",status="200"}'),
                scrape.get('counter_sync_http_requests_total{endpoint="healthz",status="429"}'),
            ),
        ),
        info(
            "  reset at accept, told 429 and back too soon",
            scrape.get('counter_sync_handshakes_rejected_total{reason="http_rate"}'),
        ),
        info(
            "warnings about it in the log (throttled)",
            sum("HTTP request rate" in line for line in subject.lines_since(0)),
        ),
    ]
    outcome.details.update(quiet=quiet, flooded=flooded, flood=reports, metrics=scrape)
    return subject


def scrape_metrics(port: int) -> dict[str, float]:
    """One ``GET /metrics`` from an address of its own, once the flood is over."""
    connection = http.client.HTTPConnection(
        HOST, port, timeout=TIMEOUT, source_address=(f"127.0.0.{PROBE_FIRST + 50}", 0)
    )
    with contextlib.closing(connection):
        connection.request("GET", "/metrics")
        return samples(connection.getresponse().read())


async def flood_requests(
    channel: Channel, *, port: int, source: str, connections: int, limit: float
) -> None:
    """``connections`` loops, each a ``GET /healthz`` on a new connection, then the next,
    from "go" until "stop"; the answers by status."""
    statuses: Counter[str] = Counter()
    channel.ready()
    await channel.hear("go", limit)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                status, _ = await request(port, source, HEALTHZ)
                statuses[str(status)] += 1
            except ConnectionResetError:
                statuses["reset"] += 1
            except ConnectionError:
                statuses["closed"] += 1  # closed before a status line
            except OSError as exc:
                statuses[describe(exc)] += 1

    started = time.monotonic()
    tasks = [asyncio.create_task(loop()) for _ in range(connections)]
    await channel.hear("stop", limit)
    stop.set()
    seconds = time.monotonic() - started
    await asyncio.gather(*tasks, return_exceptions=True)
    channel.done(statuses=dict(statuses), requests=sum(statuses.values()), seconds=seconds)
