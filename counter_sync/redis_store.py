"""Share every room's counter and user count between instances through Redis: ``--redis URL``.

What shared mode promises, for each room, in the order a change goes through it:

* One order, one round trip. A room's counter lives in Redis. The hub's
  flush pass hands every room's change to :meth:`RedisStore.commit`, which
  applies all of them with one Lua script (``lua/commit.lua``): each room's
  delta, its sessions' ops by the rule of
  :func:`~counter_sync.store.apply_batch`, its new version, and the
  publication of its new state on the room's channel. Actions from every
  instance add up, in the one order Redis ran the scripts in.
* Within range. A room whose change would take the value beyond ±MAX_VALUE
  counts none of its deltas (``applied=False``); its ops are done all the
  same.
* Versions. Every room's ``seq`` is drawn from one counter for all rooms,
  so a room whose key was deleted or evicted never goes back: reading a
  missing room draws a new number, so it reads as 0 with a version newer
  than any it had. ``epoch`` names Redis's history; it is set once, by the
  first instance that finds none. Every script is given the epoch the
  instance believes in, and applies nothing if Redis's differs.
* Exactly once, with sessions. The last done op of each (room, session)
  lives in Redis, in a key of its own that expires ``session_ttl`` after its
  last write, and changes in the same script as the counter.
* Nothing missed. An instance subscribes to a room's channel when the room is
  loaded (its first user here joins), waits for Redis to confirm, and only
  then reads the room: a change published in between is in what is read or
  arrives afterwards, never neither. After an outage it does the same for
  every loaded room at once. Every state it hands the hub (returned by
  :meth:`~RedisStore.load` and :meth:`~RedisStore.commit`, or passed to
  :meth:`~counter_sync.store.Observer.observe`) belongs to the epoch it
  believes in.
* Data loss is seen, said and shown. A ``FLUSHALL``, a restart without
  persistence or the eviction of the history starts a new epoch: the first
  script to find the history gone draws it and publishes it on the epoch
  channel. Each instance that hears of it (there, from a script's reply, or
  on reconnecting) logs one warning, reads every room it has users in, and
  hands each room's new state to the hub, which shows it (and closes session
  connections with 1012: their op numbers belong to the old history). The
  commit that found it raises :exc:`~counter_sync.store.StoreUnavailable`,
  nothing applied. A room whose key alone was deleted or evicted is logged
  (once per interval per room) and read again; each instance checks for it
  at every renewal of its entry, so clients see the loss within a quarter of
  the expiry even if nobody clicks. Only the rooms with users here are
  checked, and their keys cannot expire (below): a key that expired or that
  the API forgot is no loss, and is not logged.
* Counters nobody uses are forgotten. Every key of a room (its state, users
  and users' version) expires: a change makes it live at least
  ``forget_after`` more (in the commit script), and while an instance has
  users in the room, each renewal of its entry makes them live at least
  ``forget_after + expiry`` more (in the probe script; a join does the same
  in the read). That is longer than three renewals, so a room with users
  keeps its keys; one that nobody changed, joined or left for
  ``forget_after`` is gone within ``forget_after + expiry``, from every
  instance's listing too. A forgotten room reads as 0 at a version newer
  than any it had. No script shortens an expiry: the instance that keeps a
  room longest decides.
* No work for rooms without users here. The subscription ends when the hub
  releases the room, so an instance receives only its rooms' changes.
* Users everywhere. Each instance keeps its user count per room in Redis, and
  its liveness in an entry that lapses at 3/4 of the expiry; it renews the
  entry four times per expiry and publishes count changes at once. A room
  shows the sum over live instances. One killed with ``kill -9`` stops counting
  in every room within the expiry, by Redis's clock (whoever prunes it reads
  the set of rooms it was in); one that stops cleanly leaves every room at once.
* Outages. While Redis is unreachable, commits raise StoreUnavailable, new
  rooms cannot be opened, and ``/readyz`` answers 503. The store reconnects
  with backoff, resubscribes, resyncs every loaded room, and the hub shows
  what Redis holds. One log line per outage.
* The API's calls. :meth:`~RedisStore.peek` reads a room without joining
  it; :meth:`~RedisStore.counters` scans Redis's keys (it keeps no index of
  them); :meth:`~RedisStore.forget` deletes a room's key and publishes its
  reset (0, with a new version, marked ``forgotten`` so that no instance
  takes it for a loss), keeping its sessions.
* Bounded stop. :meth:`RedisStore.close` returns within about
  :data:`~counter_sync.config.REDIS_STOP_TIMEOUT` seconds whatever Redis does
  (down, stopped, silent), even if a task swallows its cancellation.

A commit whose reply is lost (the connection broke after the script was sent)
may or may not have been applied. It is never retried: it raises
StoreUnavailable, so its senders are told "not applied". On reconnection (or
at a clean stop, if Redis answers) the store settles it before anything else
(``lua/settle.lua``): it marks the commit's number as used, so a delayed copy
can no longer apply; if it had been applied, it takes back each room's delta;
and either way it records its sessions' ops as done with no delta (last done
= max(last done, the batch's last op)), so that their later ops follow on. So
an error reply means "not counted", and no action counts twice. (Taking back
is exact even at the edge of the range: if others moved the value to the very
edge meanwhile, it can end up beyond it by that one commit's change.) An
instance commits one pass at a time, so at most one commit is in doubt.

The keys, ``counter-sync:`` first (``/`` keeps the names of the single-counter
version, so that a rolling upgrade goes on sharing it; a named room's are
``room:<name>:state`` and so on):

* ``history``: hash, ``epoch`` (the history's name) and ``seq`` (the one
  counter every room's version is drawn from), lost together or not at all;
  it never expires;
* ``state``: hash, the room's value and its version (seq); expiring as said
  above, like the two users keys;
* ``session:<epoch>:<session>``: the last done op of a session in the room,
  expiring ``session_ttl`` after its last write; the epoch in the name makes
  a new history start every session over, as the clients do;
* ``users``: hash, instance id -> its users in the room (gone when nobody is
  in it); ``users:seq``: bumped with every change to it;
* ``instances``: sorted set, instance id -> when its entry lapses (ms);
  ``alive``: the same for the single-counter version, which every instance
  keeps up too (that version prunes only ``/``);
* ``instance:<id>:rooms``: set, the rooms an instance has users in, for
  whoever prunes it; ``instance:<id>:gone``: it left, so a late script of
  its changes nothing; ``instance:<id>:commit``: hash, the number of its last
  commit, the last it settled, and what the last one added to each room;
* channels ``counter-sync:<db>:changes`` for ``/``,
  ``counter-sync:<db>:room:<name>`` for a named room, and
  ``counter-sync:<db>:epoch`` for a new history: pub/sub is not per database.

The scripts are the ``.lua`` files beside this module (package data), read
once at import.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.resources
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from counter_sync.config import (
    FORGET_AFTER,
    LOG_INTERVAL,
    MAX_VALUE,
    REDIS_COMMAND_TIMEOUT,
    REDIS_COMMIT_MEMORY,
    REDIS_DISCONNECT_TIMEOUT,
    REDIS_LAPSE_FRACTION,
    REDIS_LISTEN_POLL,
    REDIS_PART_TIMEOUT,
    REDIS_RECONNECT_FIRST,
    REDIS_RECONNECT_LAST,
    REDIS_RENEWALS_PER_EXPIRY,
    REDIS_SCAN_COUNT,
    REDIS_TASKS_STOP_TIMEOUT,
    SESSION_TTL,
)
from counter_sync.store import (
    DEFAULT_ROOM,
    Change,
    Observer,
    Outcome,
    RoomState,
    StoreError,
    StoreUnavailable,
    new_epoch,
    one_line,
)
from counter_sync.tasks import within

__all__ = ["HISTORY", "Commit", "RedisStore", "RoomKeys", "room_keys"]

log = logging.getLogger("counter_sync.redis_store")

_PREFIX = "counter-sync"
HISTORY = f"{_PREFIX}:history"  # hash: epoch, seq
_INSTANCES = f"{_PREFIX}:instances"  # sorted set: instance id -> when its entry lapses (ms)
_ALIVE = f"{_PREFIX}:alive"  # the same, for the single-counter version, which prunes only /

# Errors that mean "Redis cannot be used right now". A Lua error is a
# RedisError too: it leaves the store down rather than half-working.
# (TimeoutError is an OSError.)
_ERRORS = (RedisError, OSError)

# How an op's delta travels to the commit script: one character each.
_SIGNS = {1: "+", -1: "-", 0: "0"}


def _encode_deltas(deltas: tuple[int, ...]) -> str | list[int]:
    """A batch's deltas for lua/commit.lua: a byte per click, a list for the API's larger adds."""
    if all(delta in _SIGNS for delta in deltas):
        return "".join(_SIGNS[delta] for delta in deltas)
    return list(deltas)


# A state nobody was handed: the first real one replaces it (another epoch).
_UNKNOWN = RoomState(0, 0, "")


def _load_scripts() -> dict[str, str]:
    """The scripts' texts, each with the shared functions it uses in front."""
    folder = importlib.resources.files("counter_sync").joinpath("lua")

    def text(name: str) -> str:
        return folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")

    history, users_message, lifetime = text("history"), text("users_message"), text("lifetime")
    return {
        "commit": history + lifetime + text("commit"),
        "settle": history + lifetime + text("settle"),
        "read": history + users_message + lifetime + text("read"),
        "probe": history + lifetime + text("probe"),
        "forget": history + text("forget"),
        "users": users_message + lifetime + text("users"),
    }


_SCRIPTS = _load_scripts()


@dataclasses.dataclass(frozen=True)
class RoomKeys:
    """Where Redis keeps one room, and the channel its changes go to."""

    state: str
    users: str
    users_seq: str
    sessions: str  # a session's key: this, the epoch and the session id
    channel: str

    def session(self, epoch: str, session: str) -> str:
        return f"{self.sessions}:{epoch}:{session}"


def room_keys(room: str, db: int) -> RoomKeys:
    """The names of a room's keys; ``room_keys`` in ``lua/users.lua`` gives the same ones."""
    channels = f"{_PREFIX}:{db}"  # keys belong to a database; channels do not
    if room == DEFAULT_ROOM:  # the names the single-counter version used
        return RoomKeys(
            f"{_PREFIX}:state",
            f"{_PREFIX}:users",
            f"{_PREFIX}:users:seq",
            f"{_PREFIX}:session",
            f"{channels}:changes",
        )
    base = f"{_PREFIX}:room:{room}"
    return RoomKeys(
        f"{base}:state",
        f"{base}:users",
        f"{base}:users:seq",
        f"{base}:session",
        f"{channels}:room:{room}",
    )


@dataclasses.dataclass(frozen=True)
class Commit:
    """One commit of this instance: its number, the epoch it is sent in, and what it asks."""

    number: int
    epoch: str
    changes: tuple[Change, ...]


@dataclasses.dataclass
class _SharedRoom:
    """A loaded room as this instance knows it from Redis."""

    keys: RoomKeys
    # Whether the hub has the room: until load() returns, nothing is shown.
    opened: bool = False
    # The newest state known (in the epoch believed in), and the newest the
    # hub was handed (returned by load or commit, or passed to observe).
    state: RoomState = _UNKNOWN
    shown: RoomState = _UNKNOWN
    # Whether Redis held the room's key when last heard of: if it is gone
    # later, it was deleted or evicted. That is logged at most once per
    # LOG_INTERVAL (monotonic time of the next line allowed).
    exists: bool = False
    lost_log_at: float = 0.0
    # Users per live instance, as of the newest snapshot, and the count of
    # the other instances the hub was last handed.
    users: dict[str, int] = dataclasses.field(default_factory=dict)
    users_seq: int = 0
    shown_elsewhere: int = 0


@dataclasses.dataclass
class _Encoded:
    """Changes as the commit and settle scripts take them."""

    keys: list[str]
    rooms: list[list[Any]]
    # Per change: the index in KEYS (from 1, as in Lua) of each session's key.
    sessions: list[dict[int, str]]


class RedisStore:
    """Every room's counter and user count in Redis, shared by every instance that uses it.

    ``expiry`` is the number of seconds after which the users of an instance
    that died without closing stop counting on the others; ``session_ttl``
    how long a session's last done op is kept after its last op;
    ``forget_after`` how long a room nobody changed, joined or left is kept
    at least (and at most ``expiry`` longer).
    """

    def __init__(
        self,
        url: str,
        *,
        expiry: float,
        session_ttl: float = SESSION_TTL,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.url = url
        self.expiry = expiry
        self.session_ttl_ms = max(1, int(session_ttl * 1000))
        # A room's keys live this long after a change; while this instance
        # has users in it, this long plus the expiry, renewed (see probe()).
        self.forget_ms = max(1, int(forget_after * 1000))
        self.held_ms = max(1, int((forget_after + expiry) * 1000))
        self.instance = uuid.uuid4().hex[:16]  # this process, among the instances
        self.where = "Redis"  # host:port/db for messages: the URL may hold a password
        self.db = 0
        self.redis: Redis | None = None
        self.scripts: dict[str, AsyncScript] = {}
        self.observer: Observer | None = None
        self._epoch = ""  # the history this instance believes in; open() learns it
        self.rooms: dict[str, _SharedRoom] = {}  # loaded: the hub has users in them
        self.by_channel: dict[str, str] = {}
        # (Un)subscriptions for the listener to send, in the order asked for,
        # and the loads waiting for Redis to confirm theirs, oldest first.
        self.commands: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()
        self.confirmations: dict[str, collections.deque[asyncio.Future[None]]] = {}
        # This instance's users per room, and the rooms whose count Redis
        # has not been sent yet.
        self.here: dict[str, int] = {}
        self.unsent: set[str] = set()
        self.beat_now = asyncio.Event()
        # One commit at a time: so at most one is in doubt, and the commit
        # record in Redis describes it.
        self.committing = asyncio.Lock()
        self.commits = 0  # number of this instance's last commit
        self.in_doubt: Commit | None = None  # sent, reply lost, not settled yet
        # Reads that may move the epoch run one at a time, in order: the last
        # one answered is the newest truth.
        self.reading = asyncio.Lock()
        self.resync_all = False
        self.resync_rooms: set[str] = set()
        self.resync_task: asyncio.Task[None] | None = None
        self.up = False
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def epoch(self) -> str:
        """The history this instance believes Redis holds ("" until :meth:`open`)."""
        return self._epoch

    @property
    def _epoch_channel(self) -> str:
        return f"{_PREFIX}:{self.db}:epoch"

    @property
    def _record_key(self) -> str:
        """This instance's commit record (see ``lua/commit.lua``)."""
        return self._instance_key("commit")

    # The Store interface (see counter_sync.store.Store).

    async def open(self) -> None:
        """Connect, learn the epoch, register this instance and start following Redis.

        Raise :exc:`StoreError` with one line if the URL is bad or Redis cannot
        be used, so the server stops before serving anyone.
        """
        self.redis = self._open_client()
        pubsub: PubSub | None = None
        try:
            pubsub = await self._connect()
            await self._share_here(full=True)
        except _ERRORS as exc:
            if pubsub is not None:
                await _close_quietly(pubsub)
            await self.redis.aclose()
            raise StoreError(f"cannot use Redis at {self.where}: {one_line(exc)}") from None
        self.up = True
        self.tasks = [
            asyncio.create_task(self._follow(pubsub)),
            asyncio.create_task(self._beat()),
        ]
        log.info("sharing the counters through Redis at %s", self.where)

    async def load(self, room: str) -> RoomState:
        """Subscribe to the room's changes, then read it: someone here joins it.

        Raise :exc:`StoreUnavailable` while Redis is unreachable.
        """
        if not self.up:
            raise StoreUnavailable(self._unreachable())
        shared = self.rooms[room] = _SharedRoom(room_keys(room, self.db))
        self.by_channel[shared.keys.channel] = room
        confirmed = self._subscribe(shared.keys.channel)
        try:
            # Read only once Redis confirms: a change published before the
            # subscription took effect would otherwise be in neither.
            async with asyncio.timeout(REDIS_COMMAND_TIMEOUT):
                await confirmed
            epoch, [snapshot] = await self._read([room], keep=True)
            if epoch == self._epoch:
                self._replace(shared, epoch, snapshot, users=True)
            else:  # a new history (or this read is older than one taken meanwhile)
                await self._resync()
        except _ERRORS as exc:
            self.release(room)
            self.lost(exc)
            raise StoreUnavailable(self._unreachable()) from None
        if self.rooms.get(room) is not shared or shared.state.epoch != self._epoch:
            raise StoreUnavailable(self._unreachable())  # lost meanwhile: reconnecting
        shared.shown = shared.state
        shared.opened = True
        # The hub makes the room right after this returns: the users elsewhere
        # reach it once it exists, before anyone here is shown a count.
        asyncio.get_running_loop().call_soon(self._show, room)
        return shared.state

    async def commit(self, changes: Sequence[Change]) -> list[Outcome]:
        """Apply every room's change with one script, in one round trip; one outcome each.

        Raise :exc:`StoreUnavailable` if nothing was applied: at once while
        Redis is known to be down; when the script fails (then the reply may
        be all that was lost, and :meth:`_settle` sees to it); or when Redis
        holds another history than the one believed in (then the store
        resyncs every room, and the hub hears of the new states).
        """
        if not changes:
            return []
        async with self.committing:
            if not self.up:
                raise StoreUnavailable(self._unreachable())
            self.commits += 1
            commit = Commit(self.commits, self._epoch, tuple(changes))
            encoded = self.encode(changes, commit.epoch)
            # Whether each loaded room's key was there, as known when sent:
            # the state this very commit publishes may arrive before its reply.
            existed = {
                change.room: shared.exists
                for change in changes
                if (shared := self.rooms.get(change.room)) is not None
            }
            try:
                reply = await self.run_commit(commit, encoded)
            except _ERRORS as exc:
                self.in_doubt = commit
                self.lost(exc)
                raise StoreUnavailable(self._unreachable()) from None
            if reply[0] != "ok" or commit.epoch != self._epoch:
                # Redis lost its data: the history believed in is gone, and
                # with it whatever this commit would have added to it.
                self._start_resync()
                raise StoreUnavailable(f"Redis at {self.where} lost its data")
            return self._outcomes(changes, encoded, reply, commit.epoch, existed)

    def release(self, room: str) -> None:
        """Nobody here is in ``room`` any more: stop receiving its changes."""
        shared = self.rooms.pop(room, None)
        if shared is not None:
            del self.by_channel[shared.keys.channel]
            self.commands.put_nowait((False, shared.keys.channel))

    async def peek(self, room: str) -> tuple[RoomState, int]:
        """Read ``room`` without joining it: its state, and its users on the other instances.

        Raise :exc:`StoreUnavailable` while Redis is unreachable.
        """
        if not self.up:
            raise StoreUnavailable(self._unreachable())
        try:
            epoch, [snapshot] = await self._read([room], keep=False)
            if epoch != self._epoch:  # a new history: believe in it first
                await self._resync()
                epoch, [snapshot] = await self._read([room], keep=False)
        except _ERRORS as exc:
            self.lost(exc)
            raise StoreUnavailable(self._unreachable()) from None
        if epoch != self._epoch:
            raise StoreUnavailable(f"Redis at {self.where} lost its data")
        value, seq, _, users = snapshot
        counts = json.loads(users)["users"]
        elsewhere = sum(int(count) for who, count in counts.items() if who != self.instance)
        return RoomState(int(value), int(seq), epoch), elsewhere

    async def counters(self, prefix: str, after: str, limit: int) -> list[tuple[str, RoomState]]:
        """Up to ``limit`` counters by name: those starting with ``prefix``, after ``after``.

        Redis keeps no index of them: this scans its keys, a cost that grows
        with everything the database holds (fine for thousands of counters).
        Raise :exc:`StoreUnavailable` while Redis is unreachable.
        """
        if not self.up or self.redis is None:
            raise StoreUnavailable(self._unreachable())
        base = f"{_PREFIX}:room:"
        names = {DEFAULT_ROOM} if DEFAULT_ROOM.startswith(prefix) else set()
        page: list[tuple[str, RoomState]] = []
        try:
            pattern = f"{base}{_glob_escape(prefix)}*:state"
            async for key in self.redis.scan_iter(match=pattern, count=REDIS_SCAN_COUNT):
                names.add(key[len(base) : -len(":state")])
            candidates = sorted(name for name in names if name > after and ":" not in name)
            # Some may be gone by now: read as many more as it takes.
            for start in range(0, len(candidates), limit):
                chunk = candidates[start : start + limit]
                async with self.redis.pipeline(transaction=False) as pipeline:
                    pipeline.hget(HISTORY, "epoch")
                    for name in chunk:
                        pipeline.hmget(room_keys(name, self.db).state, ["value", "seq"])
                    epoch, *states = await pipeline.execute()
                if epoch != self._epoch:
                    self._start_resync()
                    raise StoreUnavailable(f"Redis at {self.where} lost its data")
                for name, (value, seq) in zip(chunk, states, strict=True):
                    if value is not None and len(page) < limit:
                        page.append((name, RoomState(int(value), int(seq or 0), epoch)))
                if len(page) == limit:
                    break
        except _ERRORS as exc:
            self.lost(exc)
            raise StoreUnavailable(self._unreachable()) from None
        return page

    async def forget(self, room: str) -> RoomState:
        """Reset ``room`` to 0 and forget it (its key goes); its sessions are kept.

        The new state takes a new version, so it replaces whatever anyone
        shows. Raise :exc:`StoreUnavailable` if it was not done, or if the
        reply was lost (then it may have been: forgetting again is harmless).
        """
        if not self.up:
            raise StoreUnavailable(self._unreachable())
        keys, epoch = room_keys(room, self.db), self._epoch
        try:
            reply: list[Any] = await self.scripts["forget"](
                keys=[HISTORY, keys.state],
                args=[epoch, new_epoch(), self._epoch_channel, keys.channel],
            )
        except _ERRORS as exc:
            self.lost(exc)
            raise StoreUnavailable(f"{self._unreachable()}; it may or may not be reset") from None
        if reply[0] != "ok" or epoch != self._epoch:
            self._start_resync()
            raise StoreUnavailable(f"Redis at {self.where} lost its data")
        state = RoomState(0, int(reply[1]), epoch)
        if (shared := self.rooms.get(room)) is not None:
            shared.exists = False
            shared.state = _newest(shared.state, state)
            shared.shown = _newest(shared.shown, state)  # the caller shows it
        return state

    def can_open(self, room: str) -> bool:
        return True  # Redis keeps any number of rooms; the hub caps those in use

    def healthy(self) -> bool:
        """True while connected and in sync; False from an error to the resync."""
        return self.up

    async def close(self) -> None:
        """Leave every room's user count at once (not at the expiry) and disconnect.

        Returns within about :data:`~counter_sync.config.REDIS_STOP_TIMEOUT`
        seconds whatever Redis does: every wait is bounded, and a task that
        swallows its cancellation is left to end by itself (the ``stopping``
        flag ends its loop).
        """
        self.stopping = True
        tasks, self.tasks = self.tasks, []
        if self.resync_task is not None:
            tasks.append(self.resync_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=REDIS_TASKS_STOP_TIMEOUT)
        redis, self.redis = self.redis, None
        if redis is None:
            return  # closed already, or never opened
        self.up = False
        await within(REDIS_PART_TIMEOUT, self._part(), quiet=True)
        if self.in_doubt is not None:
            log.warning(
                "stopping with a commit whose reply was lost not settled: Redis may "
                "count actions whose senders were told they were not applied"
            )
        await within(REDIS_DISCONNECT_TIMEOUT, redis.aclose(), quiet=True)

    def watch(self, observer: Observer) -> None:
        """Tell ``observer`` from now on what the other instances change."""
        self.observer = observer
        for room in self.rooms:
            self._show(room)

    def share_users(self, room: str, here: int) -> None:
        """Publish this instance's user count in ``room`` soon, coalescing quick changes."""
        if self.here.get(room, 0) == here:
            return
        if here:
            self.here[room] = here
        else:
            del self.here[room]
        self.unsent.add(room)
        self.beat_now.set()

    # Commits: what the script is given, and what it answers.

    def encode(self, changes: Iterable[Change], epoch: str) -> _Encoded:
        """The keys and the JSON of ``lua/commit.lua`` for ``changes`` in ``epoch``."""
        keys = [HISTORY, self._record_key]
        rooms: list[list[Any]] = []
        sessions: list[dict[int, str]] = []
        for change in changes:
            names = room_keys(change.room, self.db)
            keys.append(names.state)
            state = len(keys)
            index: dict[str, int] = {}
            for session in (*(batch.session for batch in change.ops), *change.lookups):
                if session not in index:
                    keys.append(names.session(epoch, session))
                    index[session] = len(keys)
            batches = [
                [index[batch.session], batch.first, _encode_deltas(batch.deltas)]
                for batch in change.ops
            ]
            lookups = [index[session] for session in change.lookups]
            set_to = [] if change.set_to is None else [change.set_to]
            rooms.append([state, names.channel, change.delta, batches, lookups, set_to])
            sessions.append({position: session for session, position in index.items()})
        return _Encoded(keys, rooms, sessions)

    def _outcomes(
        self,
        changes: Sequence[Change],
        encoded: _Encoded,
        reply: list[Any],
        epoch: str,
        believed: dict[str, bool],
    ) -> list[Outcome]:
        """Read the commit script's reply; note what it says of each loaded room.

        ``believed``: whether each loaded room's key was there, as known when
        the commit was sent; one the script found missing was lost.
        """
        outcomes = []
        at = 1
        for change, sessions in zip(changes, encoded.sessions, strict=True):
            value, seq, applied, existed, exists, count = reply[at : at + 6]
            at += 6
            done = {}
            for _ in range(count):
                position, before, after = reply[at : at + 3]
                at += 3
                done[sessions[position]] = (int(before), int(after))
            state = RoomState(int(value), int(seq), epoch)
            outcomes.append(Outcome(state, bool(applied), done))
            shared = self.rooms.get(change.room)
            if shared is not None:
                if believed.get(change.room, False) and not existed:
                    self._room_lost(shared, change.room)
                if not shared.state.is_newer_than(state):  # nothing newer came meanwhile
                    shared.exists = bool(exists)
                shared.state = _newest(shared.state, state)
                shared.shown = _newest(shared.shown, state)  # the hub takes the outcome
        return outcomes

    async def _settle(self) -> None:
        """Make sure a commit whose reply was lost does not count (see the module doc)."""
        doubt = self.in_doubt
        if doubt is None:
            return
        reply, encoded = await self.run_settle(doubt)
        self.in_doubt = None
        if reply[0] == "ok" and reply[1]:
            taken = {
                encoded.keys[int(reply[at]) - 1]: int(reply[at + 1])
                for at in range(2, len(reply), 2)
            }
            log.warning(
                "a commit whose reply was lost had been applied; taken back, as its "
                "senders were told it failed: %s",
                ", ".join(
                    f"{delta:+d} in {change.room}"
                    for change in doubt.changes
                    if (delta := taken.get(room_keys(change.room, self.db).state, 0))
                )
                or "no change to any value",
            )

    # The scripts that change counters, each run in one place.

    async def run_commit(self, commit: Commit, encoded: _Encoded) -> list[Any]:
        """Run ``lua/commit.lua`` for ``commit`` (``encoded`` from :meth:`encode`); its reply."""
        reply: list[Any] = await self.scripts["commit"](
            keys=encoded.keys,
            args=[
                commit.epoch,
                new_epoch(),
                self._epoch_channel,
                commit.number,
                MAX_VALUE,
                self.session_ttl_ms,
                int(REDIS_COMMIT_MEMORY * 1000),
                json.dumps(encoded.rooms),
                self.forget_ms,
            ],
        )
        return reply

    async def run_settle(self, doubt: Commit) -> tuple[list[Any], _Encoded]:
        """Run ``lua/settle.lua`` for a commit in doubt; its reply, and its keys."""
        encoded = self.encode(doubt.changes, doubt.epoch)
        rooms = []
        for change, room, sessions in zip(
            doubt.changes, encoded.rooms, encoded.sessions, strict=True
        ):
            last: dict[str, int] = {}
            for batch in change.ops:
                last[batch.session] = max(last.get(batch.session, 0), batch.last)
            ops = [
                [position, last[session]]
                for position, session in sessions.items()
                if session in last
            ]
            rooms.append([room[0], room[1], ops])
        reply: list[Any] = await self.scripts["settle"](
            keys=encoded.keys,
            args=[
                doubt.epoch,
                new_epoch(),
                self._epoch_channel,
                doubt.number,
                self.session_ttl_ms,
                int(REDIS_COMMIT_MEMORY * 1000),
                json.dumps(rooms),
                self.forget_ms,
            ],
        )
        return reply, encoded

    # Connecting, and keeping in sync.

    def _open_client(self) -> Redis:
        """A client for the URL, or :exc:`StoreError` saying what is wrong with it."""
        parts = urlsplit(self.url)
        database = parts.path.strip("/")
        # redis-py would quietly take database 0 for this.
        if parts.scheme != "unix" and database and not database.isdigit():
            raise StoreError(f"--redis: the database must be a number, not {database!r}")
        try:
            redis = Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=REDIS_COMMAND_TIMEOUT,
                socket_connect_timeout=REDIS_COMMAND_TIMEOUT,
                # No hidden retries: a script retried after its reply was lost
                # would count twice. The store settles such a commit instead.
                retry=Retry(NoBackoff(), 0),
                client_name=f"{_PREFIX}:{self.instance}",
            )
        except ValueError as exc:
            raise StoreError(f"--redis: not a usable Redis URL: {exc}") from None
        options = redis.connection_pool.connection_kwargs
        self.db = int(options.get("db") or 0)
        if options.get("path"):
            self.where = f"{options['path']} (db {self.db})"
        else:
            self.where = (
                f"{options.get('host') or 'localhost'}:{options.get('port') or 6379}/{self.db}"
            )
        self.scripts = {name: redis.register_script(text) for name, text in _SCRIPTS.items()}
        return redis

    async def _connect(self) -> PubSub:
        """Subscribe to the epoch and every loaded room, then settle and read: missing nothing."""
        assert self.redis is not None
        # Commands queued for an earlier connection are moot: this one
        # subscribes to what is loaded now, and later changes queue here.
        self.commands = asyncio.Queue()
        channels = [self._epoch_channel, *(shared.keys.channel for shared in self.rooms.values())]
        pubsub = self.redis.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            await pubsub.subscribe(*channels)
            await _subscriptions_confirmed(pubsub, len(channels))
            await self._settle()
            await self._resync(users=True)
        except BaseException:
            await _close_quietly(pubsub)
            raise
        return pubsub

    async def _read(
        self, rooms: list[str], *, keep: bool
    ) -> tuple[str, list[tuple[str, str, int, str]]]:
        """Redis's epoch, and each room's (value, seq, exists, users message), read in one step.

        ``keep``: someone is in these rooms here, so their keys must outlive
        the next renewal (see :meth:`probe`).
        """
        keys = [HISTORY]
        for room in rooms:
            keys += self._room_key_names(room)
        flat: list[Any] = await self.scripts["read"](
            keys=keys, args=[new_epoch(), self._epoch_channel, self.held_ms if keep else ""]
        )
        snapshots = [
            (flat[i], flat[i + 1], int(flat[i + 2]), flat[i + 3]) for i in range(1, len(flat), 4)
        ]
        return flat[0], snapshots

    async def _resync(self, rooms: Iterable[str] | None = None, *, users: bool = False) -> None:
        """Read ``rooms`` (every loaded room by default) and hand the hub what changed.

        Reads that may move the epoch run one at a time, so the newest read
        wins. A new epoch is logged once and makes every loaded room read
        again. ``users``: take the counts read even if their version is lower
        (after an outage: Redis may have lost them).
        """
        async with self.reading:
            names = list(self.rooms if rooms is None else (r for r in rooms if r in self.rooms))
            epoch, snapshots = await self._read(names, keep=True)
            if epoch != self._epoch:
                self._new_history(epoch)
                if rooms is not None:
                    names = list(self.rooms)
                    epoch, snapshots = await self._read(names, keep=True)
                    if epoch != self._epoch:
                        self._new_history(epoch)
                users = True
            for room, snapshot in zip(names, snapshots, strict=True):
                if (shared := self.rooms.get(room)) is not None:
                    self._replace(shared, epoch, snapshot, users=users)
                    self._show(room)

    def _new_history(self, epoch: str) -> None:
        """Redis holds another history than the one believed in: say so once, start over."""
        if self._epoch:
            log.warning(
                "Redis at %s lost its data (FLUSHALL, a restart without persistence, or "
                "an eviction): a new history begins; every counter shows what Redis "
                "holds now (%d room(s) here)",
                self.where,
                len(self.rooms),
                extra={"event": "store_data_lost", "reason": "new epoch"},
            )
        self._epoch = epoch
        # What was in doubt belonged to the lost history, and went with it.
        self.in_doubt = None
        for shared in self.rooms.values():
            shared.state = _UNKNOWN
            shared.users_seq = 0

    def _start_resync(self, rooms: Iterable[str] | None = None) -> None:
        """Read ``rooms`` (every loaded room by default) again soon, in a task of its own."""
        if rooms is None:
            self.resync_all = True
        else:
            self.resync_rooms.update(rooms)
        if self.resync_task is None and not self.stopping:
            self.resync_task = asyncio.create_task(self._resyncing())

    async def _resyncing(self) -> None:
        try:
            while (self.resync_all or self.resync_rooms) and self.up and not self.stopping:
                rooms = None if self.resync_all else list(self.resync_rooms)
                self.resync_all, self.resync_rooms = False, set()
                await self._resync(rooms)
        except Exception as exc:
            if not isinstance(exc, _ERRORS):
                log.exception("unexpected error while reading Redis again")
            self.lost(exc)  # the reconnection reads every room
        finally:
            self.resync_task = None

    def _replace(
        self, shared: _SharedRoom, epoch: str, snapshot: tuple[str, str, int, str], *, users: bool
    ) -> None:
        """Take a room read from Redis, unless what is known is newer."""
        value, seq, exists, users_message = snapshot
        state = RoomState(int(value), int(seq), epoch)
        if state.is_newer_than(shared.state):
            shared.state = state
            shared.exists = bool(exists)
        message = json.loads(users_message)
        if users or int(message["seq"]) > shared.users_seq:
            self._replace_users(shared, message)

    def _room_lost(self, shared: _SharedRoom, room: str) -> None:
        """Redis no longer holds a room it held: say so, at most once per interval."""
        now = time.monotonic()
        if now < shared.lost_log_at:
            return
        shared.lost_log_at = now + LOG_INTERVAL
        log.warning(
            "Redis lost the counter of %s (its key was deleted or evicted): it counts from 0 again",
            room,
            extra={"event": "store_data_lost", "room": room, "reason": "key missing"},
        )

    def _subscribe(self, channel: str) -> asyncio.Future[None]:
        """Queue a SUBSCRIBE; the future is done once Redis confirms this one."""
        confirmed = asyncio.get_running_loop().create_future()
        self.confirmations.setdefault(channel, collections.deque()).append(confirmed)
        self.commands.put_nowait((True, channel))
        return confirmed

    async def _send_subscriptions(
        self, pubsub: PubSub, commands: asyncio.Queue[tuple[bool, str]]
    ) -> None:
        """Send the queued (un)subscriptions in order: a leave then a rejoin stays subscribed."""
        while True:
            subscribe, channel = await commands.get()
            try:
                if subscribe:
                    await pubsub.subscribe(channel)
                else:
                    await pubsub.unsubscribe(channel)
            except _ERRORS as exc:
                self.lost(exc)
                return

    def _confirm(self, channel: str) -> None:
        """Redis confirmed a SUBSCRIBE: it answers them in order, so the oldest one waiting."""
        waiting = self.confirmations.get(channel)
        if not waiting:
            return
        confirmed = waiting.popleft()
        if not waiting:
            del self.confirmations[channel]
        if not confirmed.done():
            confirmed.set_result(None)

    async def _follow(self, pubsub: PubSub | None) -> None:
        """Apply other instances' changes as they arrive; after an outage, reconnect."""
        delay = REDIS_RECONNECT_FIRST
        try:
            while not self.stopping:
                try:
                    if pubsub is None:
                        pubsub = await self._connect()
                        self._recovered()
                        delay = REDIS_RECONNECT_FIRST
                    await self._listen(pubsub)
                except Exception as exc:
                    # Whatever went wrong, this task must go on: it is the
                    # one that brings the store back.
                    if not isinstance(exc, _ERRORS):
                        log.exception("unexpected error while following Redis")
                    self.lost(exc)
                if pubsub is not None:
                    await _close_quietly(pubsub)
                    pubsub = None
                if self.stopping:
                    break
                # Jitter, so instances do not all knock at the same moment.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, REDIS_RECONNECT_LAST)
        finally:
            if pubsub is not None:
                await _close_quietly(pubsub)

    async def _listen(self, pubsub: PubSub) -> None:
        """Take in what arrives, and send the queued (un)subscriptions, until Redis fails."""
        sender = asyncio.create_task(self._send_subscriptions(pubsub, self.commands))
        try:
            while self.up and not self.stopping:
                message = await pubsub.get_message(timeout=REDIS_LISTEN_POLL)
                if message is None:
                    continue
                if message["type"] == "message":
                    self._receive_published(message["channel"], message["data"])
                elif message["type"] == "subscribe":
                    self._confirm(message["channel"])
        finally:
            sender.cancel()

    async def _beat(self) -> None:
        """Renew this instance's entry and check that Redis holds its rooms, four times per expiry.

        Count changes are sent at once, and renew the entry too; the check
        runs on time however often they come.
        """
        loop = asyncio.get_running_loop()
        interval = self.expiry / REDIS_RENEWALS_PER_EXPIRY
        due = loop.time() + interval
        while not self.stopping:
            # asyncio.timeout, not wait_for: in Python 3.11, wait_for can swallow
            # a cancellation that races with the event, and close() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self.beat_now.wait()
            self.beat_now.clear()
            check = loop.time() >= due
            if check or not self.up:
                due = loop.time() + interval
            if not self.up:
                continue  # recovered() wakes this task
            rooms, self.unsent = self.unsent, set()
            try:
                await self._share_here(rooms=rooms)
                if check:
                    await self.probe()
            except _ERRORS as exc:
                self.unsent |= rooms
                self.lost(exc)

    async def _share_here(self, *, rooms: Iterable[str] = (), full: bool = False) -> None:
        """Send this instance's counts in ``rooms`` (every room if ``full``) and renew its entry."""
        reply = await self._run_users_script(self.here if full else rooms, full=full)
        if reply[0] and not full:
            # Pruned during an outage, or Redis lost its data: send it all.
            reply = await self._run_users_script(self.here, full=True)
        for index in range(1, len(reply), 2):
            room, message = reply[index], reply[index + 1]
            if (shared := self.rooms.get(room)) is not None:
                self._receive(shared, json.loads(message))
                self._show(room)

    async def probe(self) -> None:
        """Check that Redis holds the history and the rooms' keys it held; resync if not.

        Every loaded room's keys are made to live ``forget_after +
        expiry`` from now: longer than the next three renewals, so they
        never expire while someone is in the room here, and a room left (or
        whose instance died) is forgotten within that long. So a key found
        missing was lost (deleted, evicted), not expired.
        """
        rooms = list(self.rooms)
        keys = [HISTORY]
        for room in rooms:
            keys += self._room_key_names(room)
        held = "".join("1" if self.rooms[room].exists else "0" for room in rooms)
        reply: list[Any] = await self.scripts["probe"](
            keys=keys, args=[new_epoch(), self._epoch_channel, self.held_ms, held]
        )
        if reply[0] != self._epoch:
            self._start_resync()
            return
        lost = [rooms[int(position) - 1] for position in reply[1:]]
        for room in lost:
            if (shared := self.rooms.get(room)) is not None and shared.exists:
                shared.exists = False
                self._room_lost(shared, room)
        if lost:
            self._start_resync(lost)

    async def _part(self) -> None:
        """What a clean stop owes the others: settle what is in doubt, leave every room."""
        await asyncio.gather(
            self._settle(), self._run_users_script(leave=True), return_exceptions=True
        )

    async def _run_users_script(
        self, rooms: Iterable[str] = (), *, full: bool = False, leave: bool = False
    ) -> list[Any]:
        """Renew (or remove) this instance's entry and send its counts in ``rooms``."""
        counts = [str(item) for room in rooms for item in (room, self.here.get(room, 0))]
        reply: list[Any] = await self.scripts["users"](
            keys=[_INSTANCES, _ALIVE, self._instance_key("rooms"), self._instance_key("gone")],
            args=[
                _PREFIX,
                f"{_PREFIX}:{self.db}",
                self.instance,
                "" if leave else int(self.expiry * REDIS_LAPSE_FRACTION * 1000),
                int(full),
                # Long enough for any script of this instance still on its way.
                int(REDIS_COMMIT_MEMORY * 1000),
                self.held_ms,
                self.forget_ms,
                *counts,
            ],
        )
        return reply

    def lost(self, exc: BaseException) -> None:
        """Redis failed: reject actions and loads until the listener has resynced."""
        if self.up:  # one line per outage, not one per action
            log.warning(
                "Redis at %s is unreachable, rejecting actions until it is back: %s",
                self.where,
                one_line(exc),
                extra={"event": "store_unavailable", "reason": one_line(exc)},
            )
        self.up = False
        # Loads waiting for a confirmation on this connection will not get one.
        for waiting in self.confirmations.values():
            for confirmed in waiting:
                if not confirmed.done():
                    confirmed.set_exception(ConnectionError("Redis connection lost"))
        self.confirmations.clear()

    def _recovered(self) -> None:
        self.up = True
        log.info("Redis at %s is back: resynced %d room(s)", self.where, len(self.rooms))
        self.beat_now.set()  # counts that changed meanwhile
        for room in self.rooms:
            self._show(room)

    def _unreachable(self) -> str:
        return f"Redis at {self.where} is unreachable"

    # What arrives: replies and published messages, in any order.

    def _receive_published(self, channel: str, data: str) -> None:
        if channel == self._epoch_channel:
            if data != self._epoch:
                self._start_resync()  # a new history: see what Redis holds now
            return
        room = self.by_channel.get(channel)
        if room is None:
            return  # released since; the unsubscription is on its way
        try:
            self._receive(self.rooms[room], json.loads(data))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", channel)
            return
        self._show(room)

    def _receive(self, shared: _SharedRoom, message: dict[str, Any]) -> None:
        """Keep what is newer than what is known; ignore what is not."""
        if message["type"] == "state":
            # The single-counter version's messages have no epoch: it shares ours.
            epoch = message.get("epoch", self._epoch)
            if epoch != self._epoch:
                self._start_resync()  # a new history, or one already left behind
                return
            state = RoomState(int(message["value"]), int(message["seq"]), epoch)
            if state.is_newer_than(shared.state):
                shared.state = state
                shared.exists = not message.get("forgotten", False)
        elif message["type"] == "users" and int(message["seq"]) > shared.users_seq:
            self._replace_users(shared, message)

    def _replace_users(self, shared: _SharedRoom, message: dict[str, Any]) -> None:
        shared.users_seq = int(message["seq"])
        shared.users = {instance: int(count) for instance, count in message["users"].items()}

    def _show(self, room: str) -> None:
        """Hand the hub what changed in ``room`` since it was last told."""
        shared = self.rooms.get(room)
        if self.observer is None or shared is None or not shared.opened:
            return
        state = shared.state
        if state.epoch == self._epoch and state.is_newer_than(shared.shown):
            shared.shown = state
            self.observer.observe(room, state=state)
        elsewhere = sum(count for who, count in shared.users.items() if who != self.instance)
        if elsewhere != shared.shown_elsewhere:
            shared.shown_elsewhere = elsewhere
            self.observer.observe(room, elsewhere=elsewhere)

    def _instance_key(self, what: str) -> str:
        return f"{_PREFIX}:instance:{self.instance}:{what}"

    def _room_key_names(self, room: str) -> list[str]:
        """The keys of ``room`` that the read and probe scripts take, in their order."""
        names = room_keys(room, self.db)
        return [names.state, names.users, names.users_seq]


def _newest(known: RoomState, state: RoomState) -> RoomState:
    return state if state.is_newer_than(known) else known


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


async def _subscriptions_confirmed(pubsub: PubSub, count: int) -> None:
    """Wait for Redis to confirm ``count`` subscriptions; what is published meanwhile is read."""
    async with asyncio.timeout(REDIS_COMMAND_TIMEOUT):
        while count:
            message = await pubsub.get_message(timeout=REDIS_COMMAND_TIMEOUT)
            if message is not None and message["type"] == "subscribe":
                count -= 1


async def _close_quietly(pubsub: PubSub) -> None:
    """Drop a subscription's connection; Redis forgets the subscriptions with it."""
    await within(REDIS_DISCONNECT_TIMEOUT, pubsub.aclose(), quiet=True)
