"""Smoke test of the rooms bench: every phase runs and converges.

One tiny `python -m bench.rooms --quick` run in a subprocess, then one test
per phase reads its results. Nothing here compares a time, a CPU figure or a
memory figure: a busy machine can make the bench's numbers worse, never these
tests fail. What they check is that each phase did what it claims to measure
(every connection ended on its room's exact value, every probe was answered),
so a figure the bench prints is never the figure of a broken run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from bench.rooms.floor import action_frame
from bench.rooms.phases import PHASES, deal
from bench.rooms.report import TARGETS
from bench.rooms.worker import room_url
from testkit.processes import ROOT
from tests.helpers import require_module


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one `--quick` run of every phase."""
    require_module("picows", "the bench's load generator needs it: run bench/setup")
    output = tmp_path_factory.mktemp("bench") / "rooms.json"
    command = [sys.executable, "-m", "bench.rooms", "--quick", "--output", str(output)]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(output.read_text())
    return loaded


@pytest.fixture(scope="module")
def smoke(report: dict[str, Any]) -> dict[str, Any]:
    """The report's only run (--quick runs everything once): floors, phases, targets."""
    assert len(report["runs"]) == 1
    run: dict[str, Any] = report["runs"][0]
    return run


def phase(smoke: dict[str, Any], name: str) -> dict[str, Any]:
    result: dict[str, Any] = smoke["phases"][name]
    assert "errors" not in result, result.get("errors")
    return result


def test_fanout_every_connection_ends_on_its_rooms_exact_value(smoke: dict[str, Any]) -> None:
    fanout = phase(smoke, "fanout")
    connections = fanout["rooms"] * fanout["per_room"]
    assert fanout["join"]["connected"] == connections
    assert fanout["server_users"] == connections
    assert fanout["unsent"] == 0
    assert fanout["check"]["exact"] == fanout["check"]["listeners"] == connections
    assert fanout["check"]["missing"] == 0, "every connection saw every action"
    assert fanout["check"]["delays"]["count"] == fanout["actions"] * fanout["per_room"]
    assert fanout["error_events"] == 0
    assert fanout["converged"]


def test_fanout_floors_deliver_every_frame_over_as_many_sockets(smoke: dict[str, Any]) -> None:
    floor, room_floor, fanout = smoke["floor"], smoke["room_floor"], phase(smoke, "fanout")
    assert floor["connections"] == fanout["rooms"] * fanout["per_room"]
    assert floor["delivered"] == floor["messages"]
    assert (room_floor["rooms"], room_floor["per_room"]) == (fanout["rooms"], fanout["per_room"])
    assert room_floor["actions_sent"] == room_floor["actions_handled"] == fanout["actions"]
    assert (
        room_floor["delivered"] == room_floor["messages"] == fanout["actions"] * fanout["per_room"]
    )
    assert room_floor["would_block"] == 0
    assert fanout["x_room_floor"] is not None, "the target's ratio, taken in the same run"


@pytest.mark.parametrize(
    ("key", "module"),
    [("library_floor", "bench.peers.rooms_bare"), ("sansio_sketch", "bench.peers.sansio")],
)
def test_the_servers_beside_counter_sync_do_the_same_work_exactly_in_the_same_run(
    key: str, module: str, smoke: dict[str, Any]
) -> None:
    fanout = phase(smoke, "fanout")
    other = fanout[key]
    assert module in other["server"]
    assert other["join"]["connected"] == other["server_users"] == fanout["join"]["connected"]
    assert other["actions"] == fanout["actions"]
    assert other["check"]["exact"] == other["check"]["listeners"]
    assert other["check"]["missing"] == 0
    assert other["converged"]
    assert other["x_room_floor"] is not None


def test_counter_sync_is_reported_as_a_multiple_of_the_librarys_rooms_server(
    smoke: dict[str, Any],
) -> None:
    fanout = phase(smoke, "fanout")
    assert fanout["x_library_floor"] == pytest.approx(
        fanout["cpu_us_per_delivery"] / fanout["library_floor"]["cpu_us_per_delivery"]
    )


def test_the_rooms_floor_sends_masked_client_frames() -> None:
    frame = action_frame()
    assert frame[0] == 0x81 and frame[1] == 0x80 | 18, "FIN + text, masked, 18-byte payload"
    mask, masked = frame[2:6], frame[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(masked)) == b'{"action": "plus"}'


def test_cost_is_measured_in_both_conditions_and_every_run_converges(
    report: dict[str, Any], smoke: dict[str, Any]
) -> None:
    cost = phase(smoke, "cost")
    reps = report["options"]["reps"]
    for condition in ("alone", "crowded"):
        assert len(cost[condition]["cpu_us_per_action"]) == reps
        assert cost[condition]["converged"], condition
    others = report["options"]["others"]
    assert cost["fill"]["connected"] == others
    assert cost["server_users"] == cost["users"] + others
    assert cost["ratio"] is not None


def test_memory_visits_every_room_and_the_file_keeps_each_plus(smoke: dict[str, Any]) -> None:
    memory = phase(smoke, "memory")
    assert memory["visited"] == memory["rooms"]
    assert memory["failed"] == 0
    assert memory["stored"] == {"rows": memory["pluses"], "at_one": memory["pluses"]}
    assert memory["users_after"] == 0
    assert memory["rss_start_mib"] <= memory["rss_peak_mib"]
    assert memory["converged"]


def test_isolation_every_burst_converges_and_every_probe_is_answered(
    report: dict[str, Any], smoke: dict[str, Any]
) -> None:
    isolation = phase(smoke, "isolation")
    assert isolation["bursts_done"] == report["options"]["bursts"]
    assert isolation["quiet"]["count"] > 0
    assert isolation["quiet"]["unanswered"] == isolation["bursting"]["unanswered"] == 0
    assert isolation["check"]["exact"] == isolation["check"]["listeners"]
    assert isolation["converged"]


def test_every_target_is_reported_with_its_bound_and_its_median(
    report: dict[str, Any], smoke: dict[str, Any]
) -> None:
    assert [t["target"] for t in smoke["targets"]] == [label for _, label, _, _ in TARGETS]
    assert all(t["verdict"] in {"PASS", "FAIL", "n/a"} for t in smoke["targets"])
    assert set(smoke["phases"]) == set(PHASES)
    medians = report["targets"]
    assert [t["target"] for t in medians] == [label for _, label, _, _ in TARGETS]
    assert [t["runs"] for t in medians] == [[t["measured"]] for t in smoke["targets"]]


def test_room_url_names_the_room_under_c() -> None:
    assert room_url("ws://127.0.0.1:8000/", "votes") == "ws://127.0.0.1:8000/c/votes"


def test_deal_gives_every_hand_a_share_of_every_stretch() -> None:
    assert deal(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
