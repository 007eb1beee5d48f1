"""An instance killed mid-run in shared mode: ``python -m bench.failover``.

Each run starts a fresh ``redis-server`` and 3 ``server.py --redis URL
--rate 0`` instances, then 30 session clients (:class:`counter_sync.client.Client`,
given every instance's URL, client i starting on instance i mod 3) send 100
``plus`` each to one room, 10 at a time: a client sends 10 and waits for their
acks before the next 10. Once about a third of all the ops are acked, the first
instance is killed with SIGKILL right after one of its clients has written its
next 10, so ops are in flight; its clients reconnect to the others and send
again what was not acked.

A run passes when the kill came mid-run, every client ends on exactly
clients x ops (3,000), no action was rejected, and no client was ever sent a
state older than one it had (``Client.stale_states``). Per run it reports what
the kill caught (clients on the instance, ops in flight, ops the store never
got and only the resend counted) and how long the rest took: until the killed
instance's ops in flight were acked, and until every client had every ack and
the final value.

The clients live in this process; Redis and the instances are processes of
their own. Every wait is bounded (``--timeout`` per run).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from websockets.asyncio.client import ClientConnection

from bench.flags import Flag, installed, parse, positive
from bench.reporting import RESULTS_DIR, Report, environment, fmt, loadavg, table, write_json
from counter_sync.client import MAX_PENDING, Client
from testkit.processes import RedisServer, ServerProcess

__all__ = ["main"]

ROOM = "failover"
START_TIMEOUT = 10.0  # seconds for redis-server or an instance to be ready
STOP_TIMEOUT = 5.0  # seconds for a surviving instance to exit on SIGTERM
# Seconds for the final state to reach every client once every op is acked:
# it was broadcast by then, so a client still short of it shows a wrong count.
FINAL_STATE_WAIT = 5.0


def whole(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `least` to `most` (no upper bound if None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least or (most is not None and value > most):
            within = f"at least {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"{text} must be {within}")
        return value

    return convert


def share(text: str) -> float:
    """An argparse type: a share strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return value


FLAGS = (
    Flag("--runs", "runs, each with a fresh Redis and fresh instances", positive(int), 5),
    Flag("--instances", "server.py instances sharing one Redis", whole(2), 3),
    Flag("--clients", "session clients, spread over the instances", positive(int), 30),
    Flag("--ops", "plus actions each client sends", positive(int), 100),
    # A client keeps at most MAX_PENDING actions waiting for their acks.
    Flag("--chunk", "ops a client sends, then waits for their acks", whole(1, MAX_PENDING), 10),
    Flag("--kill-at", "share of all ops acked when the first instance is killed", share, 0.33),
    Flag("--timeout", "seconds one run may take, start-up included", positive(float), 60.0),
    Flag("--redis-server", "the binary to run", str, "redis-server"),
    Flag("--output", "JSON results", Path, RESULTS_DIR / "failover.json"),
    Flag("--log-dir", "the instances' logs", Path, RESULTS_DIR / "failover-logs"),
)


class Counting(Client):
    """A client that counts the ops it had to send again after the kill.

    :meth:`Client.resend` runs once per connection, after the server's first
    ack has removed what the store holds as done. An op sent before the kill
    and still there was never committed: the killed instance lost it, and
    only the resend counts it.
    """

    sent_at_kill = 0  # the last op sent when the instance was killed (0: not caught)
    resent = 0

    async def resend(self, websocket: ClientConnection) -> None:
        self.resent += sum(op <= self.sent_at_kill for op in self.unacked)
        await super().resend(websocket)


def acked(client: Client) -> int:
    """Ops of `client` the server acknowledged (or rejected): all but the pending ones."""
    return client.next_op - 1 - client.pending


def has_acked(client: Client, op: int) -> Callable[[], bool]:
    """A condition for :meth:`Client.wait`: every op of `client` up to `op` is acked."""
    return lambda: acked(client) >= op


def shows(client: Client, value: int) -> Callable[[], bool]:
    """A condition for :meth:`Client.wait`: `client` shows `value`."""
    return lambda: client.value == value


def on_port(client: Client, port: int) -> bool:
    """Whether `client` is connected, now, to the instance listening on `port`."""
    websocket = client.websocket
    return websocket is not None and websocket.remote_address[1] == port


class Run:
    """One run's clients, the kill, and what the clients saw until the last ack.

    The kill comes once ``--kill-at`` of all ops are acked, right after one
    of the victim's clients has written a chunk: its ops are then in the
    victim's socket or on their way to Redis, not acked.
    """

    def __init__(self, urls: list[str], victim: ServerProcess, args: argparse.Namespace) -> None:
        self.args = args
        self.victim = victim
        self.total = args.clients * args.ops
        count = len(urls)
        # Client i starts on instance i mod count and, when it goes, tries the next.
        self.clients = [
            Counting(urls[i % count :] + urls[: i % count]) for i in range(args.clients)
        ]
        self.threshold = math.ceil(self.total * args.kill_at)
        self.armed = False  # the threshold is acked: the next chunk on the victim kills it
        self.killed = asyncio.Event()
        self.killed_at = 0.0
        self.kill: Report = {}
        self.caught: list[Counting] = []
        self.done_at: list[float] = []  # when each client had every ack

    def acked(self) -> int:
        return sum(acked(client) for client in self.clients)

    async def play(self, client: Counting) -> None:
        """Send the ops a chunk at a time, each chunk acked before the next."""
        loop = asyncio.get_running_loop()
        for start in range(0, self.args.ops, self.args.chunk):
            for _ in range(min(self.args.chunk, self.args.ops - start)):
                await client.plus()
            if self.armed and not self.killed.is_set() and on_port(client, self.victim.port):
                self.kill_victim()
            await client.settled()
            self.armed = self.armed or self.acked() >= self.threshold
        self.done_at.append(loop.time())

    def kill_victim(self) -> None:
        """SIGKILL the victim; first note who it holds and what is in flight.

        Synchronous: nothing moves between the reading and the kill.
        """
        self.caught = [c for c in self.clients if on_port(c, self.victim.port)]
        for client in self.caught:
            client.sent_at_kill = client.next_op - 1
        self.kill = {
            "acked_at_kill": self.acked(),
            "clients_on_killed": len(self.caught),
            "in_flight_at_kill": sum(c.pending for c in self.clients),
            "in_flight_on_killed": sum(c.pending for c in self.caught),
        }
        self.victim.process.kill()
        self.killed_at = asyncio.get_running_loop().time()
        self.killed.set()

    async def recovery(self) -> float:
        """Seconds from the kill until the victim's clients had every op of before it acked."""
        await self.killed.wait()
        caught = self.caught
        await asyncio.gather(*(c.wait(has_acked(c, c.sent_at_kill)) for c in caught))
        return asyncio.get_running_loop().time() - self.killed_at

    async def run(self) -> Report:
        """Every client plays; the kill comes midway. Bounded by the caller."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(client.__aenter__() for client in self.clients))
        try:
            started = loop.time()
            recovering = asyncio.ensure_future(self.recovery())
            await asyncio.gather(*(self.play(client) for client in self.clients))
            if not self.killed.is_set():  # too late: the run fails on acked_at_kill
                self.kill_victim()
            recovered = await recovering
            try:
                async with asyncio.timeout(FINAL_STATE_WAIT):
                    for client in self.clients:
                        await client.wait(shows(client, self.total))
            except TimeoutError:
                pass  # reported below: some client is not on the exact value
            settled_at = max([*self.done_at, loop.time()])
        finally:
            await asyncio.gather(*(client.close() for client in self.clients))
        clients = self.clients
        return {
            **self.kill,
            "lost_and_resent": sum(client.resent for client in clients),
            "recovered_seconds": recovered,
            "settled_seconds": settled_at - self.killed_at,
            "run_seconds": settled_at - started,
            "values": sorted({client.value for client in clients}, key=lambda v: v or 0),
            "exact": sum(client.value == self.total for client in clients),
            "reconnections": sum(client.connections for client in clients) - len(clients),
            "rejected": sum(len(client.rejected) for client in clients),
            "stale_states": sum(client.stale_states for client in clients),
            "epochs": len({client.epoch for client in clients}),
        }


def start_instances(args: argparse.Namespace, redis: RedisServer, run: int) -> list[ServerProcess]:
    """The instances of one run; their logs under ``--log-dir``."""
    # Every client comes from 127.0.0.1: the per-address caps are lifted, as
    # the rate limit, which this bench does not measure.
    options = ("--redis", redis.url, "--rate", "0")
    caps = ("--max-users-per-ip", "20000", "--max-pending-per-ip", "20000")
    instances: list[ServerProcess] = []
    try:
        for index in range(args.instances):
            log = args.log_dir / f"run{run}-instance{index}.log"
            instances.append(ServerProcess(*options, *caps, timeout=START_TIMEOUT, log_path=log))
    except BaseException:
        stop_all(instances)
        raise
    return instances


def stop_all(instances: list[ServerProcess]) -> None:
    """SIGTERM every instance still running (SIGKILL after STOP_TIMEOUT); reap the killed."""
    for instance in instances:
        try:
            instance.stop(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            instance.kill()


def one_run(args: argparse.Namespace, binary: str, run: int) -> Report:
    """A fresh Redis and instances, the clients, the kill; a failure is recorded, not raised."""
    redis = RedisServer(binary)
    instances: list[ServerProcess] = []
    started = time.monotonic()
    result: Report = {"run": run}
    try:
        redis.start()
        instances = start_instances(args, redis, run)
        urls = [f"{instance.url}c/{ROOM}" for instance in instances]
        remaining = args.timeout - (time.monotonic() - started)

        async def bounded() -> Report:
            async with asyncio.timeout(remaining):
                return await Run(urls, instances[0], args).run()

        result |= asyncio.run(bounded())
    except TimeoutError:
        result["error"] = f"timed out after {args.timeout:g} s"
    except (RuntimeError, OSError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_all(instances)
        redis.stop()
    result["problems"] = problems(result, args)
    result["passed"] = not result["problems"]
    return result


def problems(result: Report, args: argparse.Namespace) -> list[str]:
    """Why a run failed, one phrase each; none when it passed."""
    if "error" in result:
        return [short(result["error"])]
    total = args.clients * args.ops
    checks = [
        (result["acked_at_kill"] < total, "the kill came after the last ack"),
        (
            result["exact"] == args.clients,
            f"{args.clients - result['exact']} clients not on {total:,}",
        ),
        (result["rejected"] == 0, f"{result['rejected']} actions rejected"),
        (result["stale_states"] == 0, f"{result['stale_states']} older states shown"),
        (result["epochs"] == 1, f"{result['epochs']} epochs"),
    ]
    return [why for holds, why in checks if not holds]


def short(error: str) -> str:
    """An error on one line: its first and last (a child's log ends with its traceback's)."""
    lines = error.strip().splitlines() or [""]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def row(result: Report, total: int) -> list[str] | str:
    if "error" in result:  # a line of its own
        return f"{result['run']}  FAIL: {short(result['error'])}"
    values = result["values"]
    final = fmt(values[0]) if len(values) == 1 else "/".join(fmt(v) for v in values)
    return [
        str(result["run"]),
        final,
        fmt(result["clients_on_killed"]),
        f"{fmt(result['in_flight_at_kill'])} ({fmt(result['in_flight_on_killed'])})",
        fmt(result["lost_and_resent"]),
        f"{fmt(result['acked_at_kill'])} of {fmt(total)}",
        fmt(result["recovered_seconds"]),
        fmt(result["settled_seconds"]),
        fmt(result["reconnections"]),
        fmt(result["rejected"]),
        fmt(result["stale_states"]),
        "PASS" if result["passed"] else "FAIL",
    ]


def render(results: list[Report], args: argparse.Namespace) -> tuple[str, str]:
    """The table of runs and the verdict line."""
    total = args.clients * args.ops
    header = [
        "run",
        "final value",
        "on killed",
        "in flight (killed's)",
        "lost, resent",
        "acked at kill",
        "kill->recovered (s)",
        "kill->settled (s)",
        "reconnects",
        "rejected",
        "stale",
        "",
    ]
    lines = table(
        [header, *(row(result, total) for result in results)],
        align="<>>>>>>>>>><",
        rule_after=1,
    )
    failed = [result for result in results if not result["passed"]]
    for result in failed:
        if "error" not in result:  # an error is on its row already
            lines += f"\nrun {result['run']}: {'; '.join(result['problems'])}"
    if failed:
        runs = ", ".join(str(result["run"]) for result in failed)
        verdict = f"FAIL: {len(failed)} of {len(results)} runs failed (run {runs})"
    else:
        verdict = (
            f"PASS: {len(results)} of {len(results)} runs ended on exactly {total:,} on every "
            "client, no action rejected, no older state shown"
        )
    return lines, verdict


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        "python -m bench.failover",
        "Kill one of several --redis instances mid-run; every session client must end exact.",
        FLAGS,
        argv,
    )
    if (binary := installed("failover", args.redis_server)) is None:
        return 1
    report: Report = {"settings": vars(args), "environment": environment(), "runs": []}
    print(
        f"{args.runs} runs: {args.instances} instances on one Redis, {args.clients} session "
        f"clients x {args.ops} plus ({args.chunk} at a time), the first instance killed "
        f"(SIGKILL) at {args.kill_at:.0%} acked",
        file=sys.stderr,
    )
    for run in range(1, args.runs + 1):
        result = one_run(args, binary, run)
        report["runs"].append(result)
        write_json(args.output, report)
        status = "passed" if result["passed"] else f"FAILED: {'; '.join(result['problems'])}"
        print(f"  run {run}: {status}", file=sys.stderr, flush=True)
    report["environment"]["loadavg_after"] = loadavg()
    lines, verdict = render(report["runs"], args)
    report["verdict"] = verdict
    write_json(args.output, report)
    print(lines)
    print(
        "\nin flight: ops sent and not acked at the kill, all clients (the killed instance's);"
        "\nlost, resent: of those, ops the store did not hold as done when their client"
        " reconnected;"
        "\nrecovered: until the killed instance's clients had those acked;"
        "\nsettled: until every client had every ack and the final value"
    )
    print(f"\n{verdict}")
    print(f"results written to {args.output}")
    return 0 if all(result["passed"] for result in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
