"""What operators rely on: metrics, liveness and readiness, graceful drain, JSON logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from counter_sync import logs
from counter_sync.app import App
from counter_sync.flush import RoomFlush
from counter_sync.logs import setup_logging
from testkit.processes import TIMEOUT
from tests.conftest import StartProcess, StartServer
from tests.helpers import (
    http_request,
    join,
    wait_for_event,
    wait_for_users,
    wait_for_value,
    wait_until,
    write_lock_held,
)

PLUS = json.dumps({"action": "plus"})


async def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics`` by name and labels, e.g. ``actions_total{result=accepted}``."""
    status, headers, body = await http_request(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            name = sample.name.removeprefix("counter_sync_")
            samples[f"{name}{{{labels}}}" if labels else name] = sample.value
    return samples


async def health(port: int) -> dict[str, object]:
    status, _, body = await http_request(port, "/healthz")
    assert status == 200
    result: dict[str, object] = json.loads(body)
    return result


# --- Metrics ----------------------------------------------------------------------------


async def test_gauges_equal_healthz_after_joins_leaves_and_aborts(app: App) -> None:
    clients = [await join(app, path) for path in ["/", "/", "/c/a", "/c/a", "/c/b", "/c/c"]]
    await clients[0].close()
    clients[2].transport.abort()  # lost, not closed
    clients[4].transport.abort()  # the last user of room b
    await wait_until(lambda: app.hub.count_here() == 3 and "b" not in app.hub.rooms)
    status = await health(app.port)
    samples = await scrape(app.port)
    assert (samples["connections"], samples["rooms"]) == (status["users"], status["rooms"])
    assert (status["users"], status["rooms"]) == (3, 3)
    assert samples["disconnects_total{kind=clean_close}"] == 1
    assert samples["disconnects_total{kind=connection_lost}"] == 2


async def test_actions_are_counted_by_result(start_server: StartServer) -> None:
    app = await start_server(rate=0.001, burst=4)  # four messages, then none for the test
    client = await join(app)
    for message in [PLUS, "nonsense", json.dumps({"action": "sync"}), PLUS]:
        await client.send(message)
    for _ in range(3):
        await client.send(PLUS)  # over the limit
    # Every message answered: the bad one and the three over the limit with
    # errors, the two accepted with the value.
    errors = shown = 0
    async with asyncio.timeout(TIMEOUT):
        while (errors, shown) != (4, 2):
            event = json.loads(await client.recv())
            errors += event["type"] == "error"
            shown = event["value"] if event["type"] == "state" else shown
    samples = await scrape(app.port)
    counted = {
        result: samples[f"actions_total{{result={result}}}"]
        for result in ("accepted", "bad_message", "rate_limited", "sync")
    }
    assert counted == {"accepted": 2, "bad_message": 1, "rate_limited": 3, "sync": 1}


async def test_refused_handshakes_are_counted_by_reason(start_server: StartServer) -> None:
    app = await start_server(max_users=1)
    await join(app)
    with pytest.raises(InvalidStatus):
        await connect(f"ws://127.0.0.1:{app.port}/")
    with pytest.raises(InvalidStatus):
        await connect(f"ws://127.0.0.1:{app.port}/", origin="http://evil.example")  # type: ignore[arg-type]
    samples = await scrape(app.port)
    assert samples["handshakes_rejected_total{reason=full}"] == 1
    assert samples["handshakes_rejected_total{reason=origin}"] == 1


async def test_broadcasts_and_frames_are_counted(app: App) -> None:
    listeners = [await join(app) for _ in range(3)]
    before = await scrape(app.port)
    await listeners[0].send(PLUS)
    for listener in listeners:
        await wait_for_value(listener, 1)
    after = await scrape(app.port)
    assert after["broadcasts_total"] - before["broadcasts_total"] == 1
    assert after["frames_sent_total"] - before["frames_sent_total"] == 3
    assert after["flush_seconds_count"] > before["flush_seconds_count"]
    assert after["store_commit_seconds_count"] > before["store_commit_seconds_count"]
    assert "event_loop_lag_seconds_count" in after


async def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(app: App) -> None:
    status, headers, body = await http_request(
        app.port, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# --- Liveness and readiness ---------------------------------------------------------------


async def test_readyz_is_503_while_the_store_fails_and_healthz_stays_200(
    server_process: StartProcess, tmp_path: Path
) -> None:
    state = tmp_path / "counter.sqlite"
    process = server_process("--rate", "0", "--state", str(state))
    assert (await http_request(process.port, "/readyz"))[0] == 200
    async with connect(process.url) as client:
        await client.recv(), await client.recv()
        with write_lock_held(state):
            await client.send(PLUS)  # its commit waits for the lock, then fails
            await wait_for_event(client, lambda event: event["type"] == "error")
            status, _, body = await http_request(process.port, "/readyz")
            assert (status, json.loads(body)) == (
                503,
                {"ready": False, "reason": "store unavailable"},
            )
            assert (await health(process.port))["store"] == "unavailable"
        await client.send(PLUS)
        await wait_for_value(client, 1)
    assert (await http_request(process.port, "/readyz"))[0] == 200


# --- Graceful drain -------------------------------------------------------------------------


async def closed_at(client: ClientConnection) -> tuple[float, int | None]:
    """When the server closed this client, and with which code."""
    with contextlib.suppress(ConnectionClosed):
        async for _ in client:
            pass
    return asyncio.get_running_loop().time(), client.close_code


# How much later than its turn a client may see the drain close it: the
# signal's delivery, a loop turn, a round trip. With both cores busy, at most
# 0.023 s in 20 runs.
DRAIN_SLACK = 0.1
# And how much sooner: none, but uvloop's timers (server.py runs on uvloop
# when it is installed) are whole milliseconds, and fire up to one early.
TIMER_RESOLUTION = 0.001


async def test_drain_spreads_1012_closes_and_refuses_newcomers(
    server_process: StartProcess,
) -> None:
    seconds = 2.0
    process = server_process("--rate", "0", "--drain-seconds", str(seconds))
    clients = [await connect(process.url) for _ in range(40)]
    actors = [await connect(process.url) for _ in range(3)]  # these act during the drain
    await wait_for_users(actors[-1], 43)
    loop = asyncio.get_running_loop()
    closes = [asyncio.ensure_future(closed_at(client)) for client in clients]
    started = loop.time()
    process.process.send_signal(signal.SIGTERM)
    # At once: not ready, and no newcomers.
    async with asyncio.timeout(1):
        while (await http_request(process.port, "/readyz"))[0] != 503:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # another process: asking is the only way to know
    with pytest.raises(InvalidStatus) as refused:
        await connect(process.url)
    assert refused.value.response.status_code == 503
    # Meanwhile the connections still open are served: their actions count.
    # (The order of the closes is random: one of three actors is still open.)
    counted = False
    for actor in actors:
        with contextlib.suppress(ConnectionClosed):
            await actor.send(PLUS)
            await wait_for_value(actor, 1)
            counted = True
            break
    assert counted
    closes += [asyncio.ensure_future(closed_at(actor)) for actor in actors]
    results = await asyncio.gather(*closes)
    assert {code for _, code in results} == {1012}
    # Evenly spread: the server closes its k-th user (of n, in random order)
    # at k / n of the drain, and these saw their closes no sooner.
    users = len(results)
    slots = [seconds * k / users for k in range(users)]
    offsets = sorted(when - started for when, _ in results)
    early = [slot - offset for offset, slot in zip(offsets, slots, strict=True)]
    assert max(early) <= TIMER_RESOLUTION, early
    # Nor much later: the signal, a loop turn and a round trip (the actors
    # saw theirs late, after they acted, and may hold three of the slots).
    offsets = sorted(when - started for when, _ in results[: len(clients)])
    late = [offset - slot for offset, slot in zip(offsets, slots[len(actors) :], strict=False)]
    assert max(late) <= DRAIN_SLACK, late
    returncode = process.process.wait(timeout=seconds + 3)  # exits by itself
    _, log = process.stop()
    assert returncode == 0, log
    assert "Traceback" not in log
    # One classification: the drain's closes are the server's shutdown, in
    # the log and in the metric alike (never "lost", never "clean").
    assert log.count("disconnected (shutdown): code 1012") == len(results), log


async def test_a_client_closing_with_its_own_code_is_a_clean_close_in_log_and_metric(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "counter_sync")
    client = await join(app)
    await client.close(4000, "bye")
    await wait_until(lambda: app.hub.count_here() == 0)
    samples = await scrape(app.port)
    assert samples["disconnects_total{kind=clean_close}"] == 1
    lines = [
        record.getMessage() for record in caplog.records if "disconnected" in record.getMessage()
    ]
    assert lines == [lines[0]] and "disconnected (clean_close): code 4000, reason 'bye'" in lines[0]


async def test_a_bug_in_a_background_task_is_logged_once_with_its_traceback_and_stops_the_server(
    app: App, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await join(app)

    def broken(*args: object) -> None:
        raise KeyError("a bug in the flush")

    monkeypatch.setattr(RoomFlush, "finish", broken)
    await client.send(PLUS)
    why = await asyncio.wait_for(app.hub.failed, TIMEOUT)
    assert "KeyError" in why
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "a bug in the flush" in "".join(traceback.format_exception(*errors[0].exc_info))


# --- Logs -------------------------------------------------------------------------------------


class _Writes(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


@pytest.fixture
def log_writes() -> Iterator[list[str]]:
    """The server's log set up as ``python server.py`` sets it up, into a list of writes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    library = logging.getLogger("websockets")
    library_level = library.level
    setup_logging("text", levels={"websockets": logging.WARNING})  # as counter_sync.cli
    stream = _Writes()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream.writes
    root.handlers[:] = handlers
    root.setLevel(level)
    library.setLevel(library_level)


async def test_log_lines_are_written_together_an_error_at_once_with_them(
    app: App, log_writes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "LOG_FLUSH_DELAY", 3600.0)  # no write comes from the timer
    clients = [await join(app) for _ in range(5)]  # each in loop turns of its own
    assert log_writes == []
    logging.getLogger("counter_sync").error("an error")
    assert len(log_writes) == 1
    lines = log_writes[0].splitlines()
    assert [line.split(" ", 3)[-1] for line in lines[:5]] == [
        f"{client.transport.get_extra_info('sockname')[0]}:"
        f"{client.transport.get_extra_info('sockname')[1]} connected to / ({n} here)"
        for n, client in enumerate(clients, 1)
    ]
    assert lines[5].endswith("ERROR an error")


async def test_log_lines_wait_for_a_delay_or_a_batch_whichever_is_first(
    app: App, log_writes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "LOG_BATCH_LINES", 3)
    monkeypatch.setattr(logs, "LOG_FLUSH_DELAY", 3600.0)
    for _ in range(6):
        await join(app)
    assert [len(write.splitlines()) for write in log_writes] == [3, 3]
    monkeypatch.setattr(logs, "LOG_FLUSH_DELAY", 0.01)
    await join(app)  # the first line of a new batch sets the timer
    await wait_until(lambda: len(log_writes) == 3)
    assert [len(write.splitlines()) for write in log_writes] == [3, 3, 1]


# --- JSON logs --------------------------------------------------------------------------------


async def test_json_logs_are_one_object_per_line_with_the_fields(
    server_process: StartProcess,
) -> None:
    process = server_process("--log-format", "json")
    async with connect(process.url) as client:
        await client.recv()
    _, log = process.stop()
    entries = [json.loads(line) for line in log.splitlines()]
    connect_entry = next(entry for entry in entries if entry["event"] == "connect")
    assert {"time", "level", "event", "peer", "room", "message"} <= connect_entry.keys()
    assert connect_entry["room"] == "/"
    disconnect_entry = next(entry for entry in entries if entry["event"] == "disconnect")
    assert disconnect_entry["code"] == 1000


async def test_disconnects_are_counted_by_how_they_ended(start_server: StartServer) -> None:
    app = await start_server(ping_interval=0.2, ping_timeout=0.2, max_message_size=64)
    watcher = await join(app, ping_interval=None)
    oversize = await join(app, ping_interval=None)
    silent = await join(app, ping_interval=None)
    await wait_for_users(watcher, 3)
    await oversize.send("x" * 100)  # over --max-message-size: closed with 1009
    silent.transport.pause_reading()  # answers no ping: dropped with 1011
    await wait_for_users(watcher, 1)
    samples = await scrape(app.port)
    assert samples["disconnects_total{kind=oversize}"] == 1
    assert samples["disconnects_total{kind=keepalive_timeout}"] == 1
    silent.transport.abort()
