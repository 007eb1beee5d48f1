"""``python3 -m bench.attack``: the command line, one attack after the other, the report."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.attack.admission import (
    attack_garbage,
    attack_per_address,
    attack_pipelined,
    attack_silent,
    attack_silent_limit,
)
from bench.attack.channel import AttackError
from bench.attack.figures import Figure, Outcome, figures_table, memory_table, pair
from bench.attack.floods import FLAGS as FLOOD_FLAGS
from bench.attack.floods import (
    attack_http_flood,
    attack_http_flood_off,
    attack_pending_flood,
)
from bench.attack.memory import attack_all, attack_bound_ping, attack_bound_text
from bench.attack.readers import attack_flood, attack_stall, attack_stall_paced
from bench.attack.run import AttackFunction, Run
from bench.flags import Flag, names_in, parse, positive
from bench.loadgen import LoadGen, LoadGenError
from bench.proc import raise_fd_limit
from bench.reporting import RESULTS_DIR, environment, say, write_json
from counter_sync.config import MAX_PENDING_PER_IP, PING_INTERVAL, PING_TIMEOUT
from testkit.rawclient import HOST

__all__ = ["ATTACKS", "main"]

ATTACKS: dict[str, tuple[str, AttackFunction]] = {
    "flood": ("1 ping flood", attack_flood),
    "stall": ("2 stalled reader, fast", attack_stall),
    "stall-paced": ("2b stalled reader, paced", attack_stall_paced),
    "silent": ("3a silent sockets, 1024 files", attack_silent),
    "silent-limit": ("3b silent sockets, real limit", attack_silent_limit),
    "per-address": ("4 per-address cap", attack_per_address),
    "pipelined": ("5 pipelined HTTP", attack_pipelined),
    "garbage": ("6 garbage senders", attack_garbage),
    "all": ("7 all at once", attack_all),
    "bound-text": ("8a costliest: 6-byte texts", attack_bound_text),
    "bound-ping": ("8b costliest: 6-byte pings", attack_bound_ping),
    "pending-flood": ("9 silent sockets, 50 addresses", attack_pending_flood),
    "http-flood": ("10 /healthz flood", attack_http_flood),
    "http-flood-off": ("10b /healthz flood, no limit", attack_http_flood_off),
}

COUNT, SECONDS = positive(int), positive(float)
PENDING = f"at most {MAX_PENDING_PER_IP}"  # handshakes in flight per address
# A default server's liveness deadline is ping interval + ping timeout.
DROPPED = PING_INTERVAL + PING_TIMEOUT + 10
# Each attack's README section says what its flags change.
FLAGS = (
    Flag("--only", "attacks to run, comma-separated", names_in(ATTACKS), ",".join(ATTACKS)),
    Flag("--listeners", "clients whose delivery latency is measured (attacks 1, 2, 7)", COUNT, 50),
    Flag("--workers", f"listener processes, one address each ({PENDING} handshakes)", COUNT, 4),
    Flag("--rate", "the latency driver's actions per second", SECONDS, 20.0),
    Flag("--seconds", "length of each latency measurement", SECONDS, 5.0),
    Flag("--pings", "ping frames the flooder sends (attack 1)", COUNT, 600_000),
    Flag("--fate-timeout", "seconds for the server to drop the flooder", SECONDS, DROPPED),
    Flag("--stall-listeners", "clients that must hear of the stalled reader's drop", COUNT, 10),
    Flag("--stall-pace", "attack 2b: updates a second (~1,000 fill the buffers)", SECONDS, 700.0),
    Flag("--stall-updates", "updates sent one at a time to a stalled reader", COUNT, 10_000),
    Flag("--silent", "silent sockets against the server of attacks 3a and 7", COUNT, 1100),
    Flag("--silent-open-files", "open-files limit of attack 3a's server", COUNT, 1024),
    Flag("--silent-extra", "attack 3b: silent sockets beyond the hard open-files limit", int, 200),
    Flag("--legit", "ordinary clients that must get in despite attacks 3b and 4", COUNT, 10),
    Flag("--fill", "connections from one address (attacks 4, 7)", COUNT, 500),
    Flag("--fill-max-users", "--max-users of attack 4's server", COUNT, 500),
    Flag("--fill-concurrency", "handshakes the filling address keeps in flight", COUNT, 10),
    Flag("--tries", "pipelined two-request packets (attack 5)", COUNT, 200),
    Flag("--garbage-clients", "garbage senders (attacks 6, 7)", COUNT, 50),
    Flag("--garbage-seconds", "how long they send (attack 6)", SECONDS, 5.0),
    Flag("--max-warnings", "attack 6's target: WARNING lines the garbage may cause", int, 300),
    Flag("--all-seconds", "length of attack 7 (all at once)", SECONDS, 15.0),
    Flag("--all-stalled", "stalled readers in attack 7", COUNT, 5),
    Flag("--bound-kib", "attacks 7 and 8: RSS growth per connection at most", SECONDS, 320.0),
    Flag("--bound-clients", "connections of attack 8, 50 per address", COUNT, 100),
    *FLOOD_FLAGS,
    Flag("--timeout", "seconds any one step may take before the attack fails", SECONDS, 30.0),
    Flag("--json", "where the figures and every detail go", Path, RESULTS_DIR / "attack.json"),
    Flag("--log-dir", "where each server's log goes", Path, RESULTS_DIR / "attack-logs"),
)


def run_attack(run: Run, key: str) -> Outcome:
    """One attack from start to clean-up; a failure is recorded, not raised."""
    title, attack = ATTACKS[key]
    outcome = Outcome(key, title)
    say(title)
    subject = None
    try:
        with contextlib.ExitStack() as stack:
            subject = attack(run, stack, outcome)
    except (AttackError, LoadGenError, RuntimeError, OSError, TimeoutError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(LoadGenError):
            run.load.reset()
    if subject is not None:  # stopped by now: its exit and its peaks are known
        exit_report = subject.stop()
        outcome.memory = subject.memory()
        outcome.details["server"] = {"flags": subject.flags, **exit_report}
        outcome.figures.append(
            Figure(
                "server exit code / tracebacks in its log",
                pair(exit_report["exit_code"], exit_report["tracebacks"]),
                "0 / 0",
                exit_report["exit_code"] == 0 and exit_report["tracebacks"] == 0,
            )
        )
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(
        "python3 -m bench.attack",
        "Rerun the attacks that once broke the server against a real one and check each "
        "figure against its target. Exit status 1 if a target failed.",
        FLAGS,
        argv,
    )
    raise_fd_limit()
    env = environment()
    say(f"attacks: {', '.join(args.only)} (load average {env['loadavg'][0]:.2f})")
    try:
        with LoadGen(workers=args.workers, host=HOST) as load:
            run = Run(args, load, args.log_dir)
            outcomes = [run_attack(run, key) for key in args.only]
    except LoadGenError as exc:
        print(f"bench.attack: {exc}", file=sys.stderr)
        return 2
    print(figures_table(outcomes))
    print()
    print(memory_table(outcomes, args.bound_kib))
    passed = all(outcome.passed for outcome in outcomes)
    write_json(
        args.json,
        {
            "settings": vars(args),
            "environment": env,
            "passed": passed,
            "attacks": {outcome.key: asdict(outcome) for outcome in outcomes},
        },
    )
    print(f"\n{'all targets met' if passed else 'some targets FAILED'}; details in {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
