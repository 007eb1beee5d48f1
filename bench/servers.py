"""The servers under test: how to start each one and stop it.

Every server is a child process started from the repo root with `--host` and
`--port`; it is ready once its log holds a line containing `listening on`.
Its cost is read from outside (:mod:`bench.proc`).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from testkit.processes import ROOT, LoggedProcess, free_port

__all__ = [
    "BASELINE",
    "JOIN_BESIDE",
    "JOIN_FLOOR",
    "NODE_DIR",
    "ROOMS_LIBRARY_FLOOR",
    "SANSIO_SKETCH",
    "SERVERS",
    "RunningServer",
    "ServerSpec",
    "checkout_spec",
    "node_ready",
    "start_server",
]

NODE_DIR = ROOT / "bench" / "peers" / "node_ws"
READY_MARK = "listening on"


@dataclass(frozen=True)
class ServerSpec:
    """One server the bench can run: a name for the table and its command.

    ``capacity_argv`` is added to the command for the capacity phase (a later
    flag wins); ``metrics`` says whether it serves counter-sync's /metrics.
    """

    name: str
    description: str
    argv: tuple[str, ...]
    capacity_argv: tuple[str, ...] = ()
    metrics: bool = False

    def command(self, host: str, port: int) -> list[str]:
        return [*self.argv, "--host", host, "--port", str(port)]

    def for_capacity(self) -> ServerSpec:
        """The same server with its capacity flags."""
        return dataclasses.replace(self, argv=(*self.argv, *self.capacity_argv))


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "counter-sync",
            "server.py (this project)",
            # --rate 0 turns off per-client rate limiting: the bench's driver
            # sends faster than any person would. The load generator connects
            # each worker from one 127.0.1.x address, thousands of connections
            # each and a join storm's handshakes all at once, so the caps per
            # address, on handshakes in progress and on new rooms (the rooms
            # bench opens thousands) are raised: the bench measures fan-out,
            # not admission. (The server fits the caps to its open-files limit
            # and logs how.)
            (
                sys.executable,
                "server.py",
                "--rate",
                "0",
                "--max-users",
                "20000",
                "--max-users-per-ip",
                "20000",
                "--max-pending",
                "20000",
                "--max-pending-per-ip",
                "20000",
                "--new-rooms-per-ip",
                "100000",
            ),
            # The capacity target: 19,000 users in one process whose open-files
            # hard limit is 20,000, with the capacity phase's handshakes in
            # flight (CAPACITY_CONCURRENCY) under the pending cap.
            capacity_argv=(
                "--max-users",
                "19000",
                "--max-pending",
                "400",
                "--max-pending-per-ip",
                "400",
            ),
            metrics=True,
        ),
        ServerSpec(
            "classic",
            "peer 1: pre-2021 websockets docs, a task per send",
            (sys.executable, "-m", "bench.peers.classic"),
        ),
        ServerSpec(
            "inline-broadcast",
            "peer 2: websockets docs today, broadcast() inline",
            (sys.executable, "-m", "bench.peers.inline_broadcast"),
        ),
        ServerSpec(
            "node-ws",
            "peer 3: Node.js + ws",
            ("node", str(NODE_DIR / "server.js")),
        ),
    )
}


# The name `--baseline` gives counter-sync from another checkout.
BASELINE = "counter-sync-baseline"


def checkout_spec(root: Path, name: str = BASELINE) -> ServerSpec:
    """Counter-sync's command with the ``server.py`` of the checkout at ``root``.

    To measure a commit before a change under the same bench, side by side:
    the flags that server does not know (read from its ``--help``) are left
    out, each with its value.
    """
    spec = SERVERS["counter-sync"]
    script = str(root / "server.py")
    known = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, check=True
    ).stdout
    return dataclasses.replace(
        spec,
        name=name,
        description=f"server.py of {root}",
        argv=_known_only(spec.argv, known, script),
        capacity_argv=_known_only(spec.capacity_argv, known, script),
    )


def _known_only(words: tuple[str, ...], known: str, script: str) -> tuple[str, ...]:
    """``words`` with ``script`` for server.py, less each flag (and its value) not in ``known``."""
    kept: list[str] = []
    rest = list(words)
    while rest:
        word = rest.pop(0)
        if word == "server.py":
            kept.append(script)
        elif word.startswith("--") and word not in known:
            rest.pop(0)  # its value goes with it
        else:
            kept.append(word)
    return tuple(kept)


# The join storm's floor (not a peer: it speaks no protocol, it only completes handshakes).
JOIN_FLOOR = ServerSpec(
    "bare-websockets",
    "websockets serve(), a handler that awaits the close",
    (sys.executable, "-m", "bench.peers.handshake_only"),
)

# The rooms fan-out's library floor (not a peer: rooms, the value, nothing else).
ROOMS_LIBRARY_FLOOR = ServerSpec(
    "bare-websockets-rooms",
    "websockets serve(), a room per path, each frame built once and written to each transport",
    (sys.executable, "-m", "bench.peers.rooms_bare"),
)

# A sketch of the design named for the goals not met: the library's sans-I/O
# protocol under a plain asyncio.Protocol, no task per connection.
SANSIO_SKETCH = ServerSpec(
    "sansio-sketch",
    "websockets' ServerProtocol in data_received, no task per connection",
    (sys.executable, "-m", "bench.peers.sansio"),
)

# Measured after the join storm's floor, each to every first message as
# counter-sync is (the key of its result in a run): the plainest server on
# the library's asyncio API that sends them, and the sketch.
JOIN_BESIDE = {"join_library": ROOMS_LIBRARY_FLOOR, "join_sketch": SANSIO_SKETCH}


def node_ready() -> str | None:
    """Return why the Node peer cannot run, or None when it can."""
    if shutil.which("node") is None:
        return "`node` is not on PATH"
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        return f"{NODE_DIR / 'node_modules'} is missing: run bench/setup"
    return None


class RunningServer:
    """A started server process; its output goes to a log file as well."""

    def __init__(self, spec: ServerSpec, host: str, log_path: Path, timeout: float) -> None:
        self.spec = spec
        port = free_port(host)
        self.url = f"ws://{host}:{port}/"
        try:
            self.child = LoggedProcess(
                spec.command(host, port), ready=READY_MARK, timeout=timeout, log_path=log_path
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{spec.name} did not start: {exc}") from None
        self.pid = self.child.pid

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the server is still busy after `timeout`."""
        try:
            self.child.stop(timeout)
        except subprocess.TimeoutExpired:
            self.child.kill()


def start_server(spec: ServerSpec, host: str, log_path: Path, timeout: float) -> RunningServer:
    """Start `spec` on a free port and wait until it is ready."""
    return RunningServer(spec, host, log_path, timeout)
