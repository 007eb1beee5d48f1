"""The hub: the rooms of one server, opened on demand, and the way into them.

The library calls :meth:`Hub.handler` once per connection, after the
handshake. It re-checks the caps, opens the connection's room if nobody here
is in it yet (loading its value from the store), and hands the connection to
:meth:`Room.serve <counter_sync.counter.Room.serve>`. A room whose last user
left is released once its last flush is done: its users set and flush state
go, its value stays in the store.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections import Counter
from collections.abc import Iterator

from websockets.datastructures import Headers
from websockets.frames import CloseCode

from counter_sync.admission import Gate, Refusal
from counter_sync.collector import Collector
from counter_sync.config import Settings
from counter_sync.connection import Connection
from counter_sync.counter import Room
from counter_sync.fanout import FanOut
from counter_sync.logs import fields
from counter_sync.metrics import Metrics
from counter_sync.passes import Flusher
from counter_sync.store import DEFAULT_ROOM, MemoryStore, RoomState, Store, StoreUnavailable
from counter_sync.sweep import ConnectionSweep
from counter_sync.tasks import Supervisor
from counter_sync.tokens import Access, Denied, Grant

__all__ = ["ROOM_NAME", "Hub", "room_from_path"]

log = logging.getLogger("counter_sync.hub")

# /c/<name>: 1 to 64 of these characters, case-sensitive.
ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ROOM_PREFIX = "/c/"


def room_from_path(path: str) -> str | None:
    """The room a request path names (``/`` or ``/c/<name>``), or None for any other path."""
    if path == "/":
        return DEFAULT_ROOM
    if path.startswith(_ROOM_PREFIX) and ROOM_NAME.fullmatch(name := path[len(_ROOM_PREFIX) :]):
        return name
    return None


class Hub:
    """Every room of one server, the gate into them, and the observer its store reports to."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.gate = Gate(settings)
        anonymous = settings.anonymous or ("read" if settings.token_secret else "write")
        self.access = Access(settings.token_secret, anonymous)
        self.metrics = Metrics()
        self.metrics.read_live(
            connections=self.count_here,
            rooms=self.count_rooms_in_use,
            pending_handshakes=lambda: self.gate.handshakes,
        )
        if isinstance(store, MemoryStore):  # only it drops what it keeps to stay in bounds
            self.metrics.read_memory_store(
                counters_forgotten=lambda: store.forgotten,
                sessions_evicted=lambda: store.sessions.evicted,
            )
        # Set when the server must stop: a store that cannot tell whether a
        # change was applied (see StoreInDoubt), or a bug in a background task.
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.supervisor = Supervisor(self._crashed)
        self.collector = Collector(self.count_here)
        # Keepalive, the liveness deadline and expired tokens, for every user.
        self.sweep = ConnectionSweep(
            ping_interval=settings.ping_interval or None,
            ping_timeout=settings.ping_timeout or None,
        )
        self.fan_out = FanOut(self.metrics, self.supervisor)
        self.flusher = Flusher(
            store, self.fan_out, self.metrics, self.supervisor, on_doubt=self._store_in_doubt
        )
        self.rooms: dict[str, Room] = {}
        # Rooms whose value is being loaded, and the handlers on their way
        # into a room: a room is not released while someone is entering it.
        self.opening: dict[str, asyncio.Future[Room]] = {}
        self.entering: Counter[str] = Counter()
        self.connections = 0
        self.occupied = 0  # rooms with users: what --max-rooms caps, /healthz and /metrics show
        # Set on SIGTERM with --drain-seconds: not ready, no new connections.
        self.draining = False
        store.watch(self)

    async def open_default_room(self) -> None:
        """Open ``/`` at start-up and keep it: ``/healthz`` shows its value.

        Raises :exc:`~counter_sync.store.StoreUnavailable` if the store cannot read it.
        """
        await self._enter(DEFAULT_ROOM)

    def count_here(self) -> int:
        """Connections open on this instance, in every room."""
        return self.connections

    def not_ready(self) -> str | None:
        """Why a load balancer should send no new clients here now, or None."""
        if self.draining:
            return "draining"
        if not self.store.healthy():
            return "store unavailable"
        return None

    def every_user(self) -> Iterator[Connection]:
        """Every connection registered in a room here."""
        for room in self.rooms.values():
            yield from room.users

    def count_rooms_in_use(self) -> int:
        """Rooms with users here (``/`` too, but only while someone is in it)."""
        return self.occupied

    # Who may come in: the same answer for the handshake and for the page's probe.

    def refuse(self, room: str, *, address: str, headers: Headers) -> Refusal | None:
        """Why a WebSocket to ``room`` from ``address`` with these headers must be refused, or None.

        ``address`` is the client's, as the caps count it; the HTTP side read
        it, and refused a request with a single-valued header repeated.
        """
        if self.draining:
            return Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "server is restarting",
                "draining",
                "draining",
            )
        refusal = self.gate.refuse(
            origin=headers.get("Origin"),
            host=headers.get("Host"),
            address=address,
            users=self.count_here(),
        )
        if refusal is None and (reason := self._refuse_room(room)) is not None:
            refusal = Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE, reason, f"{reason} ({room})", "rooms"
            )
        return refusal

    def admit(
        self, room: str, *, address: str, headers: Headers, token: str | None, spend: bool
    ) -> Grant | Refusal:
        """What a WebSocket to ``room`` from this request may do, or why it is refused.

        With ``spend``, a new room costs the client address one of its
        ``--new-rooms-per-ip``; without (the page's probe), it is only checked.
        """
        refusal = self.refuse(room, address=address, headers=headers)
        if refusal is not None:
            return refusal
        try:
            grant = self.access.grant(token, room)
        except Denied as denied:
            return Refusal(denied.status, denied.reason, denied.reason, "token")
        if grant.user is not None and self.gate.users.full(grant.user):
            return Refusal(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too many connections for this user",
                f"{self.settings.max_connections_per_user} connections of {grant.user} is the cap",
                "per_user",
            )
        if self._opens_room(room):
            now = asyncio.get_running_loop().time()
            budget = self.gate.new_rooms
            if (
                (budget.retry_after(address, now) is not None)
                if spend
                else not (budget.would_allow(address, now))
            ):
                return Refusal(
                    http.HTTPStatus.TOO_MANY_REQUESTS,
                    "too many new counters from your address; try again in a minute",
                    f"{self.settings.new_rooms_per_ip} new counters a minute from {address} "
                    "is the cap",
                    "new_rooms",
                )
        return grant

    def _over_a_cap(self, room: str, address: str, user: str | None) -> Refusal | None:
        """Which cap one more connection would pass (the caps only: the rest was checked)."""
        refusal = self.gate.over_a_cap(address=address, users=self.count_here())
        if refusal is None and user is not None and self.gate.users.full(user):
            refusal = Refusal(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too many connections for this user",
                "",
                "per_user",
            )
        if refusal is None and self.draining:
            refusal = Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "server is restarting", "", "draining"
            )
        if refusal is None and (reason := self._refuse_room(room)) is not None:
            refusal = Refusal(http.HTTPStatus.SERVICE_UNAVAILABLE, reason, reason, "rooms")
        return refusal

    def _opens_room(self, name: str) -> bool:
        """Whether a connection to ``name`` would open a room nobody is in here."""
        room = self.rooms.get(name)
        return (room is None or not room.users) and name not in self.opening

    def _refuse_room(self, name: str) -> str | None:
        """Why room ``name`` cannot take one more connection now, or None."""
        room = self.rooms.get(name)
        if (room is not None and room.users) or name in self.opening:
            return None
        # Rooms being opened count: their handlers wait for the store.
        in_use = self.occupied + len(self.opening)
        if in_use >= self.settings.max_rooms or not self.store.can_open(name):
            return "too many counters in use"
        return None

    # What the store reports.

    def observe(
        self, room: str, *, state: RoomState | None = None, elsewhere: int | None = None
    ) -> None:
        """The store's news about other instances goes to the room it concerns."""
        if (open_room := self.rooms.get(room)) is not None:
            open_room.flush.observe(state=state, elsewhere=elsewhere)

    def _store_in_doubt(self, exc: Exception) -> None:
        """A commit's outcome is unknown: stop serving (see :exc:`StoreInDoubt`)."""
        self._fail(
            "the store cannot tell whether a change was applied "
            f"({type(exc).__name__}: {exc}); restart the server so that every client "
            "sees what was kept"
        )

    def _crashed(self, exc: BaseException) -> None:
        """A background task hit a bug (logged with its traceback): stop rather than go quiet."""
        self._fail(f"a bug stopped a background task ({type(exc).__name__}: {exc})")

    def _fail(self, why: str) -> None:
        if not self.failed.done():
            self.failed.set_result(why)

    # The way in, after the handshake.

    async def handler(self, websocket: Connection) -> None:
        """Serve one client after its handshake, in the room its request named."""
        request = websocket.request
        assert request is not None  # the handshake is done
        # Set by the HTTP side, which let only room paths through, and read
        # the address once.
        name, address, user = websocket.room, websocket.address, websocket.grant.user
        # process_request refused what it could; this closes the few that
        # passed it together during a storm of concurrent handshakes.
        refusal = self._over_a_cap(name, address, user)
        if refusal is not None:
            self.metrics.handshakes_rejected.labels(refusal.kind).inc()
            await websocket.close(CloseCode.TRY_AGAIN_LATER, refusal.reason)
            return
        self.connections += 1
        self.sweep.watch(websocket)
        self.gate.user_joined(address)
        limit = self.gate.users.join(user, websocket.loop.time())
        if name not in self.rooms:  # its store may take a while to open it
            websocket.release_response()  # so the handshake ends now, not then
        try:
            room = await self._enter(name)
        except StoreUnavailable as exc:
            self._unable_to_open(websocket, name, exc)
            await websocket.close(CloseCode.TRY_AGAIN_LATER, "store unavailable")
        else:
            # No await from this check to the register in serve(): the count is exact.
            self.occupied += not room.users
            try:
                await room.serve(websocket, limit)
            finally:
                self.occupied -= not room.users
        finally:
            self.connections -= 1
            self.sweep.forget(websocket)
            self.gate.user_left(address)
            self.gate.users.leave(user)
            self.collector.connection_closed(self.connections)

    def _unable_to_open(self, websocket: Connection, name: str, exc: StoreUnavailable) -> None:
        log.warning(
            "%s cannot join %s: %s",
            websocket.client,
            name,
            exc,
            extra=fields("store_unavailable", peer=websocket.client, room=name, reason=str(exc)),
        )

    async def _enter(self, name: str) -> Room:
        """The room called ``name``, opened on first use; the caller registers in it at once."""
        self.entering[name] += 1
        try:
            room = self.rooms.get(name)
            if room is None:
                opening = self.opening.get(name)
                if opening is None:
                    opening = self.opening[name] = asyncio.ensure_future(self._open(name))
                room = await asyncio.shield(opening)
            return room
        finally:
            self.entering[name] -= 1
            if not self.entering[name]:
                del self.entering[name]

    async def _open(self, name: str) -> Room:
        try:
            state = await self.store.load(name)
        finally:
            del self.opening[name]
        room = self.rooms[name] = Room(
            name,
            state,
            flusher=self.flusher,
            metrics=self.metrics,
            on_empty=self._release,
        )
        return room

    def _release(self, room: Room) -> None:
        """Forget a room nobody is in or entering; its value stays in the store."""
        if room.users or self.entering[room.name] or room.name == DEFAULT_ROOM:
            return
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            self.store.release(room.name)
