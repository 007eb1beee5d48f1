"""The fan-out phase's floor: the least a server can do for that work, in one epoll loop.

One ``selectors`` loop (epoll) in the measuring process holds a socket for
each room's actor and ``per_room`` sockets for each room's listeners. For
each readable actor it reads the action and sends one 32-byte state frame
to each of the room's listener sockets, and nothing else: no parsing, no
event loop, no framing library, no bookkeeping beyond the room's value. A
separate process (:func:`pace`) connects every socket, sends each room's
actions at the fan-out phase's moments (room i at i/rooms of each period,
``rate`` a second), as masked client frames, and drains the listeners.

The loop's CPU (process time, from just before the first action is due
until the last one is handled) over the frames the drain received is what
the kernel and the plainest Python cost for the phase's work: the read of
each action and the wake-up for it, as well as the writes. That is what
``floor.py``'s loop leaves out: it writes round after round, never woken by
a client.

Run alone: ``python -m bench.rooms.floor --rooms 1000 --per-room 10 --rate 1 --duration 10``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import selectors
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

from bench.flags import Flag, parse, positive
from bench.floor import FIRST_VALUE, state_frame
from bench.proc import kernel_share, raise_fd_limit
from bench.reporting import Report, fmt

__all__ = ["action_frame", "in_kernel", "measure_rooms_floor", "rooms_floor_line"]

# Seconds from the go to the first action: every socket is registered by then.
LEAD = 0.5


def action_frame(payload: bytes = b'{"action": "plus"}') -> bytes:
    """A client-to-server text frame (masked, as RFC 6455 requires of clients)."""
    assert len(payload) < 126, "a one-byte length"
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def pace(
    ports: tuple[int, int],
    rooms: int,
    per_room: int,
    rate: float,
    actions: int,
    conn: Connection,
    timeout: float,
) -> None:
    """The other process: connect, then send every action on time while draining the listeners.

    It connects the ``rooms`` actors to ``ports[0]`` and the listeners to
    ``ports[1]``, says "connected", waits for the start time, then sends
    room i's k-th action at start + i / rooms / rate + k / rate. It replies
    with the actions sent, the bytes received and the latest send's lateness.
    """
    raise_fd_limit()
    actors = [socket.create_connection(("127.0.0.1", ports[0])) for _ in range(rooms)]
    listeners = [socket.create_connection(("127.0.0.1", ports[1])) for _ in range(rooms * per_room)]
    selector = selectors.DefaultSelector()
    for sock in actors:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for sock in listeners:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    conn.send("connected")
    start = float(conn.recv())
    schedule = sorted(
        (start + room / rooms / rate + k / rate, room)
        for room in range(rooms)
        for k in range(actions)
    )
    frame = action_frame()
    expected = len(schedule) * per_room * len(state_frame(FIRST_VALUE))
    received = sent = 0
    late = 0.0
    deadline = start + actions / rate + timeout
    while (received < expected or sent < len(schedule)) and time.monotonic() < deadline:
        now = time.monotonic()
        while sent < len(schedule) and schedule[sent][0] <= now:
            due, room = schedule[sent]
            actors[room].sendall(frame)
            late = max(late, time.monotonic() - due)
            sent += 1
        wait = schedule[sent][0] - time.monotonic() if sent < len(schedule) else 0.1
        for key, _ in selector.select(max(0.0, wait)):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                received += len(ready.recv(65536))
            except BlockingIOError:
                continue
    conn.send({"sent": sent, "received": received, "late_max_ms": late * 1e3})
    for sock in [*actors, *listeners]:
        sock.close()


def accept_all(server: socket.socket, count: int) -> list[socket.socket]:
    """``count`` connections from ``server``, in the order they were made."""
    return [server.accept()[0] for _ in range(count)]


def measure_rooms_floor(
    *, rooms: int, per_room: int, rate: float, duration: float, timeout: float = 60
) -> Report:
    """``rate * duration`` actions per room through the epoll loop; its CPU per delivered frame."""
    raise_fd_limit()
    actions = max(1, round(rate * duration))
    frame_bytes = len(state_frame(FIRST_VALUE))
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    actor_server = socket.create_server(("127.0.0.1", 0), backlog=rooms)
    listener_server = socket.create_server(("127.0.0.1", 0), backlog=rooms * per_room)
    ports = (actor_server.getsockname()[1], listener_server.getsockname()[1])
    pacer = context.Process(
        target=pace, args=(ports, rooms, per_room, rate, actions, child, timeout), daemon=True
    )
    socks: list[socket.socket] = []
    try:
        pacer.start()
        for server in (actor_server, listener_server):
            server.settimeout(timeout)
        actors = accept_all(actor_server, rooms)
        listeners = accept_all(listener_server, rooms * per_room)
        socks = [*actors, *listeners]
        if not parent.poll(timeout) or parent.recv() != "connected":
            raise RuntimeError("the rooms floor's pacer did not connect")
        selector = selectors.DefaultSelector()
        for room, sock in enumerate(actors):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, room)
        for sock in listeners:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        groups = [listeners[i * per_room : (i + 1) * per_room] for i in range(rooms)]
        parent.send(time.monotonic() + LEAD)
        cpu_start, times_start = time.process_time(), os.times()
        handled, would_block = serve_rooms(
            selector, actors, groups, actions, LEAD + duration + timeout
        )
        cpu, times = time.process_time() - cpu_start, os.times()
        paced = parent.recv() if parent.poll(timeout) else {}
    finally:
        pacer.join(timeout)
        if pacer.is_alive():
            pacer.kill()
        for sock in [*socks, actor_server, listener_server]:
            sock.close()
    messages = rooms * actions * per_room
    return {
        "rooms": rooms,
        "per_room": per_room,
        "connections": rooms * (per_room + 1),
        "actions": rooms * actions,
        "rate": rate,
        "frame_bytes": frame_bytes,
        "actions_sent": paced.get("sent"),
        "actions_handled": handled,
        "late_max_ms": paced.get("late_max_ms"),
        "messages": messages,
        "delivered": paced.get("received", 0) // frame_bytes,
        "would_block": would_block,
        "cpu_seconds": cpu,
        "cpu_us_per_action": cpu / max(1, handled) * 1e6,
        "cpu_us_per_message": cpu / messages * 1e6,
        "kernel_share": kernel_share(times_start[:2], times[:2]),
    }


def serve_rooms(
    selector: selectors.BaseSelector,
    actors: Sequence[socket.socket],
    groups: Sequence[Sequence[socket.socket]],
    actions: int,
    limit: float,
) -> tuple[int, int]:
    """The floor itself: read each action, write the room's new value to its sockets.

    Room i's actor is ``actors[i]``, registered in ``selector`` with ``i`` as its data.

    Returns the actions handled (all of them, unless ``limit`` seconds ran
    out) and how often a send would have blocked (counted so it cannot hide).
    """
    size = len(action_frame())
    expected = len(groups) * actions
    pending = [0] * len(groups)  # bytes of a partly read action, per room
    values = [FIRST_VALUE] * len(groups)
    handled = would_block = 0
    deadline = time.monotonic() + limit
    while handled < expected and time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            room = key.data
            try:
                data = actors[room].recv(4096)
            except BlockingIOError:
                continue
            pending[room] += len(data)
            count, pending[room] = divmod(pending[room], size)
            for _ in range(count):
                values[room] += 1
                frame = state_frame(values[room])
                for sock in groups[room]:
                    try:
                        sock.send(frame)
                    except BlockingIOError:
                        would_block += 1
            handled += count
    return handled, would_block


def rooms_floor_line(floor: Report) -> str:
    """The floor's figure in one sentence, for a report."""
    return (
        f"rooms floor (one epoll loop: read each action, send the room's {floor['per_room']}): "
        f"{floor['cpu_us_per_message']:.2f} us CPU per delivered {floor['frame_bytes']}-byte "
        f"frame, {fmt(floor['cpu_us_per_action'])} us per action ({fmt(floor['delivered'])} of "
        f"{fmt(floor['messages'])} delivered, {fmt(floor['actions_handled'])} of "
        f"{fmt(floor['actions'])} actions, over {fmt(floor['connections'])} sockets)"
        f"{in_kernel(floor.get('kernel_share'), floor['cpu_us_per_action'])}"
    )


def in_kernel(share: float | None, us_per_action: float | None) -> str:
    """How much of an action's CPU was the kernel's, as a clause: '' if not known."""
    if share is None or us_per_action is None:
        return ""
    return f"; {share:.0%} in the kernel ({fmt(share * us_per_action)} us per action)"


FLAGS = (
    Flag("--rooms", "rooms, one actor each", positive(int), 1000),
    Flag("--per-room", "listening sockets per room", positive(int), 10),
    Flag("--rate", "actions per second in each room", positive(float), 1.0),
    Flag("--duration", "seconds of actions", positive(float), 10.0),
)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(
        "python -m bench.rooms.floor",
        "Measure the least CPU a server needs per delivered frame for many small rooms.",
        FLAGS,
        argv,
    )
    result = measure_rooms_floor(
        rooms=args.rooms, per_room=args.per_room, rate=args.rate, duration=args.duration
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
