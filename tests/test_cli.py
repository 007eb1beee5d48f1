"""``python server.py`` as a subprocess: flags, signals, exit codes."""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from testkit.processes import ROOT, TIMEOUT
from tests.conftest import StartProcess


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_closes_every_client_with_1001_and_exits_0(
    server_process: StartProcess, signum: signal.Signals
) -> None:
    process = server_process("--port", "0")
    async with connect(process.url) as first, connect(process.url) as second:
        for client in (first, second):
            assert json.loads(await client.recv())["type"] == "users"
        process.process.send_signal(signum)
        for client in (first, second):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await client.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    returncode, log = process.stop()
    assert returncode == 0
    assert "Traceback" not in log
    assert "shutting down" in log


def test_port_0_logs_the_real_address(server_process: StartProcess) -> None:
    process = server_process("--port", "0")
    assert process.port > 0
    assert f"listening on ws://127.0.0.1:{process.port}/" in process.log


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--rate", "-1"], "--rate"),
        (["--max-users", "0"], "--max-users"),
        (["--ping-timeout", "soon"], "--ping-timeout"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--redis", "redis://localhost/0", "--state", "counter.db"], "cannot be used together"),
    ],
)
def test_a_bad_flag_exits_non_zero_with_one_line(args: list[str], complaint: str) -> None:
    result = run_server(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("server.py: error:")
    assert complaint in lines[0]


def test_a_taken_port_exits_non_zero_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "server.py: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_documents_every_flag_with_its_default() -> None:
    result = run_server("--help")
    assert result.returncode == 0
    for flag, default in [
        ("--host", "localhost"),
        ("--port", "6789"),
        ("--max-users", "10000"),
        ("--max-message-size", "4096"),
        ("--rate", "20.0"),
        ("--burst", "40"),
        ("--ping-interval", "20.0"),
        ("--ping-timeout", "20.0"),
    ]:
        assert flag in result.stdout
        assert f"(default: {default})" in result.stdout
    for flag in ("--origin", "--redis", "--state"):
        assert flag in result.stdout


def test_start_up_raises_the_open_files_limit_to_the_hard_limit(
    server_process: StartProcess,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the child
    try:
        process = server_process()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{process.process.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)]
