"""The server's lifecycle: open the store, start serving, and stop within a bound."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import random
import socket
from typing import cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.frames import CloseCode

from counter_sync.admission import origin_allowed
from counter_sync.config import (
    CLOSE_GRACE,
    CLOSE_TIMEOUT,
    FLUSH_TIMEOUT,
    STORE_CLOSE_TIMEOUT,
    WRITE_BUFFER_LIMIT,
    Settings,
)
from counter_sync.connection import Connection
from counter_sync.fanout import cap_socket_buffers
from counter_sync.hub import Hub
from counter_sync.store import MemoryStore, Store, StoreError
from counter_sync.sweep import ConnectionSweep
from counter_sync.tasks import within
from counter_sync.web import Web

__all__ = ["App", "start"]

log = logging.getLogger("counter_sync.app")


@dataclasses.dataclass
class App:
    """A running server: its hub, the library's server, and the bound port."""

    hub: Hub
    server: Server
    watch: ConnectionSweep

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self, code: CloseCode = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Stop accepting, close every connection (1001 by default), release the store.

        Returns within its bounds (``CLOSE_GRACE``, ``CLOSE_TIMEOUT``,
        ``FLUSH_TIMEOUT``, ``STORE_CLOSE_TIMEOUT``) however clients stall or
        the store hangs; raises what the store's own close raises.
        """
        for websocket in self._every_user():
            websocket.ended_by = websocket.ended_by or "shutdown"
        self.server.close(code=code, reason=reason)
        # close() waits for the close frame to drain, and a stalled reader
        # never drains: without the bound, shutdown would wait for the
        # keepalive timeout. Aborting is safe: every action read is pending.
        if not await within(CLOSE_GRACE, self.server.wait_closed()):
            for websocket in self._every_user():
                websocket.transport.abort()
            # A handler may still wait for a store that hangs (Redis stopped).
            await within(CLOSE_TIMEOUT, self.server.wait_closed())
        await self.watch.stop()
        await self.hub.metrics.stop()
        self.hub.collector.stop()
        # Commit what was read; a store that hangs gets a bound too, and the
        # clients see what was kept when they reconnect.
        if not await within(FLUSH_TIMEOUT, self.hub.flusher.drain()):
            log.warning("the last flushes did not commit within %g s", FLUSH_TIMEOUT)
        if not await within(STORE_CLOSE_TIMEOUT, self.hub.store.close()):
            log.warning("the store did not close within %g s; exiting anyway", STORE_CLOSE_TIMEOUT)

    async def drain(self, seconds: float) -> None:
        """Close every connection with 1012, spread evenly over ``seconds``, then stop.

        Readiness answers 503 and new handshakes are refused from the start,
        so a load balancer sends new clients elsewhere; clients reconnect at
        the pace they were closed, not all in the same second. Connections
        still open keep being served: their actions count.
        """
        self.hub.draining = True
        loop = asyncio.get_running_loop()
        users = self._every_user()
        random.shuffle(users)  # no room goes first
        started = loop.time()
        closing = []
        for index, websocket in enumerate(users):
            await asyncio.sleep(max(0.0, started + seconds * index / len(users) - loop.time()))
            websocket.ended_by = websocket.ended_by or "shutdown"
            closing.append(asyncio.create_task(websocket.close(CloseCode.SERVICE_RESTART)))
        if closing:  # each close is bounded; the stalled ones are aborted by close()
            await asyncio.wait(closing, timeout=CLOSE_GRACE)
        await self.close(CloseCode.SERVICE_RESTART)

    def _every_user(self) -> list[Connection]:
        # Not Server.connections: it leaves out those already closing.
        return list(self.hub.every_user())


def _open_store(settings: Settings) -> Store:
    """Pick the store the flags ask for; import Redis or SQLite support only then."""
    if settings.redis is not None:
        try:
            from counter_sync.redis_store import RedisStore
        except ModuleNotFoundError as exc:
            if exc.name != "redis":
                raise
            raise StoreError(
                "--redis needs the redis package: pip install 'counter-sync[redis]'"
            ) from None
        return RedisStore(
            settings.redis,
            expiry=settings.redis_expiry,
            session_ttl=settings.session_ttl,
            forget_after=settings.forget_after,
        )
    if settings.state is not None:
        from counter_sync.sqlite_store import SqliteStore

        return SqliteStore(
            settings.state, session_ttl=settings.session_ttl, forget_after=settings.forget_after
        )
    return MemoryStore(
        max_counters=settings.max_rooms,
        forget_after=settings.forget_after,
        session_ttl=settings.session_ttl,
        max_sessions=settings.max_sessions,
    )


async def start(settings: Settings) -> App:
    """Start a server (port 0 picks a free port) and return it running.

    Raises :exc:`~counter_sync.store.StoreError` if the store cannot be opened,
    :exc:`OSError` if the server cannot listen where the settings say.
    """
    store = _open_store(settings)
    await store.open()
    hub = Hub(settings, store)
    await hub.open_default_room()
    watch = hub.sweep
    connection = functools.partial(Connection, gate=hub.gate, metrics=hub.metrics)
    server = await serve(
        hub.handler,  # type: ignore[arg-type]  # it gets a Connection: create_connection
        settings.host,
        settings.port,
        create_connection=cast(type[ServerConnection], connection),
        process_request=Web(hub).process_request,
        # Messages are ~30 bytes: compression saves nothing and would cost
        # ~64 KiB of zlib state per connection.
        compression=None,
        max_size=settings.max_message_size,
        # Keepalive is the shared sweep's (ConnectionSweep), not a task per
        # connection.
        ping_interval=None,
        ping_timeout=None,
        close_timeout=CLOSE_TIMEOUT,
        # The handshake's deadline (--handshake-timeout) is the gate's, one
        # timer for all of them (Gate.admit_handshake), not one per handshake.
        open_timeout=None,
        write_limit=WRITE_BUFFER_LIMIT,
        # asyncio's default of 100 pending connections drops SYNs when many
        # clients reconnect at once (after a restart), costing each a 1 s retry.
        backlog=settings.listen_backlog,
        start_serving=False,
    )
    for sock in server.sockets:
        cap_socket_buffers(sock)  # before the first connection is accepted
    await server.start_serving()
    watch.start(hub.supervisor)
    hub.metrics.start(hub.supervisor)
    hub.collector.start()
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        log.info("%s", _listening_line(host, port, settings.origins))
    return App(hub, server, watch)


def _listening_line(host: str, port: int, origins: tuple[str, ...]) -> str:
    """The start-up line: where the server listens, and an address that opens the page.

    Tests and the bench wait for its start, ``listening on ws://HOST:PORT/``. A
    wildcard address (0.0.0.0, ::) is no address to open: the line names
    loopback instead, and the ``--origin`` that a page opened by this machine's
    name needs, since the server accepts its own page by name only then.
    """
    ip = ipaddress.ip_address(host)
    where = f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"
    line = f"listening on ws://{where}/"
    if not ip.is_unspecified:
        return f"{line} (page at http://{where}/)"
    loopback = f"[::1]:{port}" if ip.version == 6 else f"127.0.0.1:{port}"
    page = f"page at http://{loopback}/, or at this machine's address from elsewhere"
    name = f"{socket.gethostname().lower()}:{port}"
    if origin_allowed(f"http://{name}", name, origins):
        return f"{line} ({page})"
    return f"{line} ({page}; to open it as http://{name}/, add --origin http://{name})"
