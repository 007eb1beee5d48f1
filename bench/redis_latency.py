"""Cross-instance update latency in shared mode: ``python -m bench.redis_latency``.

Starts a redis-server (free port, persistence off) and two ``server.py
--redis`` instances, A and B, connects N clients split evenly between them,
and has one more client, the driver, send ``plus`` on A at a fixed rate. Only
the driver acts, so the counter only goes up: a client that is shown value v
has been shown every action up to v.

For every action and every client, the latency is the time from the driver's
send until that client first receives a value that includes the action. The
headline is for clients on B (the update went A -> Redis -> B); clients on A
are the same-instance baseline. Everything runs on this machine, the bench's
own clients included, so the figures include their scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from bench.flags import Flag, installed, parse, positive
from bench.reporting import percentile, write_json
from testkit.processes import RedisServer, ServerProcess

__all__ = ["main"]

START_TIMEOUT = 10.0  # seconds for redis-server or server.py to be ready
DRAIN_TIMEOUT = 10.0  # seconds for the last action to reach every client


@dataclass
class Receiver:
    """A client that records when each value arrived."""

    websocket: ClientConnection
    seen: list[tuple[int, float]] = field(default_factory=list)  # (value, perf_counter)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        async for message in self.websocket:
            event = json.loads(message)
            if event["type"] == "state":
                self.seen.append((event["value"], time.perf_counter()))
                self.arrived.set()

    async def until(self, reached: Callable[[int], bool]) -> None:
        """Return once the latest value satisfies ``reached``."""
        while not (self.seen and reached(self.seen[-1][0])):
            self.arrived.clear()
            await self.arrived.wait()


def latencies(receiver: Receiver, first: int, sent: list[float]) -> list[float]:
    """Seconds from each send to the first value at least as new, for one client.

    ``sent[i]`` is when the action that made the value ``first + i + 1`` was sent.
    """
    result = []
    shown = iter(receiver.seen)
    value, received = first, 0.0
    for index, sent_at in enumerate(sent):
        while value < first + index + 1:
            value, received = next(shown)
        result.append(received - sent_at)
    return result


FLAGS = (
    Flag("--clients", "split evenly over A and B", positive(int), 200),
    Flag("--rate", "driver actions per second", positive(float), 50.0),
    Flag("--seconds", "how long the driver acts", positive(float), 10.0),
    Flag("--warmup", "seconds left out of figures", float, 1.0),
    Flag("--redis-server", "the binary to run", str, "redis-server"),
    Flag(
        "--baseline",
        "also measure one in-memory instance holding all the clients, for comparison",
        None,
    ),
    Flag("--json", "also write the figures here", Path, metavar="PATH"),
)


def figures(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max in seconds, and how many samples."""
    return {
        "p50": percentile(samples, 0.50),
        "p99": percentile(samples, 0.99),
        "max": max(samples),
        "samples": len(samples),
    }


def summary(label: str, samples: list[float]) -> str:
    f = figures(samples)
    return (
        f"{label}: p50 {f['p50'] * 1000:.2f} ms, p99 {f['p99'] * 1000:.2f} ms, "
        f"max {f['max'] * 1000:.2f} ms ({f['samples']} samples)"
    )


async def measure(args: argparse.Namespace, url_a: str, url_b: str) -> dict[str, list[float]]:
    per_instance = args.clients // 2
    receivers = {
        name: [Receiver(await connect(url, max_queue=None)) for _ in range(per_instance)]
        for name, url in (("A", url_a), ("B", url_b))
    }
    # The driver reads too: a client that never reads stalls its connection.
    driver = Receiver(await connect(url_a, max_queue=None))
    everyone = [r for group in receivers.values() for r in group]
    readers = [asyncio.create_task(r.read()) for r in [driver, *everyone]]

    async def until(reached: Callable[[int], bool]) -> None:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await asyncio.gather(*(r.until(reached) for r in everyone))

    # Everyone has the starting value: the last of the connect sequence.
    await until(lambda value: True)
    first = everyone[0].seen[-1][0]
    await until(lambda value: value == first)

    loop = asyncio.get_running_loop()
    count = int(args.rate * args.seconds)
    sent: list[float] = []
    start = loop.time()
    for index in range(count):
        # Keep a fixed schedule: a late send does not push the next ones back.
        delay = start + index / args.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(time.perf_counter())
        await driver.websocket.send('{"action": "plus"}')

    await until(lambda value: value == first + count)
    for receiver in [driver, *everyone]:
        await receiver.websocket.close()
    await asyncio.gather(*readers, return_exceptions=True)

    warmup = int(args.rate * args.warmup)
    results: dict[str, list[float]] = {}
    for name, group in receivers.items():
        per_client = [latencies(r, first, sent)[warmup:] for r in group]
        results[name] = [sample for client in per_client for sample in client]
        results[f"{name} slowest"] = [max(column) for column in zip(*per_client, strict=True)]
    return results


def start_instance(*options: str) -> ServerProcess:
    """Start ``server.py`` on a free port with the rate limit off."""
    # The bench's clients all come from 127.0.0.1: lift the per-address caps,
    # as the rate limit, which this bench does not measure.
    caps = ("--max-users-per-ip", "20000", "--max-pending-per-ip", "20000")
    return ServerProcess("--rate", "0", *caps, *options, timeout=START_TIMEOUT)


def run(args: argparse.Namespace, binary: str) -> dict[str, list[float]]:
    """Two instances sharing one Redis; and, with --baseline, one instance alone."""
    redis = RedisServer(binary)
    redis.start()
    instances: list[ServerProcess] = []
    try:
        for _ in ("A", "B"):
            instances.append(start_instance("--redis", redis.url))
        results = asyncio.run(measure(args, *(instance.url for instance in instances)))
    finally:
        for instance in instances:
            instance.stop()
        redis.stop()
    if args.baseline:
        alone_instance = start_instance()
        try:
            alone = asyncio.run(measure(args, alone_instance.url, alone_instance.url))
        finally:
            alone_instance.stop()
        results["alone"] = alone["A"] + alone["B"]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        "python -m bench.redis_latency",
        "Cross-instance update latency of server.py --redis.",
        FLAGS,
        argv,
    )
    if (binary := installed("redis_latency", args.redis_server)) is None:
        return 1
    results = run(args, binary)
    print(
        f"{args.clients} clients ({args.clients // 2} on A, {args.clients // 2} on B), "
        f"driver on A at {args.rate:g} actions/s for {args.seconds:g} s "
        f"(first {args.warmup:g} s left out)"
    )
    print(summary("cross-instance, each client on B", results["B"]))
    print(summary("cross-instance, last client on B", results["B slowest"]))
    print(summary("same instance,  each client on A", results["A"]))
    if "alone" in results:
        print(summary("baseline: one in-memory instance, every client", results["alone"]))
    if args.json:
        write_json(args.json, {"args": vars(args), **{n: figures(s) for n, s in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
