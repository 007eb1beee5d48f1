"""``python -m bench.profile``: py-spy on the server, its recordings read back as text.

One tiny run in a subprocess (a few dozen listeners, two storms, a second of
steady actions) checks that both recordings are written and summarized; the
rest checks the reading of a recording and the server's command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.profile import top_frames
from bench.servers import SERVERS, checkout_spec
from testkit.processes import ROOT
from tests.helpers import require_binary, require_module


def test_a_recording_is_summed_by_self_and_by_inclusive_time_below_the_loop(
    tmp_path: Path,
) -> None:
    recording = tmp_path / "raw.txt"
    loop = "<module> (server.py:13);Runner.run (asyncio/runners.py:118)"
    recording.write_text(
        f"{loop};flush (a.py:1);write (a.py:2) 30\n"
        f"{loop};flush (a.py:1) 10\n"
        f"{loop};parse (b.py:5) 60\n"
    )
    text = top_frames(recording, 2)
    self_part, inclusive_part = text.split("inclusive")
    assert "100 samples" in text
    assert "60.0%  parse (b.py:5)" in self_part
    assert "30.0%  write (a.py:2)" in self_part
    assert "flush (a.py:1)" not in self_part  # third by self time: not in the top 2
    assert "60.0%  parse (b.py:5)" in inclusive_part
    assert "40.0%  flush (a.py:1)" in inclusive_part
    assert "Runner.run" not in inclusive_part and "<module>" not in inclusive_part


def test_the_servers_command_keeps_the_flags_it_knows_and_drops_the_others(
    tmp_path: Path,
) -> None:
    mine = checkout_spec(ROOT)
    assert mine.argv[1] == str(ROOT / "server.py")
    assert mine.argv[2:] == SERVERS["counter-sync"].argv[2:]
    # An older server that knows only --rate and --max-users.
    (tmp_path / "server.py").write_text("print('usage: server.py [--rate R] [--max-users N]')\n")
    older = checkout_spec(tmp_path)
    assert older.argv[1:] == (str(tmp_path / "server.py"), "--rate", "0", "--max-users", "20000")
    assert older.capacity_argv == ("--max-users", "19000")


def test_a_small_run_writes_and_summarizes_both_recordings(tmp_path: Path) -> None:
    require_binary("py-spy")
    require_module("picows", "the bench's load generator needs it: run bench/setup")
    command = [sys.executable, "-m", "bench.profile", "-n", "50", "--storms", "2"]
    command += ["--rate", "50", "--duration", "1", "--samples", "500"]
    command += ["--output-dir", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("profile-join.txt", "profile-steady.txt"):
        assert (tmp_path / name).read_text().strip(), f"{name} is empty"
        assert f"{name}: " in run.stdout
    assert run.stdout.count("  self:") == 2
