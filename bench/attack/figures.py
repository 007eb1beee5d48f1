"""What an attack measured, each figure against its target, and the two tables of the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.reporting import Report, fmt, meets, table, verdict

__all__ = [
    "Figure",
    "Outcome",
    "against",
    "all_of",
    "at_most",
    "below",
    "exactly",
    "figures_table",
    "info",
    "kib",
    "memory_table",
    "pair",
    "show",
]

MIB = 1024 * 1024
TITLE = 30  # characters of the attack's column
VALUE = 24  # characters of the value's column


@dataclass
class Figure:
    """One measured figure; with a target, it passes or fails."""

    name: str
    value: Any
    target: str = ""
    passed: bool | None = None


def info(name: str, value: Any) -> Figure:
    return Figure(name, value)


def against(name: str, value: float | None, op: str, bound: float) -> Figure:
    """A figure with a target: it passes when ``value op bound`` holds, never without a value."""
    return Figure(name, value, f"{op} {show(bound)}", meets(value, op, bound) is True)


def at_most(name: str, value: float | None, bound: float) -> Figure:
    return against(name, value, "<=", bound)


def below(name: str, value: float | None, bound: float) -> Figure:
    return against(name, value, "<", bound)


def exactly(name: str, value: int | None, expected: int) -> Figure:
    return against(name, value, "==", expected)


def all_of(name: str, got: int, total: int) -> Figure:
    return Figure(name, f"{got}/{total}", f"{total}/{total}", got == total and total > 0)


@dataclass
class Outcome:
    """What one attack measured: its figures, every detail, its server's memory."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    details: Report = field(default_factory=dict)
    memory: Report | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(f.passed is not False for f in self.figures)


def kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def show(value: Any) -> str:
    """:func:`bench.reporting.fmt`, with n/a for a figure the attack could not measure."""
    return fmt(value, missing="n/a")


def pair(first: Any, second: Any) -> str:
    return f"{show(first)} / {show(second)}"


def figures_table(outcomes: Sequence[Outcome]) -> str:
    """Every figure under its attack, with its target and verdict.

    A value too long for its column goes on a line of its own below.
    """
    rows: list[Sequence[str] | str] = [("attack", "figure", "value", "target", "")]
    for outcome in outcomes:
        title = outcome.title
        if outcome.error is not None:
            rows += [(title, "finished", "no", "yes", "FAIL"), f"{'':{TITLE}}   {outcome.error}"]
            title = ""
        for figure in outcome.figures:
            value = show(figure.value)
            mark = verdict(figure.passed) if figure.target else ""
            long = len(value) > VALUE
            rows.append((title, figure.name, "(below)" if long else value, figure.target, mark))
            if long:
                rows.append(f"{'':{TITLE}}   -> {value}")
            title = ""
    return table(rows, align="<<><<", widths=(TITLE, 50, VALUE, 14, 4), gap=" ", rule_after=1)


def memory_table(outcomes: Sequence[Outcome], bound_kib: float) -> str:
    """RSS growth per connection held, per attack, and the kernel's side apart."""
    rows: list[Sequence[str] | str] = [
        ("server memory", "idle RSS", "peak RSS", "held", "RSS growth", "kernel", "kernel"),
        ("", "(MiB)", "(MiB)", "conns", "KiB/conn", "(KiB)", "KiB/socket"),
    ]
    worst: list[float] = []
    for outcome in outcomes:
        memory = outcome.memory
        if memory is None:
            continue
        per = memory["kib_per_connection"]
        if per is not None:
            worst.append(per)
        rows.append(
            (
                outcome.title,
                f"{memory['idle_rss_bytes'] / MIB:.1f}",
                f"{memory['peak_rss_bytes'] / MIB:.1f}",
                show(memory["connections_at_peak"]),
                show(per),
                show(kib(memory["kernel"].get("charged_bytes"))),
                show(memory["kernel_kib_per_socket"]),
            )
        )
    if worst:
        rows.append(
            f"largest RSS growth per connection held: {max(worst):.1f} KiB"
            f" (the bound checked in attacks 7 and 8: {bound_kib:g} KiB)"
        )
    rows.append(
        "(a row with few connections held shows fixed costs, not a per-connection one;"
        " kernel: ss at one moment, not in RSS)"
    )
    return table(rows, align="<>>>>>>", widths=(TITLE, 9, 9, 6, 11, 9, 11), gap=" ")
