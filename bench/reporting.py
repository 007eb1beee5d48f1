"""What every bench reports with: percentiles, numbers, tables, verdicts, the environment.

One rule for each, so that a p99 or a ratio means the same in every table:

- :func:`percentile` is the nearest-rank percentile: a value that was
  really observed, never an interpolation between two.
- :func:`fmt` shows three significant figures and thousands separators.
- :func:`ratio` is ``None`` where it would mean nothing (no denominator).
- :func:`table` aligns columns; every report's tables go through it.
"""

from __future__ import annotations

import datetime
import json
import math
import operator
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.servers import NODE_DIR
from testkit.processes import ROOT

__all__ = [
    "RESULTS_DIR",
    "Report",
    "environment",
    "fmt",
    "loadavg",
    "meets",
    "percentile",
    "ratio",
    "say",
    "spread_ms",
    "table",
    "targets_table",
    "verdict",
    "write_json",
]

RESULTS_DIR = ROOT / "bench" / "results"  # ignored by git
NODE_WS_PACKAGE = NODE_DIR / "node_modules" / "ws" / "package.json"

Report = dict[str, Any]

COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with a share ``q`` of them at or below it.

    It is always a value some client really saw: the p99 of 100 values is
    the 99th smallest, of 1,000 the 990th. Raises :exc:`ValueError` when
    ``values`` is empty.
    """
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    # The epsilon absorbs float error (0.07 * 100 is 7.000000000000001).
    rank = math.ceil(q * len(ordered) - 1e-9)
    return ordered[min(len(ordered), max(1, rank)) - 1]


def spread_ms(seconds: Sequence[float]) -> Report:
    """How many delays, and their p50, p99 and max in milliseconds (``None`` for none)."""
    ms = [value * 1e3 for value in seconds]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 0.50) if ms else None,
        "p99_ms": percentile(ms, 0.99) if ms else None,
        "max_ms": max(ms, default=None),
    }


def fmt(value: Any, digits: int = 3, missing: str = "-") -> str:
    """A number with ``digits`` significant figures and thousands separators; text as it is.

    Integers and numbers of 100 or more show every digit of their integer
    part (``12,345``), smaller ones ``digits`` significant figures (``0.438``).
    """
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator <= 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def meets(value: Any, op: str, bound: Any) -> bool | None:
    """Whether ``value op bound`` holds (``op`` is one of < <= >= > ==); ``None`` for no value."""
    if value is None:
        return None
    return COMPARISONS[op](value, bound)


def verdict(passed: bool | None) -> str:
    """PASS, FAIL, or n/a when the run could not tell."""
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def table(
    rows: Sequence[Sequence[str] | str],
    *,
    align: str,
    widths: Sequence[int] = (),
    gap: str = "  ",
    indent: str = "",
    rule_after: int = 0,
) -> str:
    """Rows of cells in aligned columns; a row given as one string is a line of its own.

    ``align`` holds one character per column, ``<`` or ``>``; a column is as
    wide as its widest cell, and at least its entry in ``widths``. Every row
    of cells starts with ``indent``. With ``rule_after``, a line of dashes
    follows that many rows (the header).
    """
    cells = [row for row in rows if not isinstance(row, str)]
    sizes = [
        max([*(len(row[i]) for row in cells), widths[i] if i < len(widths) else 0])
        for i in range(len(align))
    ]
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        texts = (
            text.ljust(size) if side == "<" else text.rjust(size)
            for text, size, side in zip(row, sizes, align, strict=True)
        )
        lines.append((indent + gap.join(texts)).rstrip())
    if rule_after:
        lines.insert(rule_after, "-" * (sum(sizes) + len(gap) * (len(sizes) - 1)))
    return "\n".join(lines)


def targets_table(targets: Sequence[Report]) -> str:
    """One line per target: verdict, what it is, the measured value, the bound and any note.

    Each target has ``verdict``, ``target``, ``op``, ``bound``, ``measured``
    (or ``shown``, the measured value as text) and maybe a ``note``.
    """
    rows = []
    for t in targets:
        note = f"  ({t['note']})" if t.get("note") else ""
        shown = t.get("shown", fmt(t.get("measured")))
        rows.append((t["verdict"], t["target"], shown, f"target {t['op']} {fmt(t['bound'])}{note}"))
    return table(rows, align="<<><", widths=(4,), indent="  ")


def say(message: str) -> None:
    """Progress for the person waiting, on stderr; the results go to stdout at the end."""
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def write_json(path: Path, document: Report) -> None:
    """Write ``document`` to ``path`` (its folder made if need be); paths and the like as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: was anything else using the CPUs?"""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def environment() -> Report:
    """What the figures depend on, stored beside them: versions, CPU, load, limits, commit."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def run(argv: list[str]) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "websockets": version("websockets"),
        "picows": version("picows"),
        "uvloop": version("uvloop"),
        "node": run(["node", "--version"]),
        "ws": json.loads(NODE_WS_PACKAGE.read_text())["version"]
        if NODE_WS_PACKAGE.exists()
        else None,
        "open_files_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        # "-dirty" when tracked files (server.py, say) differ from the commit.
        "commit": run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "loadavg": loadavg(),
    }
