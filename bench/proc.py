"""What the kernel says about a process: CPU, memory, open files, sockets; read from outside.

Every figure comes from /proc (and ``ss`` for socket memory), so the bench
measures any server the same way, whatever language it is written in, and
the server runs exactly as in production.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

__all__ = [
    "CpuWatch",
    "Sampler",
    "cpu_seconds",
    "ephemeral_ports",
    "kernel_memory",
    "kernel_share",
    "listen_overflows",
    "open_files",
    "raise_fd_limit",
    "rss_bytes",
    "user_and_system_seconds",
    "wait_idle",
    "waiting_seconds",
]

SKMEM = re.compile(r"skmem:\(([^)]*)\)")


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit and return it.

    Each connection is a file descriptor on both ends; the usual soft limit of
    1024 would cap the bench long before the server under test. A server
    started afterwards inherits the limit, as under a service manager's
    ``LimitNOFILE``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ephemeral_ports() -> int:
    """How many local ports connect() picks from: connections one address may open to one port."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(high) - int(low) + 1


def schedstat_seconds(pid: int, field: int) -> float | None:
    """A field of /proc/PID/task/*/schedstat summed over threads, in seconds; None if gone.

    Field 0 is the time on a CPU, field 1 the time runnable but waiting for
    one, both in nanoseconds. A thread that has exited is not counted.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    total = 0
    for task in tasks:
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            total += int(f.read().split()[field])
    return total / 1e9


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, in seconds, all threads included.

    It reads schedstat (nanoseconds) because /proc/PID/stat's utime+stime
    counts in 10 ms ticks, too coarse for a burst that a coalescing server
    handles in a few milliseconds.
    """
    seconds = schedstat_seconds(pid, 0)
    return stat_cpu_seconds(pid) if seconds is None else seconds


def stat_cpu_seconds(pid: int) -> float:
    """utime+stime from /proc/PID/stat (tick resolution): the fallback."""
    return sum(user_and_system_seconds(pid))


def user_and_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime from /proc/PID/stat: the process's own CPU and the kernel's for it.

    In ticks (10 ms): over a phase of seconds of CPU, fine enough for the
    share of it spent in the kernel (system calls, the TCP stack).
    """
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields we want follow its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def kernel_share(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The share of the CPU between two (user, system) readings that was the kernel's."""
    user, system = after[0] - before[0], after[1] - before[1]
    return system / (user + system) if user + system > 0 else None


def waiting_seconds(pid: int) -> float:
    """Seconds the process's threads were runnable but waiting for a CPU.

    Next to its CPU seconds this tells a server that was busy from one that
    other processes kept off the CPU: on one machine the load competes.
    """
    return schedstat_seconds(pid, 1) or 0.0


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/status; :exc:`RuntimeError` if it has none."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_idle(pid: int, *, timeout: float, quiet: float = 0.15, slack: float = 0.0015) -> bool:
    """Wait until the process used under ``slack`` CPU seconds for ``quiet`` seconds.

    Used after a phase so its cost includes the work a server finishes after
    the last listener converged (writes to the driver, buffers to free).
    Returns False if it was still busy at ``timeout``.
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


class CpuWatch:
    """A process's CPU seconds and wall seconds since this watch was made."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self.cpu = cpu_seconds(pid)
        self.split = user_and_system_seconds(pid)

    def seconds(self) -> float:
        """CPU seconds used since the start."""
        return cpu_seconds(self.pid) - self.cpu

    def kernel_share(self) -> float | None:
        """The share of the CPU since the start spent in the kernel, from ticks."""
        return kernel_share(self.split, user_and_system_seconds(self.pid))

    def busy(self) -> float:
        """CPU seconds over wall seconds since the start: 1.0 is one core all the time."""
        return self.seconds() / (time.monotonic() - self.started)


class Sampler:
    """Reads a process's RSS (and open files) every ``period`` seconds in a thread, for peaks.

    RSS is read often because it is the peak that matters: a server that
    queues a flood and frees it later still needed the memory. A context
    manager, or call :meth:`stop`.
    """

    def __init__(self, pid: int, *, period: float, count_files: bool = False) -> None:
        self.pid = pid
        self.period = period
        self.count_files = count_files
        self.samples: list[tuple[float, int, int]] = []  # when, RSS, open files (or 0)
        self.sample()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the process has exited
            files = open_files(self.pid) if self.count_files else 0
            self.samples.append((time.monotonic(), rss_bytes(self.pid), files))

    def run(self) -> None:
        while not self.stopping.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def peak_rss(self, since: float = 0.0) -> int:
        return max((rss for t, rss, _ in self.samples if t >= since), default=0)

    def peak_files(self) -> int:
        return max((files for _, _, files in self.samples), default=0)


def kernel_memory(port: int, peers: Sequence[str] = ()) -> dict[str, Any]:
    """What the kernel holds for a server's TCP connections (``ss -tm``); RSS leaves it out.

    Per socket ``ss`` shows r (bytes received that the server has not read),
    w (bytes queued to send) and f (memory reserved ahead); their sum is what
    the kernel charges the socket. ``peers`` (``"ip:port"``) get their own entry.
    """
    command = ["ss", "-tmnH", "state", "connected", "(", "sport", "=", f":{port}", ")"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": type(exc).__name__}
    sockets = parse_skmem(out)
    total = {key: sum(s.get(key, 0) for s in sockets.values()) for key in ("r", "w", "f")}
    return {
        "sockets": len(sockets),
        "received_unread_bytes": total["r"],
        "queued_to_send_bytes": total["w"],
        "charged_bytes": sum(total.values()),
        "peers": {peer: sockets[peer] for peer in peers if peer in sockets},
        "sockstat_tcp_mem_bytes": sockstat_tcp_bytes(),
    }


def parse_skmem(out: str) -> dict[str, dict[str, int]]:
    """``ss -tmnH`` output into {peer: {"r": ..., "w": ..., "f": ...}}, one entry per socket."""
    sockets: dict[str, dict[str, int]] = {}
    peer = ""
    for line in out.splitlines():
        if not line[:1].isspace():
            columns = line.split()
            peer = columns[4] if len(columns) >= 5 else ""
        elif match := SKMEM.search(line):
            sockets[peer] = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", match.group(1))}
    return sockets


def sockstat_tcp_bytes() -> int | None:
    """All TCP memory of the machine (/proc/net/sockstat, both ends of every loopback pair)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                values = line.split()
                return int(values[values.index("mem") + 1]) * resource.getpagesize()
    return None
