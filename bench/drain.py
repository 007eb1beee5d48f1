"""Graceful drain, measured: ``python -m bench.drain``.

Starts ``server.py --drain-seconds N`` (default 4), connects C clients
(default 1,000, spread over source addresses 127.0.2.x so the per-address cap
holds at its default), sends SIGTERM, and records when each client was
closed and with which code, and when the server exited. The targets: no
one-second window holds more than 40% of the closes, every close is 1012
(service restart), and the process exits 0 within N + 2 s.

The clients live in this process; the server is its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.flags import Flag, parse, positive
from bench.proc import raise_fd_limit
from bench.reporting import RESULTS_DIR, Report, verdict, write_json
from counter_sync.config import MAX_PENDING_PER_IP, MAX_USERS_PER_IP
from testkit.processes import ServerProcess
from testkit.rawclient import connected_socket

__all__ = ["main"]

IN_FLIGHT = 100  # handshakes at a time
WINDOW_SHARE_TARGET = 0.40
EXIT_MARGIN = 2.0  # seconds after the drain within which the process must exit


FLAGS = (
    Flag("--clients", "connected clients", positive(int), 1000),
    Flag("--drain-seconds", "the server's flag", positive(float), 4.0),
    Flag("--output", "JSON results", Path, RESULTS_DIR / "drain.json"),
)


async def open_client(url: str, port: int, source: str) -> ClientConnection:
    sock = await connected_socket(port, source)
    return await connect(url, sock=sock, compression=None, ping_interval=None)


async def closed_at(client: ClientConnection) -> tuple[float, int | None]:
    """When the server closed this client (monotonic clock), and with which code."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in client:
            pass
    return time.monotonic(), client.close_code


async def measure(
    server: ServerProcess, clients: int
) -> tuple[float, list[tuple[float, int | None]]]:
    # Round robin over enough sources for the default per-address caps: no
    # address holds more than MAX_USERS_PER_IP clients, nor has more than
    # MAX_PENDING_PER_IP of a batch's handshakes in flight.
    addresses = max(-(-clients // MAX_USERS_PER_IP), -(-IN_FLIGHT // MAX_PENDING_PER_IP))
    sources = [f"127.0.2.{1 + index % addresses}" for index in range(clients)]
    connections = []
    for start in range(0, clients, IN_FLIGHT):
        batch = sources[start : start + IN_FLIGHT]
        connections += await asyncio.gather(
            *(open_client(server.url, server.port, source) for source in batch)
        )
    closes = [asyncio.ensure_future(closed_at(client)) for client in connections]
    await asyncio.sleep(0.5)  # every connect sequence read, the server idle
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*closes)
    return signalled, results


def report(
    seconds: float,
    signalled: float,
    results: list[tuple[float, int | None]],
    exited: float,
    code: int,
) -> Report:
    offsets = sorted(when - signalled for when, _ in results)
    windows: dict[int, int] = {}
    for offset in offsets:
        windows[int(offset)] = windows.get(int(offset), 0) + 1
    busiest = max(windows.values()) / len(offsets)
    codes = sorted({str(close_code) for _, close_code in results})
    exit_after = exited - signalled
    checks = {
        f"busiest one-second window <= {WINDOW_SHARE_TARGET:.0%} of closes": busiest
        <= WINDOW_SHARE_TARGET,
        "every close is 1012": codes == ["1012"],
        f"exit 0 within {seconds + EXIT_MARGIN:g} s": code == 0
        and exit_after <= seconds + EXIT_MARGIN,
    }
    print(f"{len(offsets)} clients, --drain-seconds {seconds:g}")
    print(
        "closes per second after SIGTERM: "
        + ", ".join(f"{w}s: {n}" for w, n in sorted(windows.items()))
    )
    print(f"first close {offsets[0]:.3f} s, last close {offsets[-1]:.3f} s after SIGTERM")
    print(f"busiest window: {busiest:.1%} of closes; close codes: {', '.join(codes)}")
    print(f"server exited with {code} after {exit_after:.3f} s")
    for check, passed in checks.items():
        print(f"  {verdict(passed)}  {check}")
    return {
        "clients": len(offsets),
        "drain_seconds": seconds,
        "closes_per_second": windows,
        "busiest_window_share": busiest,
        "close_codes": codes,
        "exit_code": code,
        "exit_after_seconds": exit_after,
        "checks": checks,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse("python -m bench.drain", __doc__.split("\n\n")[0], FLAGS, argv)
    raise_fd_limit()
    server = ServerProcess("--rate", "0", "--drain-seconds", str(args.drain_seconds))
    try:
        signalled, results = asyncio.run(measure(server, args.clients))
        code = server.process.wait(args.drain_seconds + 10)
        exited = time.monotonic()
    finally:
        server.kill()
    result = report(args.drain_seconds, signalled, results, exited, code)
    write_json(args.output, result)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
