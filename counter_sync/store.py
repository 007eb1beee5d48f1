"""Where the counters live: the interface every store implements, and the default one.

The hub calls a store once per flush of a room, never per action. Three stores
implement it: :class:`MemoryStore` below (the default and the model),
:mod:`counter_sync.sqlite_store` (``--state``: durable) and
:mod:`counter_sync.redis_store` (``--redis``: shared by several instances).
Stores import this module and :mod:`counter_sync.config`, nothing else of the
server, so imports go one way: the server knows the stores, the stores know
only this interface.

A counter is named by its room: ``"/"`` (:data:`DEFAULT_ROOM`) is the one at
``/``, and ``"votes"`` the one at ``/c/votes``.
"""

from __future__ import annotations

from typing import Protocol

from counter_sync.config import MAX_VALUE

__all__ = [
    "DEFAULT_ROOM",
    "MemoryStore",
    "Observer",
    "OutOfRange",
    "Store",
    "StoreError",
    "StoreInDoubt",
    "StoreUnavailable",
]

DEFAULT_ROOM = "/"  # the counter at /, the one every version of the server had


class StoreUnavailable(Exception):
    """The store did not apply a change; nothing of it was counted.

    The text is the reason the senders are given, e.g. "store unavailable".
    """


class OutOfRange(StoreUnavailable):
    """The change would take the value beyond ±MAX_VALUE; it was not applied."""

    def __init__(self) -> None:
        super().__init__("value out of range")


class StoreInDoubt(Exception):
    """A change may or may not have been applied (say, fsync failed), and nobody can tell.

    The server must not answer "not applied" then: it stops, with one line for
    the operator, so that clients reconnect to a restarted server and see the
    truth.
    """


class StoreError(Exception):
    """The store cannot be opened at start-up; the text is one line for the operator."""


class Observer(Protocol):
    """Who a shared store tells what the other instances did (the hub)."""

    def observe(self, room: str, *, value: int | None = None, elsewhere: int | None = None) -> None:
        """Learn the newest value of ``room`` another instance committed, or its users there."""


class Store(Protocol):
    """Where the counters are kept, and how their changes reach other instances.

    A store that other instances change too (``--redis``) reports what they
    did to the observer given to :meth:`watch`, for the rooms it was asked to
    :meth:`load` and not yet to :meth:`release`. Its ``add`` returns the newest
    value it knows, and it never reports a room's value while an ``add`` to
    that room runs: so an observed value is never older than one the hub
    committed. A local store never calls the observer.
    """

    async def open(self) -> None:
        """Get ready at start-up; raise :exc:`StoreError` with one line if it cannot."""

    async def load(self, room: str) -> int:
        """Return the value of ``room`` (0 for a new one): someone joins it here."""

    async def add(self, room: str, delta: int) -> int:
        """Apply the net change of one flush atomically; return the room's new value.

        Raise :exc:`StoreUnavailable` if the change was not applied (and
        :exc:`OutOfRange` if it would leave ±MAX_VALUE), :exc:`StoreInDoubt` if
        nobody can tell.
        """

    def release(self, room: str) -> None:
        """Nobody here watches ``room`` any more: stop doing work for it."""

    def has_room_for(self, room: str) -> bool:
        """Tell whether ``room`` can be opened now (a memory store keeps a bounded number)."""

    def healthy(self) -> bool:
        """Tell whether changes can be applied right now (for ``/healthz``)."""

    async def close(self) -> None:
        """Release the store; pending changes were already applied by ``add``."""

    def watch(self, observer: Observer) -> None:
        """Report the other instances' changes to ``observer`` from now on."""

    def share_users(self, room: str, here: int) -> None:
        """Count the ``here`` users of ``room`` on this instance on every instance."""


class MemoryStore:
    """The default store: the values live in this process and die with it.

    It keeps at most ``max_counters`` values. A counter that is back at 0 when
    its last user leaves is forgotten: it reads as 0 anyway.
    """

    def __init__(self, *, max_counters: int) -> None:
        self.values: dict[str, int] = {}
        self.max_counters = max_counters

    async def open(self) -> None:
        pass

    async def load(self, room: str) -> int:
        return self.values.setdefault(room, 0)

    async def add(self, room: str, delta: int) -> int:
        value = self.values.get(room, 0) + delta
        if abs(value) > MAX_VALUE:
            raise OutOfRange
        self.values[room] = value
        return value

    def release(self, room: str) -> None:
        if self.values.get(room) == 0:
            del self.values[room]

    def has_room_for(self, room: str) -> bool:
        return room in self.values or len(self.values) < self.max_counters

    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    def watch(self, observer: Observer) -> None:
        pass  # nobody else changes these counters

    def share_users(self, room: str, here: int) -> None:
        pass
