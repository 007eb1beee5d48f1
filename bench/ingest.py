"""The ingest phase's figures: what exactly-once actions cost against plain ones.

``python -m bench`` runs the phase (:func:`bench.measure.phase_ingest`)
against counter-sync only: the peers know no sessions. S senders write M
actions each as fast as they can, plain, then numbered with a session and
acked, in turn, ``--ingest-reps`` times; each mode's figure is the median
(nearest rank) of its runs, and the targets are the ratios sessions / plain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.reporting import Report, fmt, percentile, ratio
from bench.senders import MODES

__all__ = [
    "INGEST_BOUND",
    "SESSION_SERVERS",
    "Target",
    "ingest_rows",
    "ingest_targets",
    "summarize_ingest",
]

# The servers that take sessions (`?session=`, numbered ops, acks).
SESSION_SERVERS = frozenset({"counter-sync"})
# Exactly-once clicks may cost at most this much more than plain ones, in
# server CPU per action and in time until every action is counted: numbered
# ops and one cumulative ack per flush must not make a fast clicker expensive.
INGEST_BOUND = 1.15

# A target as its report builds it: what, measured, op, bound, note.
Target = tuple[str, float | None, str, float, str]


def median(runs: list[Report], key: str) -> float | None:
    """The nearest-rank median of `key` over the runs that counted every action."""
    values = [run[key] for run in runs if run["converged"] and run[key] is not None]
    return percentile(values, 0.5) if values else None


def summarize_ingest(
    senders: int, actions_per_sender: int, runs: dict[str, list[Report]]
) -> Report:
    """Every run, each mode's medians, and the ratios sessions / plain."""
    out: Report = {"senders": senders, "actions_per_sender": actions_per_sender, "runs": runs}
    for mode in MODES:
        out[mode] = {
            "runs": len(runs[mode]),
            "converged": sum(run["converged"] for run in runs[mode]),
            "seconds": median(runs[mode], "seconds"),
            "actions_per_second": median(runs[mode], "actions_per_second"),
            "cpu_us_per_action": median(runs[mode], "cpu_us_per_action"),
        }
    plain, sessions = out["plain"], out["sessions"]
    out["ratio_seconds"] = ratio(sessions["seconds"], plain["seconds"])
    out["ratio_cpu"] = ratio(sessions["cpu_us_per_action"], plain["cpu_us_per_action"])
    return out


def ingest_targets(subject: Report | None) -> list[Target]:
    """The two ratios against :data:`INGEST_BOUND` (None when the phase did not run)."""
    ingest: dict[str, Any] = (subject or {}).get("ingest") or {}
    return [
        (
            "ingest CPU per action, sessions / plain",
            ingest.get("ratio_cpu"),
            "<=",
            INGEST_BOUND,
            "",
        ),
        (
            "ingest time until all counted, sessions / plain",
            ingest.get("ratio_seconds"),
            "<=",
            INGEST_BOUND,
            "",
        ),
    ]


def ingest_rows(senders: int, actions_per_sender: int) -> list[tuple[str, Callable[[Report], str]]]:
    """The table's rows for the phase: each mode's medians, then the ratios."""

    def both(key: str) -> Callable[[Report], str]:
        def cell(result: Report) -> str:
            ingest = result.get("ingest")
            if ingest is None:
                return "-"
            return " / ".join(fmt(ingest[mode][key]) for mode in MODES)

        return cell

    def runs(result: Report) -> str:
        ingest = result.get("ingest")
        if ingest is None:
            return "-"
        return " / ".join(f"{ingest[m]['converged']}/{ingest[m]['runs']}" for m in MODES)

    def ratios(result: Report) -> str:
        ingest = result.get("ingest")
        if ingest is None:
            return "-"
        return " / ".join(
            "-" if value is None else f"{value:.2f}x"
            for value in (ingest["ratio_seconds"], ingest["ratio_cpu"])
        )

    return [
        (
            f"ingest {senders}x{actions_per_sender}: counted in (s), plain / sessions",
            both("seconds"),
        ),
        ("  actions per second", both("actions_per_second")),
        ("  server CPU per action (us)", both("cpu_us_per_action")),
        ("  runs that counted all", runs),
        ("  sessions / plain: time / CPU", ratios),
    ]
