"""The steady floor: the steady phase's fan-out as a plain ``socket.send()`` loop.

A loopback ``send()`` costs what the receiving side makes it cost (how often
the receiver must be woken, how fast it reads), so the floor of the steady
phase must send to the very receivers a server under test sends to. This
module is a minimal WebSocket server, in a process of its own, that the
bench's listener workers (:mod:`bench.listeners`) connect to exactly as they
connect to a server: the same N listeners, the same processes, the same
source and server addresses. It answers each opening handshake with a
``101 Switching Protocols`` (``Sec-WebSocket-Accept`` included: picows checks
it) and then the first messages counter-sync sends, the users count and the
state. Its listening socket has counter-sync's kernel buffer caps and
backlog, its connections TCP_NODELAY, as asyncio sets on counter-sync's.

Then, paced like the steady phase (one round per action, the same rate and
count), each round builds one state frame with counter-sync's own
serializers, the bytes counter-sync would write for that value, and a plain
Python loop calls non-blocking ``socket.send()`` with it on every
connection. The listeners parse and time these frames as they do the
server's. The figure is the process's CPU over the rounds, read from /proc as
the bench reads a server's, divided by the frames the listeners received.

Run alone: ``python -m bench.steady_floor --listeners 1000 --rate 10 --duration 5``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import multiprocessing
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Self

from bench.flags import Flag, loopback, parse, positive
from bench.loadgen import LoadGen, Usage
from bench.proc import raise_fd_limit, wait_idle
from bench.reporting import Report, fmt, say, spread_ms
from counter_sync.config import LISTEN_BACKLOG, SOCKET_RECEIVE_BUFFER, SOCKET_SEND_BUFFER
from counter_sync.counter import state_event, users_event
from counter_sync.fanout import text_frame
from counter_sync.store import RoomState, new_epoch

__all__ = [
    "NAME",
    "FloorServer",
    "accept_key",
    "measure_steady_floor",
    "opening_response",
    "steady_floor_line",
]

# Its key among the servers a run measures, in the order they run.
NAME = "steady-floor"
# RFC 6455's GUID, appended to the client's key for Sec-WebSocket-Accept.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# An opening handshake longer than this is not from the bench's listeners.
MAX_REQUEST = 8192


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept answering the client's Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()


def opening_response(request: bytes) -> bytes | None:
    """The 101 response to a complete opening handshake; None without a Sec-WebSocket-Key.

    ``request`` is the HTTP request up to its blank line. Only the key is
    read: the listeners are the bench's own, and what they send is known.
    """
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return (
                b"HTTP/1.1 101 Switching Protocols\r\n"
                b"Upgrade: websocket\r\n"
                b"Connection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(value.strip().decode()).encode() + b"\r\n"
                b"\r\n"
            )
    return None


def listening_socket(host: str) -> socket.socket:
    """A listening socket on a free port with counter-sync's buffer caps and backlog.

    The caps go on before ``listen()``, as counter-sync puts them, so every
    accepted connection inherits them (``counter_sync.fanout.cap_socket_buffers``).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RECEIVE_BUFFER)
        sock.bind((host, 0))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Floor:
    """Inside the floor's process: upgrade connections; send rounds when told."""

    def __init__(self, listener: socket.socket, control: Connection, welcome_value: int) -> None:
        self.listener = listener
        self.control = control
        self.welcome_value = welcome_value
        self.epoch = new_epoch()
        self.clients: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()

    def run(self) -> None:
        """Serve handshakes and commands until told to stop or the parent goes away."""
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.control, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.fileobj is self.listener:
                        self.accept()
                    elif key.fileobj is self.control:
                        try:
                            command, kwargs = self.control.recv()
                        except EOFError:
                            return
                        if command == "stop":
                            return
                        self.control.send(self.send_rounds(**kwargs))
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self.handshake(key.fileobj, key.data)
        finally:
            for key in list(self.selector.get_map().values()):
                if isinstance(key.fileobj, socket.socket):
                    key.fileobj.close()
            for sock in self.clients:
                sock.close()
            self.selector.close()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(sock, selectors.EVENT_READ, bytearray())

    def handshake(self, sock: socket.socket, request: bytearray) -> None:
        """Read the opening handshake; once whole, answer it and send the first messages."""
        try:
            data = sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        request += data
        end = request.find(b"\r\n\r\n")
        if end < 0 and data and len(request) < MAX_REQUEST:
            return
        self.selector.unregister(sock)
        response = opening_response(bytes(request[:end])) if end >= 0 else None
        if response is None:
            sock.close()
            return
        self.clients.append(sock)
        # What counter-sync sends a newcomer first: the users count, then the state.
        state = RoomState(self.welcome_value, 0, self.epoch)
        first = text_frame(users_event(len(self.clients))) + text_frame(state_event(state))
        try:
            sock.sendall(response + first)  # a few hundred bytes into an empty buffer
        except OSError:
            self.clients.remove(sock)
            sock.close()

    def send_rounds(self, rounds: int, rate: float) -> Report:
        """``rounds`` rounds at ``rate`` a second, each one state frame to every connection.

        Round i sends the value ``welcome_value + i + 1``, as the steady
        phase's i-th action makes, at seq ``i + 1``. Returns each round's
        (value, when it began), for the listeners' delays, the frames' mean
        size, and how often a send would have blocked or failed (counted so
        that neither can hide).
        """
        sends: list[tuple[int, float]] = []
        would_block = failed = frame_bytes = 0
        start = time.monotonic()
        for i in range(rounds):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            value = self.welcome_value + i + 1
            # seq counts commits, one per round, as counter-sync's counts its
            # flushes (a few for the coalesced burst): the same digits.
            frame = text_frame(state_event(RoomState(value, i + 1, self.epoch)))
            frame_bytes += len(frame)
            sends.append((value, time.monotonic()))
            for sock in self.clients:
                try:
                    sock.send(frame)
                except BlockingIOError:
                    would_block += 1
                except OSError:
                    failed += 1
        return {
            "sends": sends,
            "connections": len(self.clients),
            "frame_bytes": frame_bytes / rounds,
            "would_block": would_block,
            "failed": failed,
        }


def serve(host: str, welcome_value: int, control: Connection) -> None:
    """The floor process's entry point: tell the parent the port, then serve."""
    raise_fd_limit()
    listener = listening_socket(host)
    control.send(listener.getsockname()[1])
    _Floor(listener, control, welcome_value).run()


class FloorServer:
    """The floor's process, started and stopped by the bench; a context manager.

    ``url`` is where the listeners connect, ``pid`` the process whose CPU
    is the floor's. Every wait is bounded by ``timeout``: a floor that does
    not answer raises :exc:`RuntimeError`.
    """

    def __init__(self, host: str, *, welcome_value: int, timeout: float) -> None:
        self.host, self.timeout = host, timeout
        context = multiprocessing.get_context("spawn")
        self.parent, child = context.Pipe()
        self.process = context.Process(
            target=serve, args=(host, welcome_value, child), daemon=True, name=NAME
        )
        self.url = ""
        self.pid = 0

    def __enter__(self) -> Self:
        self.process.start()
        try:
            port = self.reply(self.timeout)
        except BaseException:
            self.__exit__()
            raise
        assert self.process.pid is not None
        self.url, self.pid = f"ws://{self.host}:{port}/", self.process.pid
        return self

    def reply(self, limit: float) -> object:
        if not self.parent.poll(limit):
            raise RuntimeError(f"the steady floor did not answer within {limit:g} s")
        try:
            return self.parent.recv()
        except EOFError:
            raise RuntimeError("the steady floor's process died") from None

    def rounds(self, rounds: int, rate: float) -> Report:
        """Send the rounds (see ``_Floor.send_rounds``) and return what the floor reports."""
        self.parent.send(("rounds", {"rounds": rounds, "rate": rate}))
        reply = self.reply(rounds / rate + self.timeout)
        assert isinstance(reply, dict)
        return reply

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.parent.send(("stop", {}))
        self.process.join(self.timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.parent.close()


def measure_steady_floor(
    load: LoadGen,
    *,
    host: str,
    listeners: int,
    rounds: int,
    rate: float,
    welcome_value: int,
    timeout: float,
) -> Report:
    """The steady phase's fan-out as a ``send()`` loop, to `listeners` of `load`'s workers.

    They connect as they do to a server and get the state ``welcome_value``
    first; then ``rounds`` rounds at ``rate`` a second. CPU and the listeners'
    delays are taken as :func:`bench.measure.phase_steady` takes them. Raises
    :exc:`RuntimeError` if a listener could not connect or got no first state.
    """
    with FloorServer(host, welcome_value=welcome_value, timeout=timeout) as floor:
        try:
            join = load.join_storm(floor.url, listeners, timeout, protocol=False)
            if join.connected < listeners:
                raise RuntimeError(
                    f"steady floor: {join.connected} of {listeners} listeners connected: "
                    f"{'; '.join(join.errors)}"
                )
            load.expect(value=welcome_value)
            if (welcomed := load.wait("value", timeout)).reached < listeners:
                raise RuntimeError(
                    f"steady floor: {welcomed.reached} of {listeners} listeners got a first state"
                )
            wait_idle(floor.pid, timeout=timeout)
            usage = Usage(floor, load)
            load.expect(value=welcome_value + rounds, record=True)
            sent = floor.rounds(rounds, rate)
            progress = load.wait("value", timeout)
            wait_idle(floor.pid, timeout=timeout)
            used = usage.stop()
            delays, missing = load.delays(sent["sends"], timeout)
        finally:
            load.reset()
    cpu = used["server_cpu_seconds"]
    return {
        "listeners": listeners,
        "connections": sent["connections"],
        "rounds": rounds,
        "rate": rate,
        "frame_bytes": sent["frame_bytes"],
        "payload_bytes_per_frame": progress.payload_bytes_per_frame,
        "sent": rounds * sent["connections"],
        "would_block": sent["would_block"],
        "failed": sent["failed"],
        "delivered": progress.frames,
        "converged": progress.reached == listeners and missing == 0,
        "missing": missing,
        **spread_ms(delays),
        "mean_ms": statistics.fmean(delays) * 1e3 if delays else None,
        "error_events": progress.errors,
        **used,
        "cpu_us_per_delivery": cpu / progress.frames * 1e6 if progress.frames else None,
    }


def steady_floor_line(floor: Report) -> str:
    """The steady floor's figure in one sentence, for a report."""
    if "errors" in floor:
        return f"steady floor: failed ({'; '.join(floor['errors'])})"
    return (
        f"steady floor, send() loop to the bench's listeners: "
        f"{fmt(floor['cpu_us_per_delivery'])} us CPU per delivered "
        f"{fmt(floor['frame_bytes'])}-byte frame ({fmt(floor['delivered'])} of "
        f"{fmt(floor['sent'])} over {fmt(floor['connections'])} connections, "
        f"{floor['rate']:g} rounds/s; delay p50/p99 {fmt(floor['p50_ms'])}/"
        f"{fmt(floor['p99_ms'])} ms)"
    )


FLAGS = (
    Flag("--listeners", "listening clients", positive(int), 1000, short="-n"),
    Flag("--rate", "rounds per second", positive(float), 10.0),
    Flag("--duration", "seconds of rounds", positive(float), 5.0),
    Flag("--welcome-value", "value the listeners get first; round i sends it + i + 1", int, 500),
    Flag("--workers", "load generator processes for the listeners", positive(int), 2),
    Flag("--host", "loopback address the floor listens on", loopback, "127.0.0.1"),
    Flag("--timeout", "seconds any wait may take", positive(float), 60.0),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        "python -m bench.steady_floor",
        "Measure the CPU of a plain send() loop per frame delivered to the bench's listeners.",
        FLAGS,
        argv,
    )
    raise_fd_limit()
    say(f"steady floor: {args.listeners} listeners, {args.rate:g} rounds/s")
    with LoadGen(workers=args.workers, host=args.host) as load:
        result = measure_steady_floor(
            load,
            host=args.host,
            listeners=args.listeners,
            rounds=max(1, round(args.rate * args.duration)),
            rate=args.rate,
            welcome_value=args.welcome_value,
            timeout=args.timeout,
        )
    print(json.dumps(result, indent=2))
    print(steady_floor_line(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
