"""The server under attack: ``python server.py``, its log in a file, its memory watched."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.proc import Sampler, kernel_memory, open_files, rss_bytes, wait_idle
from bench.reporting import Report
from bench.serverlog import log_stats
from testkit.processes import ServerProcess

__all__ = ["Subject"]

SAMPLE_PERIOD = 0.05  # seconds between two readings of the server's RSS and open files


class Subject:
    """The server under attack: ``python server.py``, its log in a file, its memory watched."""

    def __init__(
        self, name: str, log_dir: Path, *flags: str, open_files_limit: int | None = None
    ) -> None:
        self.name = name
        self.flags = flags
        self.process = ServerProcess(
            *flags, log_path=log_dir / f"{name}.log", open_files=open_files_limit, timeout=20
        )
        self.pid = self.process.pid
        self.port = self.process.port
        self.url = self.process.url
        wait_idle(self.pid, timeout=5)
        self.idle_rss = rss_bytes(self.pid)
        self.idle_files = open_files(self.pid)
        self.sampler = Sampler(self.pid, period=SAMPLE_PERIOD, count_files=True)
        self.kernel: Report | None = None
        self.exit: Report | None = None

    def mark(self) -> int:
        """Where the log is now: :meth:`lines_since` a mark is what came after."""
        return len(self.process.lines)

    def lines_since(self, mark: int) -> list[str]:
        return self.process.lines[mark:]

    def wait_for_line(self, pattern: str, mark: int, timeout: float) -> str | None:
        """The first line after ``mark`` that matches ``pattern``, waiting up to ``timeout``."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = mark
        while True:
            lines = self.process.lines[seen:]
            seen += len(lines)
            for line in lines:
                if compiled.search(line):
                    return line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def snapshot_kernel(self, peers: Sequence[str] = ()) -> Report:
        """Read the kernel's side now; keep the largest reading for the memory table."""
        reading = kernel_memory(self.port, peers)
        if self.kernel is None or reading.get("charged_bytes", 0) >= self.kernel.get(
            "charged_bytes", 0
        ):
            self.kernel = reading
        return reading

    def stop(self) -> Report:
        """SIGTERM and wait (SIGKILL after 10 s); return the exit code and the log's counts."""
        if self.exit is None:
            self.sampler.stop()
            try:
                code: int | None = self.process.stop(10)[0]
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = None
            self.exit = {"exit_code": code, **log_stats(self.process.lines)}
        return self.exit

    def memory(self) -> Report:
        """RSS growth over the attack, against the connections held at the peak."""
        peak = self.sampler.peak_rss()
        connections = max(0, self.sampler.peak_files() - self.idle_files)
        kernel = self.kernel or {}
        charged = kernel.get("charged_bytes")
        return {
            "idle_rss_bytes": self.idle_rss,
            "peak_rss_bytes": peak,
            "growth_bytes": peak - self.idle_rss,
            "connections_at_peak": connections,
            "kib_per_connection": (peak - self.idle_rss) / 1024 / connections
            if connections
            else None,
            "kernel": kernel,
            "kernel_kib_per_socket": charged / 1024 / kernel["sockets"]
            if charged is not None and kernel.get("sockets")
            else None,
        }
