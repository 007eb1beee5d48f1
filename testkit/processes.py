"""Child processes the tests and the bench run: servers, redis-server, any logged program.

A thread keeps reading each child's output, so a child never blocks on a full
pipe and its log is there to read (and to match a ready line against) at any time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "IN_CI",
    "ROOT",
    "TIMEOUT",
    "LoggedProcess",
    "MissingBinary",
    "RedisServer",
    "ServerProcess",
    "find_binary",
    "free_port",
]

ROOT = Path(__file__).resolve().parent.parent
# Generous: a wait only ends this early when the behaviour under test is broken.
TIMEOUT = 10.0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class MissingBinary(Exception):
    """A system program a test or the bench needs is not installed."""


def find_binary(name: str, *candidates: str) -> str:
    """The path of a system program, or :exc:`MissingBinary` naming its package."""
    for candidate in (name, *candidates):
        path = shutil.which(candidate)
        if path is not None:
            return path
    raise MissingBinary(f"{name} is not installed (apt-get install {name})")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (racy in general, fine on loopback)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- Child processes ----------------------------------------------------------------


class LoggedProcess:
    """A child process whose output a thread keeps reading until it exits.

    The thread keeps draining the pipe: a child whose log pipe filled up would
    block on its next line. ``ready`` is a regular expression; the child is
    ready once a line matches it (its first group, if any, is kept in
    ``match``). With ``log_path``, every line also goes to that file.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: str,
        timeout: float = TIMEOUT,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.argv = list(argv)
        self.ready_pattern = re.compile(ready)
        self.lines: list[str] = []
        self.match: re.Match[str] | None = None
        self.ready = threading.Event()
        self.log_file: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = log_path.open("w")
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        self.reader = threading.Thread(target=self.read_log, daemon=True)
        self.reader.start()
        if not self.ready.wait(timeout) or self.match is None:
            self.kill()
            raise RuntimeError(f"{self.argv[0]} did not get ready:\n{self.log}")

    def read_log(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self.log_file is not None:
                self.log_file.write(line)
                self.log_file.flush()
            if self.match is None and (match := self.ready_pattern.search(line)):
                self.match = match
                self.ready.set()
        self.ready.set()  # exited: stop waiting either way
        self.process.stdout.close()
        if self.log_file is not None:
            self.log_file.close()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(
        self, timeout: float = TIMEOUT, signum: signal.Signals = signal.SIGTERM
    ) -> tuple[int, str]:
        """Send ``signum`` (SIGTERM), wait for the exit; return its code and the whole log."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        returncode = self.process.wait(timeout)
        self.reader.join(timeout)
        return returncode, self.log

    def kill(self) -> None:
        """SIGKILL, if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join(TIMEOUT)


class ServerProcess(LoggedProcess):
    """``python server.py`` from the checkout, ready once it logs the port it listens on."""

    def __init__(
        self,
        *args: str,
        timeout: float = TIMEOUT,
        log_path: Path | None = None,
        open_files: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        argv = [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0"]
        if open_files is not None:
            # Soft and hard: a limit the server cannot raise, as under a strict LimitNOFILE.
            argv = ["sh", "-c", f'ulimit -n {open_files} && exec "$@"', "sh", *argv]
        super().__init__(
            [*argv, *args],
            env=env,
            ready=r"listening on ws://[^ ]+:(\d+)/",
            timeout=timeout,
            log_path=log_path,
        )
        assert self.match is not None
        self.port = int(self.match.group(1))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


class RedisServer:
    """``redis-server`` on a free port, persistence off; stop and start keep the port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.child: LoggedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and return once it accepts connections (it says so in its log)."""
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE]
        self.child = LoggedProcess(argv, ready="Ready to accept connections")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
