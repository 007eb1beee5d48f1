"""The package as a user gets it: a wheel installed into a fresh virtual environment.

One wheel is built from the checkout and installed (not editable) into a new
virtual environment outside the checkout, once for the module; each test
then runs what the environment holds, from a directory with no project files.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from testkit.processes import ROOT, TIMEOUT, LoggedProcess

# Building the wheel fetches setuptools into an isolated environment, and the
# install fetches websockets: a few seconds each from PyPI or pip's cache.
INSTALL_TIMEOUT = 300


@dataclass(frozen=True)
class Installed:
    """A virtual environment with the wheel installed in it."""

    wheel: Path
    bin: Path
    site_packages: Path
    workdir: Path  # an empty directory to run commands from


def run(*argv: str | Path, cwd: Path = ROOT, timeout: float = INSTALL_TIMEOUT) -> str:
    result = subprocess.run(
        [str(arg) for arg in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, ROOT)
    [wheel] = dist.glob("counter_sync-*.whl")
    venv = base / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", wheel)
    site_packages = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    workdir = base / "elsewhere"
    workdir.mkdir()
    yield Installed(wheel, venv / "bin", site_packages, workdir)


@pytest.fixture
def running(installed: Installed) -> Iterator[int]:
    """``counter-sync --port 0`` from the environment; yields its port."""
    server = LoggedProcess(
        [str(installed.bin / "counter-sync"), "--host", "127.0.0.1", "--port", "0"],
        ready=r"listening on ws://[^ ]+:(\d+)/",
        cwd=installed.workdir,
    )
    assert server.match is not None
    yield int(server.match.group(1))
    returncode, log = server.stop()
    assert returncode == 0, log


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.headers.get("Content-Type", ""), response.read()
    finally:
        connection.close()


def test_site_packages_holds_the_package_and_no_top_level_modules(installed: Installed) -> None:
    names = {path.name for path in installed.site_packages.iterdir()}
    assert "counter_sync" in names
    for stray in ("server.py", "redis_store.py", "sqlite_store.py", "client.html", "tests"):
        assert stray not in names
    assert (installed.site_packages / "counter_sync" / "client.html").is_file()


def test_the_wheel_carries_the_license_and_a_real_copy_of_the_page(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        page = wheel.read("counter_sync/client.html")
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert page == (ROOT / "client.html").read_bytes()


def test_the_installed_server_serves_the_page_health_and_the_websocket(running: int) -> None:
    status, content_type, body = http_get(running, "/")
    assert (status, content_type) == (200, "text/html; charset=utf-8")
    assert body == (ROOT / "client.html").read_bytes()

    status, _, body = http_get(running, "/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"

    async def first_events() -> list[dict[str, object]]:
        async with connect(f"ws://127.0.0.1:{running}/") as websocket:
            return [json.loads(await websocket.recv()) for _ in range(2)]

    users, state = asyncio.run(first_events())
    assert users == {"type": "users", "count": 1}
    assert (state["type"], state["value"], state["seq"]) == ("state", 0, 0)
    assert isinstance(state["epoch"], str) and state["epoch"]


def test_python_dash_m_runs_the_same_command_line(installed: Installed) -> None:
    output = run(installed.bin / "python", "-m", "counter_sync", "--help", cwd=installed.workdir)
    assert "--max-users" in output
    assert output.startswith("usage: python -m counter_sync")


def test_redis_mode_without_the_redis_package_says_how_to_install_it(
    installed: Installed,
) -> None:
    result = subprocess.run(
        [installed.bin / "counter-sync", "--port", "0", "--redis", "redis://127.0.0.1:1/0"],
        cwd=installed.workdir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "counter-sync: error: --redis needs the redis package: pip install 'counter-sync[redis]'"
    ]
