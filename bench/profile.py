"""Where counter-sync's time goes: py-spy on the server during join storms and steady fan-out.

``python -m bench.profile`` starts the bench's counter-sync command, then
records the server with ``py-spy record --nonblocking`` (the server is not
stopped for each sample, so it runs at its own speed) twice, under the same
load generator as ``python -m bench``:

1. while ``--storms`` join storms of ``-n`` listeners connect (each storm's
   listeners are dropped before the next);
2. while one listener set of ``-n`` takes a steady phase of ``--rate``
   actions a second for ``--duration`` seconds.

It prints each recording's top frames as text, by self time and inclusive
time (below the event loop), and leaves the raw recordings (py-spy's
``raw`` format: one folded stack per line, what flame graph tools read) in
``--output-dir``. ``--root`` profiles the ``server.py`` of another checkout
(an older commit, say) under this bench: flags that server does not know are
left out of its command.

Needs ``py-spy`` on PATH (``pip install py-spy``), and the right to attach
to the server (root, or ``ptrace_scope`` 0).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.flags import Flag, installed, loopback, parse, positive
from bench.listeners import Worker
from bench.loadgen import LoadGen
from bench.measure import BenchSettings, phase_join, phase_steady
from bench.proc import raise_fd_limit, wait_idle
from bench.reporting import RESULTS_DIR, say
from bench.servers import RunningServer, checkout_spec, start_server
from testkit.processes import ROOT

__all__ = ["main", "top_frames"]

PROG = "python -m bench.profile"
# Frames that hold everything below them: the event loop and the way into it.
LOOP_FRAMES = ("<module>", "main (", "run (", "Runner.run", "_run_code", "_run_module")

FLAGS = (
    Flag(
        "--listeners",
        "listeners per join storm, and in the steady phase",
        positive(int),
        1000,
        short="-n",
    ),
    Flag("--storms", "join storms recorded one after the other", positive(int), 8),
    Flag("--rate", "steady actions per second", positive(float), 100.0),
    Flag("--duration", "seconds of steady actions", positive(float), 20.0),
    Flag("--samples", "py-spy samples per second", positive(int), 1000),
    Flag("--top", "frames printed per list", positive(int), 10),
    Flag("--root", "checkout whose server.py runs (default: this one)", Path, ROOT),
    Flag("--output-dir", "where the raw recordings go", Path, RESULTS_DIR),
    Flag("--workers", "load generator processes for the listeners", positive(int), 2),
    Flag("--host", "loopback address the server listens on", loopback, "127.0.0.1"),
    Flag("--timeout", "seconds any wait may take", positive(float), 60.0),
)


def record(server: RunningServer, path: Path, samples: int) -> subprocess.Popen[bytes]:
    """Start py-spy on the server; stop it with SIGINT to have it write ``path``."""
    command = ["py-spy", "record", "--pid", str(server.pid), "--rate", str(samples)]
    command += ["--nonblocking", "--format", "raw", "--output", str(path)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached before the load starts
    return spy


def stop(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=60)


def top_frames(path: Path, count: int) -> str:
    """A recording's ``count`` top frames by self time and by inclusive time, as text."""
    own: Counter[str] = Counter()
    held: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack:
            continue
        samples = int(number)
        frames = stack.split(";")
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            held[frame] += samples
    below = [(f, n) for f, n in held.most_common() if not f.startswith(LOOP_FRAMES)]
    lines = [f"{path.name}: {total:,} samples", "  self:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(count)]
    lines.append("  inclusive, below the event loop:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in below[:count]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(PROG, "Record where counter-sync's time goes, with py-spy.", FLAGS, argv)
    if installed(PROG, "py-spy") is None:
        return 2
    raise_fd_limit()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings.for_tool(
        host=args.host,
        listeners=args.listeners,
        workers=args.workers,
        timeout=args.timeout,
        log_dir=args.output_dir,
        rate=args.rate,
        duration=args.duration,
    )
    join_path = args.output_dir / "profile-join.txt"
    steady_path = args.output_dir / "profile-steady.txt"
    load = LoadGen(workers=args.workers, host=args.host, kind=Worker)
    load.start()
    server = start_server(
        checkout_spec(args.root, "counter-sync"),
        args.host,
        args.output_dir / "profile.log",
        args.timeout,
    )
    try:
        wait_idle(server.pid, timeout=args.timeout)
        spy = record(server, join_path, args.samples)
        for storm in range(args.storms):
            join = phase_join(server, load, settings)
            say(f"join storm {storm + 1}: {join['cpu_us_per_handshake']:.0f} us CPU per handshake")
            if storm + 1 < args.storms:
                load.reset()
                wait_idle(server.pid, timeout=args.timeout)
        stop(spy)
        value = load.connect_driver(server.url, listeners=args.listeners, timeout=args.timeout)
        wait_idle(server.pid, timeout=args.timeout)
        spy = record(server, steady_path, args.samples)
        steady = phase_steady(server, load, settings, start_value=value)
        say(f"steady: {steady['cpu_us_per_delivery']:.2f} us CPU per delivery")
        stop(spy)
    finally:
        server.stop()
        load.close()
    print(f"server: {' '.join(server.spec.argv)}")
    for path in (join_path, steady_path):
        print(top_frames(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
