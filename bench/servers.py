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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NODE_DIR",
    "REPO_ROOT",
    "SERVERS",
    "RunningServer",
    "ServerSpec",
    "cpu_seconds",
    "free_port",
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
            # sends faster than any person would.
            (sys.executable, "server.py", "--rate", "0", "--max-users", "20000"),
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


def free_port(host: str) -> int:
    """Ask the kernel for a port nobody listens on (racy, but fine on loopback)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RunningServer:
    """A started server process whose output goes to a log file."""

    def __init__(self, spec: ServerSpec, host: str, port: int, log_path: Path) -> None:
        self.spec = spec
        self.url = f"ws://{host}:{port}/"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file rather than a pipe: a server that logs every connection must
        # never block on a reader that is busy measuring.
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                spec.command(host, port),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid

    def wait_ready(self, timeout: float) -> None:
        """Return once the log says `listening on`; raise if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARK in self.log_path.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with {self.process.returncode}: {self.log_tail()}"
                )
            time.sleep(0.02)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout:g}s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the server is still busy after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_server(spec: ServerSpec, host: str, log_path: Path, timeout: float) -> RunningServer:
    """Start `spec` on a free port and wait until it is ready."""
    server = RunningServer(spec, host, free_port(host), log_path)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


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
