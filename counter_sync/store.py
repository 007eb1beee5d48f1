"""Where the counter lives: the interface every store implements, and the default one.

The hub calls a store once per flush, never per action. Three stores implement
it: :class:`MemoryStore` below (the default and the model),
:mod:`counter_sync.sqlite_store` (``--state``: durable) and
:mod:`counter_sync.redis_store` (``--redis``: shared by several instances).
Stores import this module and nothing else of the server, so imports go one
way: the server knows the stores, the stores know only this interface.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MemoryStore", "Observer", "Store", "StoreError", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store could not apply a change; nothing of it was counted."""


class StoreError(Exception):
    """The store cannot be opened at start-up; the text is one line for the operator."""


class Observer(Protocol):
    """Who a shared store tells what the other instances did (the hub)."""

    def observe(self, *, value: int | None = None, elsewhere: int | None = None) -> None:
        """Learn the newest value another instance committed, or their user count."""


class Store(Protocol):
    """Where the counter is kept, and how its changes reach other instances.

    A store that other instances change too (``--redis``) reports what they
    did to the observer given to :meth:`watch`. Its ``add`` returns the newest
    value it knows, and it never reports a value while ``add`` runs: so an
    observed value is never older than one the hub committed. A local store
    never calls the observer.
    """

    async def load(self) -> int:
        """Return the counter's current value (called once, at start-up)."""

    async def add(self, delta: int) -> int:
        """Apply the net change of one flush atomically; return the new value.

        Raise :exc:`StoreUnavailable` if the change was not applied.
        """

    def healthy(self) -> bool:
        """Tell whether changes can be applied right now (for ``/healthz``)."""

    async def close(self) -> None:
        """Release the store; pending changes were already applied by ``add``."""

    def watch(self, observer: Observer) -> None:
        """Report the other instances' changes to ``observer`` from now on."""

    def share_users(self, here: int) -> None:
        """Count the ``here`` users of this instance on every instance."""


class MemoryStore:
    """The default store: the value lives in this process and dies with it."""

    def __init__(self) -> None:
        self.value = 0

    async def load(self) -> int:
        return self.value

    async def add(self, delta: int) -> int:
        self.value += delta
        return self.value

    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    def watch(self, observer: Observer) -> None:
        pass  # nobody else changes this counter

    def share_users(self, here: int) -> None:
        pass
