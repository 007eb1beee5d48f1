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


@pytest.mark.parametrize("generation", [0, 2])
async def test_what_survives_a_full_collection_or_any_while_users_grow_is_frozen(
    app: App, generation: int
) -> None:
    clients = [await join(app) for _ in range(20)]  # more than at any freeze before
    gc.collect(generation)
    assert gc.get_freeze_count() > 0
    # A connection open before that collection is looked at by no other.
    seen = {id(obj) for gen in range(3) for obj in gc.get_objects(gen)}
    assert all(id(ws) not in seen for ws in room(app).users)
    for client in clients:
        client.transport.abort()  # they read nothing: a close handshake would wait


async def test_gc_pauses_are_in_the_metrics(app: App) -> None:
    gc.collect()
    _, _, body = await http_request(app.port, "/metrics")
    assert b'counter_sync_gc_pause_seconds_count{generation="2"}' in body
    assert b"counter_sync_gc_longest_pause_seconds" in body


async def test_closed_connections_frozen_before_they_closed_are_freed_once_enough_closed(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(collector, "GC_THAW_MINIMUM", 40)
    app = await start_server(max_users_per_ip=1000, max_pending_per_ip=1000)
    clients: list[ClientConnection] = [await join(app) for _ in range(50)]
    by_port = {int(ws.client.rpartition(":")[2]): ws for ws in room(app).users}
    ports = [client.transport.get_extra_info("sockname")[1] for client in clients[:39]]
    first = weakref.WeakSet(by_port[port] for port in ports)
    by_port.clear()
    gc.collect()  # freezes them, open
    for client in clients[:39]:
        client.transport.abort()  # they read nothing: a close handshake would wait
    await wait_until(lambda: app.hub.count_here() == 11)
    gc.collect()
    assert len(first) == 39  # garbage in cycles, frozen: no collection sees it
    clients[39].transport.abort()  # the 40th close since the last thaw
    await wait_until(lambda: len(first) == 0)  # thawed and collected in full


async def test_a_young_collection_without_more_users_than_before_freezes_nothing(
    app: App,
) -> None:
    client = await join(app)
    gc.collect(0)  # one more user than at any freeze: frozen
    cycle = _Cycle()  # short-lived, as most of what steady traffic makes
    gc.collect(0)  # no more users: left to the generations
    assert any(obj is cycle for obj in gc.get_objects(1))
    del cycle
    client.transport.abort()


class _Cycle:
    """Garbage only the cyclic collector frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


async def test_frozen_garbage_is_freed_after_enough_collections_without_any_close(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 more collections from now; earlier ones since the last thaw count too.
    monkeypatch.setattr(collector, "GC_FREEZES_PER_THAW", app.hub.collector.freezes + 5)
    cycle = _Cycle()
    gone = weakref.WeakSet([cycle])
    gc.collect()  # alive now: frozen
    del cycle  # garbage the collector cannot see
    for _ in range(4):
        gc.collect()
    assert len(gone) == 1  # still frozen: 5 collections froze what they found
    await wait_until(lambda: len(gone) == 0)  # thawed and collected by the loop
