"""The hub: the counters of one server, the store they live in, and the way in.

The library calls :meth:`Hub.handler` once per connection, after the
handshake; it re-checks the caps and hands the connection to its room.
"""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode

from counter_sync.config import Settings
from counter_sync.counter import Room
from counter_sync.fanout import FanOut, cap_send_buffer
from counter_sync.store import Store

__all__ = ["Hub"]


class Hub:
    """Every room of one server, and the observer its store reports to."""

    def __init__(self, settings: Settings, store: Store, value: int) -> None:
        self.settings = settings
        self.store = store
        self.fan_out = FanOut()
        self.room = Room(settings, store, self.fan_out, value)
        store.watch(self)

    def count_here(self) -> int:
        """Connections open on this instance."""
        return len(self.room.users)

    def observe(self, *, value: int | None = None, elsewhere: int | None = None) -> None:
        """The store's news about other instances goes to the room it concerns."""
        self.room.observe(value=value, elsewhere=elsewhere)

    async def handler(self, websocket: ServerConnection) -> None:
        """Serve one client after its handshake, in its room."""
        if self.count_here() >= self.settings.max_users:
            # process_request answers 503 first; this closes the few that
            # passed it together during a storm of concurrent handshakes.
            await websocket.close(CloseCode.TRY_AGAIN_LATER, "server full")
            return
        cap_send_buffer(websocket)
        await self.room.serve(websocket)
