"""The servers under test: how to start each one, stop it, and read its cost.

Every server is a child process started from the repo root with `--host` and
`--port`; it is ready once its log holds a line containing `listening on`.
Cost is read from /proc, so the bench measures any server the same way,
whatever language it is written in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testkit.processes import LoggedProcess, free_port

__all__ = [
    "NODE_DIR",
    "REPO_ROOT",
    "SERVERS",
    "RunningServer",
    "ServerSpec",
    "cpu_seconds",
    "listen_overflows",
    "node_ready",
    "rss_bytes",
    "start_server",
    "wait_idle",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO_ROOT / "bench" / "peers"
NODE_DIR = PEERS_DIR / "node_ws"
READY_MARK = "listening on"


@dataclass(frozen=True)
class ServerSpec:
    """One server the bench can run: a name for the table and its command."""

    name: str
    description: str
    argv: tuple[str, ...]

    def command(self, host: str, port: int) -> list[str]:
        return [*self.argv, "--host", host, "--port", str(port)]


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
            # address and on handshakes in progress are raised to the user cap:
            # the bench measures fan-out, not admission. (The server fits the
            # caps to its open-files limit and logs how.)
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
            ),
        ),
        ServerSpec(
            "classic",
            "peer 1: pre-2021 websockets docs, a task per send",
            (sys.executable, str(PEERS_DIR / "classic.py")),
        ),
        ServerSpec(
            "inline-broadcast",
            "peer 2: websockets docs today, broadcast() inline",
            (sys.executable, str(PEERS_DIR / "inline_broadcast.py")),
        ),
        ServerSpec(
            "node-ws",
            "peer 3: Node.js + ws",
            ("node", str(NODE_DIR / "server.js")),
        ),
    )
}


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


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, in seconds, all threads included.

    It sums /proc/PID/task/*/schedstat (nanoseconds on the CPU) because
    /proc/PID/stat's utime+stime counts in 10 ms ticks, too coarse for a
    burst that a coalescing server handles in a few milliseconds. A thread
    that has already exited is not counted; the servers here keep theirs.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return stat_cpu_seconds(pid)
    for task in tasks:
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            total += int(f.read().split()[0])
    return total / 1e9


def stat_cpu_seconds(pid: int) -> float:
    """utime+stime from /proc/PID/stat (tick resolution): the fallback."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields we want follow its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_idle(pid: int, *, timeout: float, quiet: float = 0.15, slack: float = 0.0015) -> bool:
    """Wait until the process used under `slack` CPU seconds for `quiet` seconds.

    Used after a phase so its cost includes the work a server finishes after
    the last listener converged (writes to the driver, buffers to free).
    Return False if it was still busy at `timeout`.
    """
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last < slack:
            return True
        last = now
    return False


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs dropped because an accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            names = header.split()[1:]
            numbers = values.split()[1:]
            return int(dict(zip(names, numbers, strict=True)).get("ListenOverflows", 0))
    return 0
