"""The kernel floor: what delivering one small frame costs with nothing on top.

A plain Python loop calls non-blocking `socket.send()` once per connection
per round, with a 32-byte WebSocket text frame (the size of a state event),
on TCP_NODELAY sockets that another process keeps draining. The sender's CPU
time divided by the frames delivered is the cost no Python server can go
below: the syscall and the loopback TCP path. A server's steady-state CPU per
delivery is reported as a multiple of it.

The rounds are paced like the bench's steady phase (the same rate and
duration by default), because a loop that sends back to back keeps caches
warm in a way a server woken ten times a second does not.

Run alone: `python -m bench.floor --connections 1000 --rate 10 --duration 5`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import selectors
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from bench.loadgen import raise_fd_limit

__all__ = ["measure_floor", "state_frame"]


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


def measure_floor(
    *, connections: int, rate: float, duration: float, timeout: float = 60
) -> dict[str, Any]:
    """Send `rate * duration` rounds of one frame per connection; return the cost."""
    raise_fd_limit()
    rounds = max(1, round(rate * duration))
    # Five-digit values keep every frame the same 32 bytes.
    first_value = 10_000
    frame_size = len(state_frame(first_value))
    context = multiprocessing.get_context("spawn")
    with socket.create_server(("127.0.0.1", 0), backlog=connections) as listener:
        port = listener.getsockname()[1]
        parent, child = context.Pipe()
        receiver = context.Process(
            target=drain,
            args=(port, connections, rounds * connections * frame_size, child, timeout),
            daemon=True,
        )
        receiver.start()
        socks: list[socket.socket] = []
        try:
            socks.extend(listener.accept()[0] for _ in range(connections))
            if not parent.poll(timeout) or parent.recv() != "connected":
                raise RuntimeError("the floor's receiver did not connect")
            for sock in socks:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            would_block = 0
            cpu_start = time.process_time()
            start = time.monotonic()
            for i in range(rounds):
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
                frame = state_frame(first_value + i % 90_000)
                for sock in socks:
                    try:
                        sock.send(frame)
                    except BlockingIOError:
                        # Never seen at these rates; counted so it cannot hide.
                        would_block += 1
            cpu = time.process_time() - cpu_start
            received = parent.recv() if parent.poll(timeout) else 0
        finally:
            receiver.join(timeout)
            if receiver.is_alive():
                receiver.kill()
            for sock in socks:
                sock.close()
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Measure the CPU cost of a plain socket.send() per delivered frame.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=1000, help="receiving sockets")
    parser.add_argument("--rate", type=float, default=10.0, help="rounds per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of rounds")
    args = parser.parse_args()
    result = measure_floor(connections=args.connections, rate=args.rate, duration=args.duration)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
