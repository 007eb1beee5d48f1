"""Smoke test of the failover bench: one small run kills an instance mid-run and ends exact.

One tiny ``python -m bench.failover`` run in a subprocess (3 instances on one
redis-server, 6 session clients, 30 ops each), then the tests read its JSON.
Nothing here compares a time: a busy machine can make the bench's figures
worse, never these tests fail. What they check is that the run measured what
the bench claims (the kill came mid-run and caught clients; every client
ended on the exact total), so a figure it prints is never one of a broken run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testkit.processes import ROOT
from tests.helpers import require_binary

CLIENTS = 6
OPS = 30
INSTANCES = 3
# Seconds for the whole subprocess: three processes' start-up and 180 ops.
BOUND = 120


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one small run."""
    require_binary("redis-server")
    folder = tmp_path_factory.mktemp("failover")
    output = folder / "failover.json"
    command = [
        sys.executable, "-m", "bench.failover",
        "--runs", "1", "--instances", str(INSTANCES),
        "--clients", str(CLIENTS), "--ops", str(OPS), "--chunk", "5",
        "--timeout", "60", "--output", str(output), "--log-dir", str(folder / "logs"),
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=BOUND, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report: dict[str, Any] = json.loads(output.read_text())
    assert "PASS" in run.stdout
    return report


def only_run(smoke: dict[str, Any]) -> dict[str, Any]:
    [result] = smoke["runs"]
    assert "error" not in result, result.get("error")
    return result  # type: ignore[no-any-return]


def test_every_client_ends_on_the_exact_total_with_nothing_rejected_or_older(
    smoke: dict[str, Any],
) -> None:
    result = only_run(smoke)
    assert result["values"] == [CLIENTS * OPS]
    assert result["exact"] == CLIENTS
    assert result["rejected"] == 0
    assert result["stale_states"] == 0
    assert result["epochs"] == 1
    assert result["passed"] and result["problems"] == []


def test_the_kill_comes_mid_run_and_its_clients_reconnect_elsewhere(
    smoke: dict[str, Any],
) -> None:
    result = only_run(smoke)
    assert 0 < result["acked_at_kill"] < CLIENTS * OPS
    # Client i starts on instance i mod 3, the killed one is instance 0.
    assert result["clients_on_killed"] == CLIENTS // INSTANCES
    assert result["reconnections"] >= result["clients_on_killed"]
    assert result["in_flight_on_killed"] <= result["in_flight_at_kill"]
    assert result["lost_and_resent"] <= result["in_flight_on_killed"]
    assert result["recovered_seconds"] <= result["settled_seconds"]


def test_the_report_keeps_the_settings_and_each_instances_log(smoke: dict[str, Any]) -> None:
    assert smoke["settings"]["clients"] == CLIENTS
    assert smoke["verdict"].startswith("PASS: 1 of 1 runs")
    logs = Path(smoke["settings"]["log_dir"])
    assert sorted(p.name for p in logs.iterdir()) == [
        f"run1-instance{i}.log" for i in range(INSTANCES)
    ]


def test_a_chunk_beyond_what_a_client_keeps_pending_is_a_one_line_error() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.failover", "--chunk", "101"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "--chunk" in run.stderr
