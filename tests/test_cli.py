"""``python server.py`` as a subprocess, and its flags: ranges, signals, exit codes."""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from counter_sync.config import MAX_VALUE, MIN_MESSAGE_SIZE
from counter_sync.flags import Number, build_parser, parse_args
from testkit.processes import ROOT, TIMEOUT, free_port
from tests.conftest import StartProcess
from tests.helpers import wait_for_event, wait_until

NUMERIC_FLAGS = [
    "--port",
    "--max-users",
    "--max-users-per-ip",
    "--max-pending",
    "--max-pending-per-ip",
    "--handshake-timeout",
    "--max-rooms",
    "--max-message-size",
    "--rate",
    "--burst",
    "--ping-interval",
    "--ping-timeout",
    "--redis-expiry",
    "--drain-seconds",
]


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


# --- Bad flags: one line naming the flag, exit 2, before anything starts -------


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--rate", "-1"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--drain-seconds", "nan"], "--drain-seconds"),
        (["--drain-seconds", "inf"], "--drain-seconds"),
        (["--max-message-size", "10"], "--max-message-size"),
        (["--max-users", "0"], "--max-users"),
        (["--ping-timeout", "soon"], "--ping-timeout"),
        (["--origin", "notaurl"], "--origin"),
        (["--host", "999.1.1.1"], "--host"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--redis", "redis://localhost/0", "--state", "counter.db"], "cannot be used together"),
    ],
)
def test_a_bad_flag_exits_2_with_one_line_naming_it(args: list[str], complaint: str) -> None:
    result = run_server(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("server.py: error:")
    assert complaint in lines[0]


# Every numeric flag: nan, the infinities and the values just out of its range.
OUT_OF_RANGE = [
    *[(flag, text) for flag in NUMERIC_FLAGS for text in ("nan", "inf", "-inf", "-1")],
    ("--port", "65536"),
    ("--max-users", "0"),
    ("--max-users-per-ip", "0"),
    ("--max-pending", "0"),
    ("--max-pending-per-ip", "0"),
    ("--max-rooms", "0"),
    ("--burst", "0"),
    ("--max-message-size", str(MIN_MESSAGE_SIZE - 1)),
    ("--handshake-timeout", "0"),
    ("--handshake-timeout", "86401"),
    ("--ping-interval", "86401"),
    ("--ping-timeout", "86401"),
    ("--redis-expiry", "0.5"),
    ("--redis-expiry", "86401"),
    ("--drain-seconds", "3601"),
    ("--rate", "1e999"),  # a float too large is inf
]


@pytest.mark.parametrize(("flag", "text"), OUT_OF_RANGE)
def test_a_number_out_of_its_flags_range_is_refused_naming_the_flag(
    flag: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(capsys, flag, text)


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("--port", "0"),
        ("--port", "65535"),
        ("--max-message-size", str(MIN_MESSAGE_SIZE)),
        ("--rate", "0"),
        ("--ping-interval", "0"),
        ("--ping-timeout", "86400"),
        ("--redis-expiry", "1"),
        ("--drain-seconds", "0"),
        ("--drain-seconds", "3600"),
    ],
)
def test_a_number_at_the_edge_of_its_flags_range_is_taken(flag: str, text: str) -> None:
    settings = parse_args([flag, text])
    assert getattr(settings, flag.removeprefix("--").replace("-", "_")) == float(text)


async def test_the_smallest_max_message_size_still_takes_the_longest_valid_message(
    server_process: StartProcess,
) -> None:
    process = server_process("--max-message-size", str(MIN_MESSAGE_SIZE))
    longest = json.dumps({"action": "minus", "op": MAX_VALUE})  # as Python's json writes it
    async with connect(process.url) as client:
        await wait_for_event(client, lambda event: event["type"] == "state")
        await client.send(longest)
        await client.send(json.dumps({"action": "sync"}))
        # Answered, not closed with 1009: the sync's reply starts with the user count.
        await wait_for_event(client, lambda event: event["type"] == "users")


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Parse ``argv``; check it exits 2 with one line naming its first flag; return the line."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, prog="server.py")
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"server.py: error: argument {argv[0]}")
    return lines[0]


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("http://myhost:6789", "http://myhost:6789"),
        ("HTTP://MyHost:6789/", "http://myhost:6789"),  # as pasted from the address bar
        ("http://myhost:80", "http://myhost"),  # browsers leave the default port out
        ("https://myhost:443", "https://myhost"),
        ("http://192.168.1.5:6789", "http://192.168.1.5:6789"),
        ("http://[0:0::1]:6789", "http://[::1]:6789"),
        ("http://bücher.example", "http://xn--bcher-kva.example"),
        ("null", "null"),
    ],
)
def test_an_origin_is_taken_in_the_form_browsers_send(text: str, origin: str) -> None:
    assert parse_args(["--origin", text]).origins == (origin,)


@pytest.mark.parametrize(
    "text",
    [
        "notaurl",
        "myhost:6789",
        "ftp://myhost",
        "http://",
        "http://myhost:6789/page",
        "http://myhost/?x=1",
        "http://myhost#top",
        "http://user@myhost",
        "http://myhost:99999",
        "http://my host",
        "",
    ],
)
def test_what_is_not_an_origin_is_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not an origin" in refused(capsys, "--origin", text)


@pytest.mark.parametrize(
    "host", ["localhost", "0.0.0.0", "::", "::1", "127.0.0.1", "my-host.example", "vm."]
)
def test_an_address_or_a_host_name_is_taken_for_host(host: str) -> None:
    assert parse_args(["--host", host]).host == host


@pytest.mark.parametrize(
    "host", ["999.1.1.1", "1.2.3", "::zz", "[::1]", "", "my host", "-x.example", "a..b"]
)
def test_neither_an_address_nor_a_host_name_is_refused_for_host(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(capsys, "--host", host)


def test_help_states_the_range_of_every_numeric_flag() -> None:
    text = help_text()
    actions = {action.option_strings[0]: action for action in build_parser("x")._actions}
    for flag in NUMERIC_FLAGS:
        number = actions[flag].type
        assert isinstance(number, Number), flag
        assert f"({number.range}; default: {actions[flag].default})" in text, flag
    assert "spread over this time; 0 closes them all at once with 1001 (0 to 3600;" in text


def test_help_documents_every_flag_with_its_default() -> None:
    text = help_text()
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
        assert flag in text
        assert f"default: {default})" in text
    for flag in ("--origin", "--redis", "--state"):
        assert flag in text


def help_text() -> str:
    """``server.py --help``, its lines joined: argparse wraps them at the terminal's width."""
    result = run_server("--help")
    assert result.returncode == 0
    return " ".join(result.stdout.split())


# --- Where it cannot listen: one line naming --host or --port, exit 1 ---------


def test_a_taken_port_exits_1_with_one_line_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"server.py: error: cannot listen on --host 127.0.0.1 --port {port}: address already "
        "in use; another process listens there: pick another --port, or 0 for a free one"
    ]


def test_an_address_of_no_interface_here_exits_1_with_one_line_naming_the_host() -> None:
    result = run_server("--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: nobody's
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("server.py: error: cannot listen on --host 192.0.2.1 --port 0: ")
    assert "[Errno" not in lines[0]


# --- On every interface: an address that opens the page, and --origin ---------


def test_on_every_interface_the_start_up_line_names_an_address_that_opens_the_page(
    server_process: StartProcess,
) -> None:
    process = server_process("--host", "0.0.0.0")
    port, name = process.port, socket.gethostname().lower()
    assert "page at http://0.0.0.0" not in process.log
    assert f"listening on ws://0.0.0.0:{port}/ (page at http://127.0.0.1:{port}/" in process.log
    assert f"add --origin http://{name}:{port})" in process.log
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as page:
        assert page.status == 200


async def test_refusing_its_own_page_opened_by_a_name_logs_the_origin_that_accepts_it(
    server_process: StartProcess,
) -> None:
    port = free_port()
    page = f"http://myhost:{port}"  # a name only the operator can vouch for
    refusing = server_process("--port", str(port))
    with pytest.raises(InvalidStatus) as refused:
        await connect_as_page_of(page, port)
    assert refused.value.response.status_code == 403
    await wait_until(lambda: "rejected: origin" in refusing.log)
    advice = re.search(r"add (--origin \S+) to accept it", refusing.log)
    assert advice is not None, refusing.log
    assert advice.group(1) == f"--origin {page}"
    refusing.stop()

    accepting = server_process("--port", str(port), *advice.group(1).split())
    async with await connect_as_page_of(page, port) as client:
        assert json.loads(await client.recv())["type"] == "users"
    assert "rejected" not in accepting.log


async def test_refusing_another_sites_page_suggests_no_origin(
    server_process: StartProcess,
) -> None:
    process = server_process()
    with pytest.raises(InvalidStatus):
        await connect(process.url, origin=Origin("http://elsewhere.example"), proxy=None)
    await wait_until(lambda: "rejected: origin" in process.log)
    assert "--origin" not in process.log


def connect_as_page_of(page: str, port: int) -> connect:
    """Connect as a page at ``page`` would, its name resolving to this machine."""
    return connect(
        f"ws://{page.removeprefix('http://')}/",
        host="127.0.0.1",
        port=port,
        origin=Origin(page),
        proxy=None,
    )


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
