"""The server's lifecycle: open the store, start serving, and stop within a bound."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging

from websockets.asyncio.server import Server, serve

from counter_sync.config import CLOSE_TIMEOUT, LISTEN_BACKLOG, WRITE_BUFFER_LIMIT, Settings
from counter_sync.hub import Hub
from counter_sync.store import MemoryStore, Store
from counter_sync.web import process_request

__all__ = ["App", "open_store", "start"]

log = logging.getLogger("counter-sync")


@dataclasses.dataclass
class App:
    """A running server: its hub, the library's server, and the bound port."""

    hub: Hub
    server: Server

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001, release the store."""
        self.server.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self.server.wait_closed()
        except TimeoutError:
            # close() waits for the close frame to drain, and a stalled
            # reader never drains: without this, shutdown would wait for the
            # keepalive timeout.
            # (Server.connections leaves out those already closing.)
            for room in self.hub.rooms.values():
                for websocket in room.users:
                    websocket.transport.abort()
            await self.server.wait_closed()
        flushes = [room.flush_task for room in self.hub.rooms.values() if room.flush_task]
        await asyncio.gather(*flushes)
        await self.hub.store.close()


def open_store(settings: Settings) -> Store:
    """Pick the store the flags ask for; import Redis or SQLite support only then."""
    if settings.redis is not None:
        from counter_sync.redis_store import RedisStore

        return RedisStore(settings.redis, expiry=settings.redis_expiry)
    if settings.state is not None:
        from counter_sync.sqlite_store import SqliteStore

        return SqliteStore(settings.state)
    return MemoryStore(max_counters=settings.max_rooms)


async def start(settings: Settings) -> App:
    """Start a server (port 0 picks a free port) and return it running."""
    store = open_store(settings)
    await store.open()
    hub = Hub(settings, store)
    await hub.open_default_room()
    server = await serve(
        hub.handler,
        settings.host,
        settings.port,
        process_request=functools.partial(process_request, hub),
        # Messages are ~30 bytes: compression saves nothing and would cost
        # ~64 KiB of zlib state per connection.
        compression=None,
        max_size=settings.max_message_size,
        ping_interval=settings.ping_interval or None,
        ping_timeout=settings.ping_timeout or None,
        close_timeout=CLOSE_TIMEOUT,
        write_limit=WRITE_BUFFER_LIMIT,
        # asyncio's default of 100 pending connections drops SYNs when many
        # clients reconnect at once (after a restart), costing each a 1 s retry.
        backlog=LISTEN_BACKLOG,
    )
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        log.info("listening on ws://%s:%d/ (page at http://%s:%d/)", host, port, host, port)
    return App(hub, server)
