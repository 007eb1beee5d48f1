"""What operators watch: Prometheus metrics, through ``prometheus_client``, at ``GET /metrics``.

Each server has a registry of its own (two servers in one process, as in
the tests, do not mix their figures). Gauges read live state when scraped,
so they can never drift from ``/healthz``; counters are incremented where
the event happens, once per broadcast or flush rather than once per frame
where that is the same information, so the hot path stays as fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from counter_sync.config import LAG_PERIOD
from counter_sync.tasks import Supervisor

__all__ = ["Metrics"]

_ACTION_RESULTS = (
    "accepted",
    "bad_message",
    "rate_limited",
    "store_unavailable",
    "out_of_range",
    "read_only",
    "sync",
)
_REJECT_REASONS = (
    "origin",
    "full",
    "per_address",
    "rooms",
    "pending",
    "silent",
    "http_rate",
    "draining",
    "malformed",
    "token",
    "per_user",
    "new_rooms",
)
_DISCONNECT_KINDS = (
    "clean_close",
    "connection_lost",
    "keepalive_timeout",
    "liveness_deadline",
    "oversize",
    "rate_limit",
    "shutdown",
    "token_expired",
    "other",
)
# Flushes and commits take microseconds to milliseconds; a lagging loop, more.
_FAST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
)  # fmt: skip


class Metrics:
    """The metrics of one server, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Gauge(
            "counter_sync_connections", "Open WebSocket connections.", registry=registry
        )
        self.rooms = Gauge("counter_sync_rooms", "Rooms with users.", registry=registry)
        self.pending_handshakes = Gauge(
            "counter_sync_pending_handshakes",
            "Connections accepted whose handshake is not done yet.",
            registry=registry,
        )
        self.actions = Counter(
            "counter_sync_actions",
            "Client messages by what became of them.",
            ["result"],
            registry=registry,
        )
        self.handshakes_rejected = Counter(
            "counter_sync_handshakes_rejected",
            "Connections refused before or at the handshake, by reason.",
            ["reason"],
            registry=registry,
        )
        self.http_requests = Counter(
            "counter_sync_http_requests",
            "HTTP requests answered, by endpoint (websocket, page, healthz, readyz, metrics, "
            "admission, favicon; other for the rest: no client makes up new series) and status.",
            ["endpoint", "status"],
            registry=registry,
        )
        # Bounded: the endpoints are a fixed set, the statuses the server's own.
        self.http_series: dict[tuple[str, int], Any] = {}
        self.broadcasts = Counter(
            "counter_sync_broadcasts", "Messages sent to a room's users.", registry=registry
        )
        self.frames_sent = Counter(
            "counter_sync_frames_sent",
            "Broadcast frames written to connections.",
            registry=registry,
        )
        self.slow_consumer_skips = Counter(
            "counter_sync_slow_consumer_skips",
            "Broadcast frames not written because the connection's buffer was full.",
            registry=registry,
        )
        self.catch_ups = Counter(
            "counter_sync_catch_ups",
            "Skipped connections sent the latest state once drained.",
            registry=registry,
        )
        self.disconnects = Counter(
            "counter_sync_disconnects",
            "Connections that ended, by how.",
            ["kind"],
            registry=registry,
        )
        self.flush_seconds = Histogram(
            "counter_sync_flush_seconds",
            "Time of one flush of a room: commit, then broadcast.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.store_commit_seconds = Histogram(
            "counter_sync_store_commit_seconds",
            "Time the store took to apply one flush's change.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.event_loop_lag_seconds = Histogram(
            "counter_sync_event_loop_lag_seconds",
            f"How late a timer due every {LAG_PERIOD} s fires: the event loop's lag.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        # Every label shows from the start, at 0: a rate() needs the zero.
        for result in _ACTION_RESULTS:
            self.actions.labels(result)
        # Looked up once: labels() costs a lock and a dict on every flush.
        self.accepted_actions = self.actions.labels("accepted")
        for reason in _REJECT_REASONS:
            self.handshakes_rejected.labels(reason)
        for kind in _DISCONNECT_KINDS:
            self.disconnects.labels(kind)
        self.gc_pause_seconds = Histogram(
            "counter_sync_gc_pause_seconds",
            "Pauses of Python's cyclic garbage collector, by generation (2 is a full one).",
            ["generation"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.gc_longest_pause_seconds = Gauge(
            "counter_sync_gc_longest_pause_seconds",
            "The longest garbage collector pause since start-up: the event loop stood still.",
            registry=registry,
        )
        self.gc_pauses = _GcPauses(self.gc_pause_seconds, self.gc_longest_pause_seconds)
        self.lag_task: asyncio.Task[None] | None = None

    def count_http(self, endpoint: str, status: int) -> None:
        """Count one HTTP request answered; its series looked up once (labels() takes a lock)."""
        key = (endpoint, status)
        series = self.http_series.get(key)
        if series is None:
            series = self.http_series[key] = self.http_requests.labels(endpoint, str(status))
        series.inc()

    def read_live(
        self,
        *,
        connections: Callable[[], float],
        rooms: Callable[[], float],
        pending_handshakes: Callable[[], float],
    ) -> None:
        """Read the gauges from live state at each scrape."""
        self.connections.set_function(connections)
        self.rooms.set_function(rooms)
        self.pending_handshakes.set_function(pending_handshakes)

    def read_memory_store(
        self, *, counters_forgotten: Callable[[], float], sessions_evicted: Callable[[], float]
    ) -> None:
        """Count what a memory store dropped to stay within its caps, read at each scrape."""
        self.registry.register(
            _Totals(
                {
                    "counter_sync_counters_forgotten": (
                        "Counters without users forgotten to make room (memory mode, --max-rooms).",
                        counters_forgotten,
                    ),
                    "counter_sync_sessions_evicted": (
                        "Sessions forgotten before their TTL to stay within --max-sessions "
                        "(memory mode).",
                        sessions_evicted,
                    ),
                }
            )
        )

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type, in the format the scraper accepts."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def start(self, supervisor: Supervisor) -> None:
        """Start timing the event loop's lag and the garbage collector's pauses."""
        self.lag_task = supervisor.start(self._watch_lag(), name="event-loop lag")
        gc.callbacks.append(self.gc_pauses)

    async def stop(self) -> None:
        """Stop timing them. Idempotent."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self.gc_pauses)
        if self.lag_task is not None:
            self.lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.lag_task

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PERIOD
            await asyncio.sleep(LAG_PERIOD)
            self.event_loop_lag_seconds.observe(max(0.0, loop.time() - due))


class _Totals(Collector):
    """Counters kept by someone else (a store), read when scraped: name -> (help, read)."""

    def __init__(self, totals: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        for name, (text, read) in self.totals.items():
            yield CounterMetricFamily(name, text, value=read())


class _GcPauses:
    """A ``gc.callbacks`` hook: times each collection, which stops the whole event loop."""

    def __init__(self, pauses: Histogram, longest: Gauge) -> None:
        self.pauses = pauses
        self.longest = longest
        self.longest_seen = 0.0
        self.began = 0.0
        # Looked up once: a collection may run often, and labels() costs a lock.
        self.by_generation = [pauses.labels(str(generation)) for generation in range(3)]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.began = time.perf_counter()
            return
        pause = time.perf_counter() - self.began
        self.by_generation[info["generation"]].observe(pause)
        if pause > self.longest_seen:
            self.longest_seen = pause
            self.longest.set(pause)
