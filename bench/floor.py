"""The drain floor: one small frame per socket, sent by a plain loop, read by a selectors process.

A plain Python loop calls non-blocking `socket.send()` once per connection
per round, with a 32-byte WebSocket text frame (a state event without
``seq`` and ``epoch``), on TCP_NODELAY sockets that another process drains
with ``selectors`` and ``recv()``. The sender's CPU time divided by the
frames delivered is the cost of the syscall and the loopback TCP path.

What a loopback ``send()`` costs depends on its receiver (how often it must
be woken, how fast it reads), and this one's is not the bench's listeners:
the steady phase's floor is :mod:`bench.steady_floor`, a ``send()`` loop to
the same listeners the servers send to. ``python -m bench`` shows this one
beside it for reference; ``python -m bench.rooms`` reports it with its rooms
floor (:mod:`bench.rooms.floor`, which builds its frames here).

The rounds are paced like the bench's steady phase (the same rate and
duration by default), because a loop that sends back to back keeps caches
warm in a way a server woken ten times a second does not.

Run alone: `python -m bench.floor --connections 1000 --rate 10 --duration 5`.
"""

from __future__ import annotations

import json
import multiprocessing
import selectors
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Self

from bench.flags import Flag, parse, positive
from bench.proc import raise_fd_limit
from bench.reporting import Report, fmt

__all__ = ["FIRST_VALUE", "floor_line", "measure_floor", "state_frame"]

# Five-digit values keep every frame the same 32 bytes.
FIRST_VALUE = 10_000


def state_frame(value: int) -> bytes:
    """A server-to-client text frame (unmasked) holding a state event."""
    payload = json.dumps({"type": "state", "value": value}, separators=(",", ":")).encode()
    assert len(payload) < 126, "a one-byte length keeps the frame as small as the servers'"
    return bytes([0x81, len(payload)]) + payload


def drain(port: int, connections: int, expected: int, conn: Connection, timeout: float) -> None:
    """Receiver process: connect, then read everything until `expected` bytes."""
    raise_fd_limit()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    conn.send("connected")
    received = 0
    deadline = time.monotonic() + timeout
    while received < expected and time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                data = ready.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(ready)
            received += len(data)
    conn.send(received)
    for sock in socks:
        sock.close()


class DrainedSockets:
    """Loopback sockets whose bytes a :func:`drain` process reads; a context manager.

    ``socks`` are non-blocking and TCP_NODELAY; :meth:`received` waits for
    the drain's count of bytes (``expected`` of them, or what came by ``timeout``).
    """

    def __init__(self, connections: int, expected: int, timeout: float) -> None:
        self.connections, self.expected, self.timeout = connections, expected, timeout
        self.socks: list[socket.socket] = []
        context = multiprocessing.get_context("spawn")
        self.parent, self.child = context.Pipe()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
        args = (self.listener.getsockname()[1], connections, expected, self.child, timeout)
        self.receiver = context.Process(target=drain, args=args, daemon=True)

    def __enter__(self) -> Self:
        self.receiver.start()
        try:
            self.socks.extend(self.listener.accept()[0] for _ in range(self.connections))
            if not self.parent.poll(self.timeout) or self.parent.recv() != "connected":
                raise RuntimeError("the floor's receiver did not connect")
            for sock in self.socks:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def received(self) -> int:
        return int(self.parent.recv()) if self.parent.poll(self.timeout) else 0

    def __exit__(self, *exc: object) -> None:
        self.receiver.join(self.timeout)
        if self.receiver.is_alive():
            self.receiver.kill()
        for sock in [*self.socks, self.listener]:
            sock.close()


def send_rounds(socks: Sequence[socket.socket], rounds: int, rate: float) -> int:
    """``rounds`` rounds at ``rate`` a second, each one frame to every socket.

    Returns how often a send would have blocked (never seen at these rates;
    counted so that it cannot hide).
    """
    would_block = 0
    start = time.monotonic()
    for i in range(rounds):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        frame = state_frame(FIRST_VALUE + i % 90_000)
        for sock in socks:
            try:
                sock.send(frame)
            except BlockingIOError:
                would_block += 1
    return would_block


def measure_floor(*, connections: int, rate: float, duration: float, timeout: float = 60) -> Report:
    """Send ``rate * duration`` rounds of one frame per connection; return the cost."""
    raise_fd_limit()
    rounds = max(1, round(rate * duration))
    frame_size = len(state_frame(FIRST_VALUE))
    expected = rounds * connections * frame_size
    with DrainedSockets(connections, expected, timeout) as floor:
        cpu_start = time.process_time()
        would_block = send_rounds(floor.socks, rounds, rate)
        cpu = time.process_time() - cpu_start
        received = floor.received()
    messages = rounds * connections
    return {
        "connections": connections,
        "rounds": rounds,
        "rate": rate,
        "frame_bytes": frame_size,
        "messages": messages,
        "delivered": received // frame_size,
        "would_block": would_block,
        "cpu_seconds": cpu,
        "cpu_us_per_message": cpu / messages * 1e6,
    }


def floor_line(floor: Report) -> str:
    """The floor's figure in one sentence, for a report."""
    return (
        f"drain floor, send() loop to a selectors reader: "
        f"{floor['cpu_us_per_message']:.2f} us CPU per delivered "
        f"{floor['frame_bytes']}-byte frame ({fmt(floor['delivered'])} of "
        f"{fmt(floor['messages'])} over {fmt(floor['connections'])} sockets, "
        f"{floor['rate']:g} rounds/s)"
    )


FLAGS = (
    Flag("--connections", "receiving sockets", positive(int), 1000),
    Flag("--rate", "rounds per second", positive(float), 10.0),
    Flag("--duration", "seconds of rounds", positive(float), 5.0),
)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(
        "python -m bench.floor",
        "Measure the CPU cost of a plain socket.send() per delivered frame.",
        FLAGS,
        argv,
    )
    result = measure_floor(connections=args.connections, rate=args.rate, duration=args.duration)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
