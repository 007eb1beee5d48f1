"""What CI checks, and against which releases: ``.ci/run`` and ``pyproject.toml``."""

from __future__ import annotations

import importlib.metadata
import shlex
import tomllib
from typing import Any

from packaging.requirements import Requirement
from packaging.version import Version

from testkit.processes import ROOT

README_TEST_COMMAND = "python3 -m pip install -e '.[test]' && python3 -m pytest"


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ci_commands() -> list[str]:
    """The lines of ``.ci/run`` that run something: no comments, no blank lines."""
    lines = (line.strip() for line in (ROOT / ".ci/run").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_websockets_is_allowed_only_below_its_next_major_release() -> None:
    # The package patches the library's internals: a major release may change them.
    (websockets,) = (
        Requirement(text)
        for text in pyproject()["project"]["dependencies"]
        if Requirement(text).name == "websockets"
    )
    installed = Version(importlib.metadata.version("websockets"))
    assert installed in websockets.specifier
    assert Version(f"{installed.major + 1}.0") not in websockets.specifier
    assert Version(f"{installed.major + 1}.0rc1") not in websockets.specifier


def test_ci_installs_the_newest_allowed_releases_and_logs_the_websockets_version() -> None:
    commands = ci_commands()
    install = next(line for line in commands if "pip install" in line and "dev" in line)
    assert {"--upgrade", "--upgrade-strategy", "eager"} <= set(shlex.split(install))
    assert any("websockets.__version__" in line for line in commands)


def test_ci_runs_every_style_check_before_the_readme_test_command() -> None:
    commands = ci_commands()
    assert commands[-1] == README_TEST_COMMAND
    assert README_TEST_COMMAND in (ROOT / "README.md").read_text()
    run = [python_module_run(line) for line in commands[:-1]]
    for check in ("ruff check .", "ruff format --check .", "mypy"):
        assert check.split() in run, check


def python_module_run(line: str) -> list[str]:
    """What ``python3 -m ...`` runs on this line, up to ``||``: ``mypy``, ``ruff check .``."""
    words = shlex.split(line)
    if words[:2] != ["python3", "-m"]:
        return []
    return words[2 : words.index("||")] if "||" in words else words[2:]


def test_mypy_checks_the_package_the_tests_the_bench_and_testkit_strictly() -> None:
    mypy = pyproject()["tool"]["mypy"]
    assert mypy["strict"] is True
    assert {"counter_sync", "server.py", "tests", "bench", "testkit"} <= set(mypy["files"])
