"""Smoke test of the bench: every server starts, and every phase converges.

One tiny `python -m bench --quick` run in a subprocess (a few listeners, a
few actions, one run) against every server and the floors, then one test per
server reads its results. Nothing here compares a time or a CPU figure: a
slow or busy machine can make the bench's numbers worse, never these tests
fail. The medians over runs and the /metrics parsing are pure functions,
tested with made-up figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from bench.compare import CAPACITY_GOAL, available
from bench.floor import state_frame
from bench.ingest import SESSION_SERVERS
from bench.proc import kernel_share, user_and_system_seconds
from bench.reporting import percentile
from bench.runs import median_targets
from bench.scrape import gc_pauses, parse_exposition
from bench.senders import MODES
from bench.servers import BASELINE, SERVERS
from bench.steady_floor import accept_key, opening_response
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
        "--baseline", str(ROOT),  # this checkout again: the baseline's plumbing
        "--output", str(output),
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(output.read_text())
    return report


@pytest.fixture(scope="module")
def first(smoke: dict[str, Any]) -> dict[str, Any]:
    """The smoke report's only run: its floors, servers and targets."""
    assert len(smoke["runs"]) == 1, "--quick runs the comparison once"
    run: dict[str, Any] = smoke["runs"][0]
    return run


@pytest.mark.parametrize("server", [*SERVERS, BASELINE])
def test_server_starts_and_every_phase_converges(server: str, first: dict[str, Any]) -> None:
    if (reason := UNAVAILABLE.get(server)) is not None:
        unavailable(f"{server}: {reason}")
    result = first["servers"][server]
    assert "errors" not in result, result.get("errors")
    assert result["join"]["connected"] == LISTENERS
    assert result["join"]["reached"] == LISTENERS, "every listener saw users == N"
    assert result["join"]["first_messages"] == LISTENERS
    assert result["join"]["handshakes_seconds"] <= result["join"]["first_message_seconds"]
    assert result["join"]["cpu_us_per_handshake"] > 0
    assert result["burst"]["converged"], "every listener saw the burst's final value"
    assert result["burst"]["driver"] == {"errors": 0, "closed": False}
    assert result["steady"]["converged"], "every listener saw every steady action"
    assert result["steady"]["missing"] == 0
    assert result["steady"]["error_events"] == 0
    assert result["capacity"]["held"] == MAX_CONNECTIONS, "the driver is one of them"
    assert result["capacity"]["server_users"] == MAX_CONNECTIONS


@pytest.mark.parametrize("server", list(SERVERS))
def test_capacity_every_connection_gets_the_one_update(server: str, first: dict[str, Any]) -> None:
    if (reason := UNAVAILABLE.get(server)) is not None:
        unavailable(f"{server}: {reason}")
    update = first["servers"][server]["capacity"]["update"]
    assert update["got"] == update["count"] == MAX_CONNECTIONS, "the driver's copy counts too"
    assert update["missing"] == update["error_events"] == 0
    assert update["within"] <= update["got"]


@pytest.mark.parametrize("server", list(SERVERS))
def test_gc_pauses_are_read_from_counter_sync_only(server: str, first: dict[str, Any]) -> None:
    if (reason := UNAVAILABLE.get(server)) is not None:
        unavailable(f"{server}: {reason}")
    capacity = first["servers"][server]["capacity"]
    if not SERVERS[server].metrics:
        assert capacity["gc"] is None, "a peer has no such metric: n/a"
        return
    gc = capacity["gc"]
    assert "error" not in gc, gc
    assert gc["longest_ms"] <= gc["longest_since_start_ms"]
    assert set(gc["generations"]) == {"0", "1", "2"}


def test_join_floor_completes_every_handshake(first: dict[str, Any]) -> None:
    floor = first["join_floor"]
    assert "errors" not in floor, floor.get("errors")
    assert floor["join"]["connected"] == LISTENERS
    assert floor["join"]["handshakes_seconds"] > 0
    assert floor["join"]["first_messages"] == 0, "it sends nothing, and nothing is awaited"
    assert floor["join"]["cpu_us_per_handshake"] > 0


@pytest.mark.parametrize("key", ["join_library", "join_sketch"])
def test_beside_the_join_floor_every_first_message_is_timed(
    key: str, first: dict[str, Any]
) -> None:
    beside = first[key]
    assert "errors" not in beside, beside.get("errors")
    assert beside["join"]["connected"] == LISTENERS
    assert beside["join"]["first_messages"] == LISTENERS
    assert beside["join"]["first_message_seconds"] > 0
    assert beside["join"]["reached"] == LISTENERS, "each saw the users count of everyone"


@pytest.mark.parametrize("server", list(SERVERS))
def test_ingest_counts_every_action_plain_and_with_sessions_on_counter_sync_only(
    server: str, first: dict[str, Any]
) -> None:
    if (reason := UNAVAILABLE.get(server)) is not None:
        unavailable(f"{server}: {reason}")
    ingest = first["servers"][server].get("ingest")
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


def test_drain_floor_delivers_every_frame_it_sends(first: dict[str, Any]) -> None:
    floor = first["drain_floor"]
    assert floor["delivered"] == floor["messages"] == floor["rounds"] * LISTENERS
    assert floor["would_block"] == 0


def test_steady_floor_sends_every_round_to_every_listener(first: dict[str, Any]) -> None:
    floor = first["steady_floor"]
    assert "errors" not in floor, floor.get("errors")
    assert floor["connections"] == LISTENERS, "the listeners connect to it as to a server"
    assert floor["delivered"] == floor["sent"] == floor["rounds"] * LISTENERS
    assert floor["would_block"] == floor["failed"] == 0
    assert floor["converged"], "every listener saw every round's value"
    assert floor["missing"] == floor["error_events"] == 0
    assert floor["count"] == floor["rounds"] * LISTENERS, "one delay per listener and round"
    assert floor["payload_bytes_per_frame"] == pytest.approx(floor["frame_bytes"] - 2), "unmasked"
    assert floor["cpu_us_per_delivery"] > 0


def test_steady_floor_frames_are_the_size_of_counter_syncs(first: dict[str, Any]) -> None:
    if (reason := UNAVAILABLE.get("counter-sync")) is not None:
        unavailable(f"counter-sync: {reason}")
    mine = first["steady_floor"]["payload_bytes_per_frame"]
    theirs = first["servers"]["counter-sync"]["steady"]["payload_bytes_per_frame"]
    # The same values and serializer; seq counts commits, the burst's coalesced on the server.
    assert abs(mine - theirs) <= 1


def test_every_target_is_reported_with_its_bound_and_its_median(
    smoke: dict[str, Any], first: dict[str, Any]
) -> None:
    targets = {t["target"]: t for t in first["targets"]}
    assert len(targets) == 12
    assert all(t["verdict"] in {"PASS", "FAIL", "n/a"} for t in targets.values())
    capacity = [t for t in targets.values() if t["bound"] == CAPACITY_GOAL]
    assert [t["verdict"] for t in capacity] == ["n/a", "n/a"], "12 connections cannot show 19,000"
    medians = smoke["targets"]
    assert [t["target"] for t in medians] == list(targets)
    assert all(len(t["runs"]) == 1 and t["measured"] == t["runs"][0] for t in medians)


def target(measured: object, op: str = "<=", bound: float = 1.15) -> dict[str, Any]:
    return {"target": "x", "measured": measured, "op": op, "bound": bound, "verdict": "?"}


def test_a_targets_median_is_the_nearest_rank_one_of_its_runs() -> None:
    runs = [[target(1.3)], [target(1.1)], [target(None)], [target(1.2)]]
    (median,) = median_targets(runs)
    assert median["runs"] == [1.3, 1.1, None, 1.2]
    assert median["measured"] == 1.2, "of 1.1, 1.2, 1.3 the second; the run without a value out"
    assert median["missing"] == 1
    assert median["verdict"] == "FAIL"


def test_a_yes_or_no_target_holds_only_if_it_held_in_every_run() -> None:
    (median,) = median_targets([[target(True, "==", 1)], [target(False, "==", 1)]])
    assert median["verdict"] == "FAIL"
    (median,) = median_targets([[target(True, "==", 1)], [target(True, "==", 1)]])
    assert median["verdict"] == "PASS"


EXPOSITION = """\
# HELP counter_sync_gc_pause_seconds Pauses of Python's cyclic garbage collector.
# TYPE counter_sync_gc_pause_seconds histogram
counter_sync_gc_pause_seconds_bucket{{generation="2",le="0.001"}} {fast}
counter_sync_gc_pause_seconds_bucket{{generation="2",le="0.01"}} {mid}
counter_sync_gc_pause_seconds_bucket{{generation="2",le="+Inf"}} {total}
counter_sync_gc_pause_seconds_count{{generation="2"}} {total}
counter_sync_gc_pause_seconds_sum{{generation="2"}} {seconds}
counter_sync_gc_longest_pause_seconds {longest}
"""


def exposition(fast: int, mid: int, total: int, seconds: float, longest: float) -> str:
    return EXPOSITION.format(fast=fast, mid=mid, total=total, seconds=seconds, longest=longest)


def test_gc_pauses_of_a_phase_come_from_two_scrapes() -> None:
    before = parse_exposition(exposition(1, 1, 1, 0.0005, 0.02))
    # Two more full collections, both between 1 and 10 ms: the gauge did not grow.
    after = parse_exposition(exposition(1, 3, 3, 0.0105, 0.02))
    pauses = gc_pauses(before, after)
    assert pauses["generations"]["2"] == {
        "collections": 2,
        "seconds": pytest.approx(0.01),
        "longest_bound_ms": 10.0,
    }
    assert (pauses["longest_ms"], pauses["exact"]) == (10.0, False), "a bound from the buckets"
    grown = gc_pauses(before, parse_exposition(exposition(1, 1, 2, 0.05, 0.0495)))
    assert (grown["longest_ms"], grown["exact"]) == (pytest.approx(49.5), True), "the gauge grew"
    assert gc_pauses(before, parse_exposition(""))["longest_ms"] is None, "no metric: no figure"


def test_steady_floor_accepts_the_opening_handshake_as_rfc_6455_says() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "RFC's example"
    request = b"GET / HTTP/1.1\r\nHost: x\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    response = opening_response(request)
    assert response is not None
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith(b"\r\n\r\n")
    assert opening_response(b"GET / HTTP/1.1\r\nHost: x\r\n") is None, "no key, no upgrade"


def test_drain_floor_frame_is_a_32_byte_unmasked_text_frame() -> None:
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


def test_the_kernels_share_of_a_process_cpu_is_read_from_its_own_accounting() -> None:
    # One child spends its time in system calls, another in Python: the
    # kernel's share told for each must say which is which.
    def share_of(code: str) -> float | None:
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        try:
            before = user_and_system_seconds(child.pid)
            time.sleep(0.6)
            after = user_and_system_seconds(child.pid)
        finally:
            child.kill()
            child.wait()
        return kernel_share(before, after)

    syscalls = share_of(
        "import os\nfd = os.open('/dev/zero', os.O_RDONLY)\nwhile True: os.read(fd, 1 << 20)"
    )
    python = share_of("while True: sum(range(1000))")
    assert syscalls is not None and syscalls > 0.5
    assert python is not None and python < 0.5
    assert kernel_share((1.0, 2.0), (1.0, 2.0)) is None, "no CPU, no share"


def test_interleaved_join_storms_time_every_server_in_every_round() -> None:
    require_module("picows", "the bench's load generator needs it: run bench/setup")
    command = [sys.executable, "-m", "bench.joins", "-n", "20", "--rounds", "2"]
    command += ["--baseline", str(ROOT), "--timeout", "30"]  # this checkout again: the plumbing
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("  ")]
    names = [row.split(":")[0].strip() for row in rows]
    assert names == [
        "bare-websockets",
        "counter-sync",
        f"baseline {ROOT.name}",
        "bare-websockets-rooms",
        "sansio-sketch",
    ]
    assert rows[0].startswith("  bare-websockets: x floor per round 1, 1;")
    assert all(row.count(",") >= 1 and "us per handshake" in row for row in rows)
