"""counter-sync's ``/metrics``, scraped from outside: the garbage collector's pauses.

The server times every collection with ``gc.callbacks`` (the whole event
loop stands still meanwhile) and exports ``counter_sync_gc_pause_seconds``,
a histogram by ``generation`` (2 is a full collection), and
``counter_sync_gc_longest_pause_seconds``, the longest pause since start-up.
A phase is bracketed by two scrapes; :func:`gc_pauses` tells what happened
between them. The peers have no such metric: their figure is n/a.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

__all__ = [
    "LONGEST",
    "PAUSES",
    "Samples",
    "gc_pauses",
    "parse_exposition",
    "scrape",
    "scrape_or_none",
]

PAUSES = "counter_sync_gc_pause_seconds"
LONGEST = "counter_sync_gc_longest_pause_seconds"

# name{label="value",...} value: the Prometheus text format, one sample a line.
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# (metric name, sorted (label, value) pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> Samples:
    """Every sample of a Prometheus text exposition; comments and blank lines skipped."""
    samples: Samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(LABEL.findall(labels or "")))
        samples[name, pairs] = float(value)
    return samples


def scrape(base_url: str, timeout: float = 10.0) -> Samples:
    """GET ``/metrics`` of the server at ``base_url`` (``ws://`` or ``http://``).

    Raises :exc:`OSError` (``urllib.error.URLError`` among them) when the
    server does not answer.
    """
    url = base_url.replace("ws://", "http://", 1).rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_exposition(response.read().decode())


def generation_figures(before: Samples, after: Samples, generation: str) -> dict[str, Any]:
    """One generation's collections between two scrapes: count, total and a bound on the longest.

    ``longest_bound_ms`` is the upper edge of the smallest histogram bucket
    that holds all of them (None when there were none).
    """
    label = ("generation", generation)

    def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = delta((PAUSES + "_count", (label,)))
    buckets = sorted(
        (float(dict(labels)["le"]), delta((name, labels)))
        for name, labels in after
        if name == PAUSES + "_bucket" and label in labels
    )
    bound = next((edge for edge, seen in buckets if seen >= count), None)
    return {
        "collections": int(count),
        "seconds": delta((PAUSES + "_sum", (label,))),
        "longest_bound_ms": bound * 1e3 if count and bound is not None else None,
    }


def gc_pauses(before: Samples, after: Samples) -> dict[str, Any]:
    """What the collector did between two scrapes of one server process.

    ``longest_ms`` is the phase's longest pause: exactly, from the gauge,
    when the gauge grew during the phase (``exact``); otherwise an upper
    bound, the smallest histogram bucket edge that holds every pause of the
    phase (or the gauge before, if smaller). ``longest_since_start_ms`` is
    the gauge. Each generation's figures are in ``generations``. ``error``
    says why there are none (a server without the metrics).
    """
    if (LONGEST, ()) not in after:
        return {"error": f"no {LONGEST} in /metrics", "longest_ms": None}
    longest_before = before.get((LONGEST, ()), 0.0) * 1e3
    longest_after = after[(LONGEST, ())] * 1e3
    generations = {g: generation_figures(before, after, g) for g in ("0", "1", "2")}
    bounds = [
        g["longest_bound_ms"] for g in generations.values() if g["longest_bound_ms"] is not None
    ]
    if longest_after > longest_before:
        longest, exact = longest_after, True
    elif not bounds:
        longest, exact = 0.0, True  # no collection at all during the phase
    else:
        longest, exact = min(max(bounds), longest_before), False
    return {
        "longest_ms": longest,
        "exact": exact,
        "longest_since_start_ms": longest_after,
        "generations": generations,
    }


def scrape_or_none(base_url: str) -> Samples | None:
    """:func:`scrape`, or None when the server did not answer."""
    try:
        return scrape(base_url)
    except (OSError, urllib.error.URLError, ValueError):
        return None
