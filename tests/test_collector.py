"""The garbage collector: short pauses, and the frozen garbage of closed connections freed."""

from __future__ import annotations

import gc
import weakref

import pytest
from websockets.asyncio.client import ClientConnection

from counter_sync import collector
from counter_sync.app import App
from tests.conftest import StartServer
from tests.helpers import http_request, join, room, wait_until


async def test_what_survives_a_full_collection_is_frozen_out_of_the_next(app: App) -> None:
    clients = [await join(app) for _ in range(20)]
    gc.collect()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    # A connection open before that collection is not looked at by the next.
    assert all(not gc.is_tracked(ws) or ws not in gc.get_objects(2) for ws in room(app).users)
    for client in clients:
        client.transport.abort()  # they read nothing: a close handshake would wait


async def test_gc_pauses_are_in_the_metrics(app: App) -> None:
    gc.collect()
    _, _, body = await http_request(app.port, "/metrics")
    assert b'counter_sync_gc_pause_seconds_count{generation="2"}' in body
    assert b"counter_sync_gc_longest_pause_seconds" in body


async def test_closed_connections_frozen_before_they_closed_are_freed_after_enough_closes(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(collector, "GC_THAW_MINIMUM", 40)
    app = await start_server(max_users_per_ip=1000, max_pending_per_ip=1000)
    clients: list[ClientConnection] = [await join(app) for _ in range(50)]
    gone = weakref.WeakSet(room(app).users)
    gc.collect()  # freezes them, open
    for client in clients:
        client.transport.abort()  # they read nothing: a close handshake would wait
    await wait_until(lambda: not app.hub.count_here())
    clients.clear()
    gc.collect()  # 50 closes passed the (lowered) minimum: thawed, so this frees them
    assert len(gone) == 0
