"""Smoke test of the bench: every server starts, and every phase converges.

One tiny `python -m bench --quick` run in a subprocess (a few listeners, a
few actions) against every server, then one test per server reads its
results. Nothing here compares a time or a CPU figure: a slow or busy machine
can make the bench's numbers worse, never these tests fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from bench.compare import available
from bench.floor import state_frame
from bench.ingest import SESSION_SERVERS
from bench.reporting import percentile
from bench.senders import MODES
from bench.servers import SERVERS
from testkit.processes import ROOT
from tests.helpers import require_module, unavailable

LISTENERS = 4
BURST = 5
MAX_CONNECTIONS = 12
SENDERS = 3  # over the 2 load processes: 2 and 1
ACTIONS_PER_SENDER = 10
INGEST_REPS = 2
# Why each server that cannot run on this machine cannot (the Node peer without node, say).
RUNNABLE, UNAVAILABLE = available(list(SERVERS), install=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one small bench run over every server that can run."""
    require_module("picows", "the bench's load generator needs it: run bench/setup")
    output = tmp_path_factory.mktemp("bench") / "smoke.json"
    command = [
        sys.executable, "-m", "bench", "--quick", "--no-install",
        "--servers", ",".join(RUNNABLE),
        "--listeners", str(LISTENERS), "--burst", str(BURST),
        "--rate", "40", "--duration", "0.25",
        "--max-connections", str(MAX_CONNECTIONS),
        "--senders", str(SENDERS), "--actions-per-sender", str(ACTIONS_PER_SENDER),
        "--ingest-reps", str(INGEST_REPS),
        "--timeout", "30", "--capacity-timeout", "30",
        "--output", str(output),
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(output.read_text())
    return report


@pytest.mark.parametrize("server", list(SERVERS))
def test_server_starts_and_every_phase_converges(server: str, smoke: dict[str, Any]) -> None:
    if (reason := UNAVAILABLE.get(server)) is not None:
        unavailable(f"{server}: {reason}")
    result = smoke["servers"][server]
    assert "errors" not in result, result.get("errors")
    assert result["join"]["connected"] == LISTENERS
    assert result["join"]["reached"] == LISTENERS, "every listener saw users == N"
    assert result["burst"]["converged"], "every listener saw the burst's final value"
    assert result["burst"]["driver"] == {"errors": 0, "closed": False}
    assert result["steady"]["converged"], "every listener saw every steady action"
    assert result["steady"]["missing"] == 0
    assert result["steady"]["error_events"] == 0
    assert result["capacity"]["held"] == MAX_CONNECTIONS
    assert result["capacity"]["server_users"] == MAX_CONNECTIONS


@pytest.mark.parametrize("server", list(SERVERS))
def test_ingest_counts_every_action_plain_and_with_sessions_on_counter_sync_only(
    server: str, smoke: dict[str, Any]
) -> None:
    if (reason := UNAVAILABLE.get(server)) is not None:
        unavailable(f"{server}: {reason}")
    ingest = smoke["servers"][server].get("ingest")
    if server not in SESSION_SERVERS:
        assert ingest is None, "the peers know no sessions"
        return
    assert ingest is not None
    for mode in MODES:
        assert ingest[mode]["runs"] == ingest[mode]["converged"] == INGEST_REPS
        for run in ingest["runs"][mode]:
            assert run["actions"] == SENDERS * ACTIONS_PER_SENDER
            assert run["reached"] == LISTENERS, "every listener saw every action"
            assert run["error_events"] == 0
            # Only the senders with a session are acked, each up to its last op.
            assert run["acked"] == (SENDERS if mode == "sessions" else 0)
    # The modes alternate, each run from the value the one before ended on.
    runs = [run for pair in zip(*ingest["runs"].values(), strict=True) for run in pair]
    assert [run["mode"] for run in runs] == [*MODES] * INGEST_REPS
    step = SENDERS * ACTIONS_PER_SENDER
    assert [run["final_value"] - runs[0]["final_value"] for run in runs] == [
        step * index for index in range(len(runs))
    ]
    assert ingest["ratio_cpu"] is not None and ingest["ratio_seconds"] is not None


def test_floor_delivers_every_frame_it_sends(smoke: dict[str, Any]) -> None:
    floor = smoke["floor"]
    assert floor["delivered"] == floor["messages"] == floor["rounds"] * LISTENERS
    assert floor["would_block"] == 0


def test_every_target_is_reported_with_its_bound(smoke: dict[str, Any]) -> None:
    targets = {t["target"]: t for t in smoke["targets"]}
    assert len(targets) == 8
    assert all(t["verdict"] in {"PASS", "FAIL", "n/a"} for t in targets.values())
    capacity = next(t for t in targets.values() if t["bound"] == 10_000)
    assert capacity["verdict"] == "n/a", "a 12-connection run cannot show 10,000"


def test_floor_frame_is_a_32_byte_unmasked_text_frame() -> None:
    frame = state_frame(12345)
    assert len(frame) == 32
    assert frame[0] == 0x81, "FIN + text opcode"
    assert frame[1] == len(frame) - 2, "no mask bit, one-byte length"
    assert json.loads(frame[2:]) == {"type": "state", "value": 12345}


def test_percentile_is_the_nearest_rank_a_value_that_was_observed() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values[:10], 0.99) == 10.0, "rank ceil(0.99 x 10) = 10"
    assert percentile([float(v) for v in range(1, 151)], 0.99) == 149.0, "ceil(148.5) = 149"
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
