"""Several runs of a whole comparison, and the median of each target's figure.

``python -m bench --runs N`` and ``python -m bench.rooms --runs N`` repeat
everything, the floors included, N times. Every ratio is taken within one
run, between figures measured side by side; then each target's median over
the runs decides its verdict. The median is the nearest-rank one
(:func:`bench.reporting.percentile`): of three runs, the second best, a
figure one run really gave.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.reporting import Report, fmt, loadavg, meets, percentile, table, verdict, write_json

__all__ = ["conclude", "end_run", "median_targets", "medians_table"]


def median_targets(runs: Sequence[Sequence[Report]]) -> list[Report]:
    """Each target of the first run, with every run's value, their median and its verdict.

    A run that could not tell (no value) is left out of the median and
    counted in ``missing``. A target whose value is a yes or no (every
    connection exact, say) passes only if it held in every run.
    """
    out = []
    for index, first in enumerate(runs[0]):
        values = [run[index]["measured"] for run in runs]
        shown = [run[index].get("shown", fmt(run[index]["measured"])) for run in runs]
        verdicts = [run[index]["verdict"] for run in runs]
        known = [v for v in values if v is not None]
        median: object
        if any(isinstance(v, bool) for v in known):
            median = all(known) if known else None
            passed = None if not known else bool(median)
            median_shown = "-" if median is None else "every run" if median else "not every run"
        else:
            median = percentile(known, 0.5) if known else None
            passed = meets(median, first["op"], first["bound"])
            # As the run that gave it shows it ("<= 0.5" for a bound, say).
            pairs = zip(values, shown, strict=True)
            median_shown = next((text for v, text in pairs if v == median), fmt(median))
        if passed is not None and all(v == "n/a" for v in verdicts):
            passed = None  # every run said it cannot tell (too small a run, say)
        notes = sorted({run[index].get("note") or "" for run in runs} - {""})
        out.append(
            {
                "target": first["target"],
                "op": first["op"],
                "bound": first["bound"],
                "runs": values,
                "shown_runs": shown,
                "measured": median,
                "shown": median_shown,
                "missing": len(values) - len(known),
                "verdict": verdict(passed),
                "note": "; ".join(notes),
            }
        )
    return out


def medians_table(targets: Sequence[Report]) -> str:
    """One line per target: verdict, what it is, each run's figure, the median and the bound."""
    runs = len(targets[0]["runs"]) if targets else 0
    header = ["", "target", *(f"run {i + 1}" for i in range(runs)), "median", "goal"]
    rows: list[Sequence[str]] = [header]
    for t in targets:
        note = f"  ({t['note']})" if t.get("note") else ""
        rows.append(
            [
                t["verdict"],
                t["target"],
                *t["shown_runs"],
                t["shown"],
                f"{t['op']} {fmt(t['bound'])}{note}",
            ]
        )
    return table(rows, align="<<" + ">" * (runs + 1) + "<", indent="  ", rule_after=1)


def end_run(run: Report, started: float, save: Callable[[], None]) -> None:
    """After one run: how long it took and the load average after it, into `run`; then `save`."""
    run["seconds"] = time.monotonic() - started
    run["loadavg_after"] = loadavg()
    save()


def conclude(report: Report, output: Path, started: float) -> None:
    """After the last run: the medians into `report`, written to `output`, and printed.

    ``report["runs"]`` holds every run, each with its ``targets``;
    `started` is when the first began (``time.monotonic()``).
    """
    report["seconds"] = time.monotonic() - started
    report["environment"]["loadavg_after"] = loadavg()
    report["targets"] = median_targets([run["targets"] for run in report["runs"]])
    write_json(output, report)
    print(f"\nMedians over {len(report['runs'])} run(s), each ratio taken within its run:")
    print(medians_table(report["targets"]))
    print(f"\nresults written to {output} ({report['seconds']:.0f}s)")
