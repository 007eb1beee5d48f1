"""Share every room's counter and user count between instances through Redis: ``--redis URL``.

What shared mode promises, for each room, in the order a change goes through it:

* One order. A room's counter lives in Redis. Each instance applies the net
  change of one flush with one Lua script that adds it, bumps the room's
  sequence number and publishes the new ``{value, seq}`` on the room's
  channel: actions from every instance add up, and each value carries its
  place in the one order Redis applied them in.
* Within range. The script refuses a change that would take the value beyond
  ±MAX_VALUE, and applies nothing of it (:exc:`~counter_sync.store.OutOfRange`).
* No reordering. An instance keeps, per room, the value with the highest
  sequence number it has seen; an older message is ignored. The hub learns of
  it through :meth:`counter_sync.store.Observer.observe` and shows it in the
  room's next flush, the one place where its value changes.
* Nothing missed. An instance subscribes to a room's channel when the room is
  loaded (its first user here joins), waits for Redis to confirm, and only
  then reads the room: a change published in between is in what is read or
  arrives afterwards, never neither. After an outage it does the same for
  every loaded room at once.
* No work for rooms without users here. The subscription ends when the hub
  releases the room, so an instance receives only its rooms' changes.
* Users everywhere. Each instance keeps its user count per room in Redis, and
  its liveness in an entry that lapses at 3/4 of the expiry; it renews the
  entry four times per expiry and publishes count changes at once. A room
  shows the sum over live instances. One killed with ``kill -9`` stops counting
  in every room within the expiry, by Redis's clock (whoever prunes it reads
  the set of rooms it was in); one that stops cleanly leaves every room at once.
* Outages. While Redis is unreachable, actions get an error reply, new rooms
  cannot be opened, and ``/readyz`` answers 503. The store reconnects with
  backoff, resubscribes, resyncs every loaded room, and the hub shows what
  Redis holds. One log line per outage.
* Bounded stop. :meth:`RedisStore.close` returns within about
  :data:`STOP_TIMEOUT` seconds whatever Redis does (down, stopped, silent),
  even if a task swallows its cancellation.

A flush whose reply is lost (the connection broke after the script was sent)
may or may not have been applied. It is never retried: its senders get an
error reply, like any action that was not applied. On reconnection (or at a
clean stop, if Redis answers) the store settles it before anything else: it
marks the flush number as used in that room, so a delayed copy can no longer
apply, and if it had been applied, takes it back. So an error reply means
"not counted", and no action counts twice. (Taking back is exact even at the
edge of the range: if others moved the value to the very edge meanwhile, it
can end up beyond it by that one flush's change.)

The keys, ``counter-sync:`` first (``/`` keeps the names of the single-counter
version, so that a rolling upgrade goes on sharing it; a named room's are
``room:<name>:state`` and so on):

* ``state``: hash, the value and its sequence number;
* ``users``: hash, instance id -> its users in the room; ``users:seq``: bumped
  with every change to it;
* ``instances``: sorted set, instance id -> when its entry lapses (ms);
  ``alive``: the same for the single-counter version, which every instance
  keeps up too (that version prunes only ``/``);
* ``instance:<id>:rooms``: set, the rooms an instance has users in, for
  whoever prunes it; ``instance:<id>:gone``: it left, so a late script of
  its changes nothing;
* ``flush:<id>:<room>``: hash, the last flush number used and settled;
* channels ``counter-sync:<db>:changes`` for ``/`` and
  ``counter-sync:<db>:room:<name>``: pub/sub is not per database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Iterable
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from counter_sync.config import MAX_VALUE
from counter_sync.store import DEFAULT_ROOM, Observer, OutOfRange, StoreError, StoreUnavailable

__all__ = ["Flush", "RedisStore", "room_keys"]

log = logging.getLogger("counter-sync")

# Seconds one command (or connecting, or a subscription) may take before Redis counts as down.
COMMAND_TIMEOUT = 2.0
# Seconds between reconnection attempts: doubling from the first to the last.
RECONNECT_FIRST = 0.05
RECONNECT_LAST = 1.0
# Seconds the listener waits for a message before checking it should go on.
LISTEN_POLL = 1.0
# How long Redis remembers an instance's flush numbers in a room (milliseconds):
# far longer than any reply can be delayed or any outage lasts.
FLUSH_MEMORY = 24 * 60 * 60 * 1000
# A clean stop, in seconds: the tasks' end, then settling and leaving the user
# counts (milliseconds when Redis answers), then disconnecting. STOP_TIMEOUT
# bounds the whole of close(), inside the second the server gives a store.
TASKS_STOP_TIMEOUT = 0.25
PART_TIMEOUT = 0.5
DISCONNECT_TIMEOUT = 0.2
STOP_TIMEOUT = TASKS_STOP_TIMEOUT + PART_TIMEOUT + DISCONNECT_TIMEOUT

PREFIX = "counter-sync"
INSTANCES = f"{PREFIX}:instances"  # sorted set: instance id -> when its entry lapses (ms)
ALIVE = f"{PREFIX}:alive"  # the same, for the single-counter version, which prunes only /

# Errors that mean "Redis cannot be used right now". A Lua error is a
# RedisError too: it leaves the store down rather than half-working.
# (TimeoutError is an OSError.)
ERRORS = (RedisError, OSError)


@dataclasses.dataclass(frozen=True)
class RoomKeys:
    """Where Redis keeps one room, and the channel its changes go to."""

    state: str
    users: str
    users_seq: str
    channel: str


def room_keys(room: str, db: int) -> RoomKeys:
    """The names of a room's keys; USERS_SCRIPT's ``room_keys`` gives the same ones."""
    channels = f"{PREFIX}:{db}"  # keys belong to a database; channels do not
    if room == DEFAULT_ROOM:  # the names the single-counter version used
        return RoomKeys(
            f"{PREFIX}:state", f"{PREFIX}:users", f"{PREFIX}:users:seq", f"{channels}:changes"
        )
    base = f"{PREFIX}:room:{room}"
    return RoomKeys(
        f"{base}:state", f"{base}:users", f"{base}:users:seq", f"{channels}:room:{room}"
    )


# A room's users message: every live instance's count and the sequence number.
USERS_MESSAGE = """
local function users_message(users_key, seq)
  local users = {}
  local flat = redis.call('HGETALL', users_key)
  for i = 1, #flat, 2 do users[flat[i]] = tonumber(flat[i + 1]) end
  return cjson.encode({type = 'users', seq = seq, users = users})
end
"""

# Apply one flush at most once, and only within range. KEYS[2] holds this
# instance's highest flush number used in the room ("last") and settled
# ("settled"); a number not above "last" is a delayed copy of a flush that
# was applied or settled already. Returns the state message, or nil (false)
# when the change would leave ±ARGV[5]: then nothing was applied.
ADD = """
local number = tonumber(ARGV[2])
local fresh = number > tonumber(redis.call('HGET', KEYS[2], 'last') or 0)
if fresh then
  local value = tonumber(redis.call('HGET', KEYS[1], 'value') or 0)
  if math.abs(value + tonumber(ARGV[1])) > tonumber(ARGV[5]) then return false end
  redis.call('HSET', KEYS[2], 'last', number)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'value', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'seq', 1)
end
local state = redis.call('HMGET', KEYS[1], 'value', 'seq')
local message = '{"type":"state","value":' .. (state[1] or 0) .. ',"seq":' .. (state[2] or 0) .. '}'
if fresh then redis.call('PUBLISH', ARGV[3], message) end
return message
"""

# Settle a flush whose reply was lost: its senders were told it failed, so
# make that true. Using up its number stops a delayed copy; if it had been
# applied, apply the opposite change. Settling twice (this script's own reply
# lost) does nothing the second time. Returns 1 if the flush was taken back.
CANCEL = """
local number = tonumber(ARGV[2])
local mark = redis.call('HMGET', KEYS[2], 'last', 'settled')
local last = tonumber(mark[1] or 0)
if number <= tonumber(mark[2] or 0) then return 0 end
redis.call('HSET', KEYS[2], 'last', math.max(last, number), 'settled', number)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if number > last then return 0 end
redis.call('HINCRBY', KEYS[1], 'value', -tonumber(ARGV[1]))
redis.call('HINCRBY', KEYS[1], 'seq', 1)
local state = redis.call('HMGET', KEYS[1], 'value', 'seq')
local message = '{"type":"state","value":' .. state[1] .. ',"seq":' .. state[2] .. '}'
redis.call('PUBLISH', ARGV[3], message)
return 1
"""

# Read rooms in one step: KEYS are (state, users, users seq) per room; the
# reply is (value, seq, users message) per room.
READ = (
    USERS_MESSAGE
    + """
local reply = {}
for i = 1, #KEYS, 3 do
  local state = redis.call('HMGET', KEYS[i], 'value', 'seq')
  reply[#reply + 1] = state[1] or '0'
  reply[#reply + 1] = state[2] or '0'
  reply[#reply + 1] = users_message(KEYS[i + 1], tonumber(redis.call('GET', KEYS[i + 2]) or 0))
end
return reply
"""
)

# This instance's user counts, and the pruning of dead instances, in one step.
# KEYS: the instances' lapse times, the single-counter version's, this
# instance's set of rooms, its "gone" marker. ARGV: the key prefix, the
# channel prefix, this instance, its entry's lifetime in ms ('' to leave every
# room), '1' if the (room, count) pairs from ARGV[7] on are all of its rooms,
# the lifetime of the "gone" marker. Other instances' room keys are named
# here, not passed: their rooms are only known inside (Redis Cluster is not
# supported). Every room whose counts changed gets its users message
# published. Returns {1 if this instance had no entry (first time, or pruned:
# it must send all its counts), room, message, room, message...}.
USERS_SCRIPT = (
    USERS_MESSAGE
    + """
local prefix, channels, me = ARGV[1], ARGV[2], ARGV[3]
local function room_keys(room)
  if room == '/' then
    return prefix .. ':users', prefix .. ':users:seq', channels .. ':changes'
  end
  local base = prefix .. ':room:' .. room
  return base .. ':users', base .. ':users:seq', channels .. ':room:' .. room
end
if redis.call('EXISTS', KEYS[4]) == 1 then return {0} end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local changed = {}
local function forget(instance, room)
  if redis.call('HDEL', (room_keys(room)), instance) == 1 then changed[room] = true end
end
-- An instance whose entry lapsed leaves every room it was in.
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  if dead ~= me then
    local rooms = prefix .. ':instance:' .. dead .. ':rooms'
    for _, room in ipairs(redis.call('SMEMBERS', rooms)) do forget(dead, room) end
    redis.call('DEL', rooms)
    redis.call('ZREM', KEYS[1], dead)
    redis.call('ZREM', KEYS[2], dead)
  end
end
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  if dead ~= me then
    redis.call('ZREM', KEYS[2], dead)
    forget(dead, '/')
  end
end
local missing = 0
if ARGV[4] == '' then
  for _, room in ipairs(redis.call('SMEMBERS', KEYS[3])) do forget(me, room) end
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[1], me)
  redis.call('ZREM', KEYS[2], me)
  redis.call('SET', KEYS[4], 1, 'PX', ARGV[6])
else
  if not redis.call('ZSCORE', KEYS[1], me) then missing = 1 end
  local lapse = now + tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], lapse, me)
  redis.call('ZADD', KEYS[2], lapse, me)
  local listed = {}
  for i = 7, #ARGV, 2 do
    local room, count = ARGV[i], ARGV[i + 1]
    listed[room] = true
    if count == '0' then
      redis.call('SREM', KEYS[3], room)
      forget(me, room)
    else
      redis.call('SADD', KEYS[3], room)
      local users = room_keys(room)
      if redis.call('HGET', users, me) ~= count then
        redis.call('HSET', users, me, count)
        changed[room] = true
      end
    end
  end
  if ARGV[5] == '1' then
    for _, room in ipairs(redis.call('SMEMBERS', KEYS[3])) do
      if not listed[room] then
        redis.call('SREM', KEYS[3], room)
        forget(me, room)
      end
    end
  end
end
local reply = {missing}
for room in pairs(changed) do
  local users, seq_key, channel = room_keys(room)
  local message = users_message(users, redis.call('INCR', seq_key))
  redis.call('PUBLISH', channel, message)
  reply[#reply + 1] = room
  reply[#reply + 1] = message
end
return reply
"""
)


@dataclasses.dataclass(frozen=True)
class Flush:
    """One flush's net change to one room, and its number among this instance's flushes."""

    room: str
    number: int
    delta: int


@dataclasses.dataclass
class SharedRoom:
    """A loaded room as this instance knows it from Redis."""

    keys: RoomKeys
    # Whether the hub has the room: until load() returns, nothing is shown.
    opened: bool = False
    # The newest value known, its sequence number, and the value the hub was
    # last handed (returned by add, or passed to observe).
    value: int = 0
    seq: int = 0
    shown: int = 0
    adding: bool = False
    # Users per live instance, as of the newest snapshot, and the count of
    # the other instances the hub was last handed.
    users: dict[str, int] = dataclasses.field(default_factory=dict)
    users_seq: int = 0
    shown_elsewhere: int = 0


class RedisStore:
    """Every room's counter and user count in Redis, shared by every instance that uses it.

    ``expiry`` is the number of seconds after which the users of an instance
    that died without closing stop counting on the others.
    """

    def __init__(self, url: str, *, expiry: float) -> None:
        self.url = url
        self.expiry = expiry
        self.instance = uuid.uuid4().hex[:16]  # this process, among the instances
        self.where = "Redis"  # host:port/db for messages: the URL may hold a password
        self.db = 0
        self.redis: Redis | None = None
        self.scripts: dict[str, AsyncScript] = {}
        self.observer: Observer | None = None
        self.rooms: dict[str, SharedRoom] = {}  # loaded: the hub has users in them
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
        self.flushes = 0  # number of this instance's last flush, in any room
        self.in_doubt: list[Flush] = []  # sent, reply lost, not settled yet
        self.up = False
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    # The Store interface (see counter_sync.store.Store).

    async def open(self) -> None:
        """Connect, register this instance and start following Redis.

        Raise :exc:`StoreError` with one line if the URL is bad or Redis cannot
        be used, so the server stops before serving anyone.
        """
        self.redis = self.open_client()
        pubsub: PubSub | None = None
        try:
            pubsub = await self.connect()
            await self.share_here(full=True)
        except ERRORS as exc:
            if pubsub is not None:
                await close_quietly(pubsub)
            await self.redis.aclose()
            raise StoreError(f"cannot use Redis at {self.where}: {one_line(exc)}") from None
        self.up = True
        self.tasks = [
            asyncio.create_task(self.follow(pubsub)),
            asyncio.create_task(self.beat()),
        ]
        log.info("sharing the counters through Redis at %s", self.where)

    async def load(self, room: str) -> int:
        """Subscribe to the room's changes, then read it: someone here joins it.

        Raise :exc:`StoreUnavailable` while Redis is unreachable.
        """
        if not self.up:
            raise StoreUnavailable(f"Redis at {self.where} is unreachable")
        shared = self.rooms[room] = SharedRoom(room_keys(room, self.db))
        self.by_channel[shared.keys.channel] = room
        confirmed = self.subscribe(shared.keys.channel)
        try:
            # Read only once Redis confirms: a change published before the
            # subscription took effect would otherwise be in neither.
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await confirmed
            [snapshot] = await self.read([room])
        except ERRORS as exc:
            self.release(room)
            self.lost(exc)
            raise StoreUnavailable(f"Redis at {self.where} is unreachable") from None
        self.replace(shared, snapshot)
        shared.shown = shared.value
        shared.opened = True
        # The hub makes the room right after this returns: the users elsewhere
        # reach it once it exists, before anyone here is shown a count.
        asyncio.get_running_loop().call_soon(self.show, room)
        return shared.value

    def release(self, room: str) -> None:
        """Nobody here is in ``room`` any more: stop receiving its changes."""
        shared = self.rooms.pop(room, None)
        if shared is not None:
            del self.by_channel[shared.keys.channel]
            self.commands.put_nowait((False, shared.keys.channel))

    def has_room_for(self, room: str) -> bool:
        return True  # Redis keeps any number of rooms; the hub caps those in use

    async def add(self, room: str, delta: int) -> int:
        """Apply one flush's net change to ``room``; return the newest value known.

        Raise :exc:`OutOfRange` if it would leave ±MAX_VALUE and
        :exc:`StoreUnavailable` if it was not applied otherwise: at once while
        Redis is known to be down, else when the script fails. In the second
        case the reply may be all that was lost; :meth:`settle` sees to it.
        """
        shared = self.rooms[room]
        if not self.up:
            raise StoreUnavailable(f"Redis at {self.where} is unreachable")
        self.flushes += 1
        flush = Flush(room, self.flushes, delta)
        # Messages that arrive meanwhile are not shown to the hub: the value
        # returned here is at least as new, and observe() must never undo it.
        shared.adding = True
        try:
            reply = await self.run_add(flush)
        except ERRORS as exc:
            self.in_doubt.append(flush)
            self.lost(exc)
            raise StoreUnavailable(f"Redis at {self.where} is unreachable") from None
        finally:
            shared.adding = False
        if reply is None:
            self.show(room)  # what arrived meanwhile
            raise OutOfRange
        self.receive(shared, json.loads(reply))
        shared.shown = shared.value
        return shared.value

    def healthy(self) -> bool:
        """True while connected and in sync; False from an error to the resync."""
        return self.up

    async def close(self) -> None:
        """Leave every room's user count at once (not at the expiry) and disconnect.

        Returns within about :data:`STOP_TIMEOUT` seconds whatever Redis does:
        every wait is bounded, and a task that swallows its cancellation is
        left to end by itself (the ``stopping`` flag ends its loop).
        """
        self.stopping = True
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=TASKS_STOP_TIMEOUT)
        redis, self.redis = self.redis, None
        if redis is None:
            return  # closed already, or never opened
        self.up = False
        await within(PART_TIMEOUT, self.part())
        if self.in_doubt:
            log.warning(
                "stopping with %d flush(es) whose reply was lost not settled: "
                "Redis may count actions whose senders were told they were not applied",
                len(self.in_doubt),
            )
        await within(DISCONNECT_TIMEOUT, redis.aclose())

    def watch(self, observer: Observer) -> None:
        """Tell ``observer`` from now on what the other instances change."""
        self.observer = observer
        for room in self.rooms:
            self.show(room)

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

    # Connecting, and keeping in sync.

    def open_client(self) -> Redis:
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
                socket_timeout=COMMAND_TIMEOUT,
                socket_connect_timeout=COMMAND_TIMEOUT,
                # No hidden retries: a script retried after its reply was lost
                # would count twice. The store settles such a flush instead.
                retry=Retry(NoBackoff(), 0),
                client_name=f"{PREFIX}:{self.instance}",
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
        self.scripts = {
            "add": redis.register_script(ADD),
            "cancel": redis.register_script(CANCEL),
            "read": redis.register_script(READ),
            "users": redis.register_script(USERS_SCRIPT),
        }
        return redis

    async def connect(self) -> PubSub:
        """Subscribe to every loaded room, then settle and read: the order that misses nothing."""
        assert self.redis is not None
        # Commands queued for an earlier connection are moot: this one
        # subscribes to what is loaded now, and later changes queue here.
        self.commands = asyncio.Queue()
        rooms = list(self.rooms)
        channels = [self.rooms[room].keys.channel for room in rooms]
        pubsub = self.redis.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            if channels:
                await pubsub.subscribe(*channels)
                await subscriptions_confirmed(pubsub, len(channels))
            await self.settle()
            snapshots = await self.read(rooms)
        except BaseException:
            await close_quietly(pubsub)
            raise
        for room, channel, snapshot in zip(rooms, channels, snapshots, strict=True):
            if (shared := self.rooms.get(room)) is not None:
                self.replace(shared, snapshot)
            else:  # released meanwhile
                self.commands.put_nowait((False, channel))
        return pubsub

    def subscribe(self, channel: str) -> asyncio.Future[None]:
        """Queue a SUBSCRIBE; the future is done once Redis confirms this one."""
        confirmed = asyncio.get_running_loop().create_future()
        self.confirmations.setdefault(channel, collections.deque()).append(confirmed)
        self.commands.put_nowait((True, channel))
        return confirmed

    async def send_subscriptions(
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
            except ERRORS as exc:
                self.lost(exc)
                return

    def confirm(self, channel: str) -> None:
        """Redis confirmed a SUBSCRIBE: it answers them in order, so the oldest one waiting."""
        waiting = self.confirmations.get(channel)
        if not waiting:
            return
        confirmed = waiting.popleft()
        if not waiting:
            del self.confirmations[channel]
        if not confirmed.done():
            confirmed.set_result(None)

    async def read(self, rooms: list[str]) -> list[tuple[str, str, str]]:
        """Each room's (value, seq, users message), read in one step."""
        if not rooms:
            return []
        keys = []
        for room in rooms:
            names = room_keys(room, self.db)
            keys += [names.state, names.users, names.users_seq]
        flat = await self.scripts["read"](keys=keys)
        return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]

    def replace(self, shared: SharedRoom, snapshot: tuple[str, str, str]) -> None:
        """Take what was just read, even with a lower sequence number: Redis may have lost it."""
        value, seq, users = snapshot
        shared.value, shared.seq = int(value), int(seq)
        self.replace_users(shared, json.loads(users))

    async def settle(self) -> None:
        """Make sure no flush whose reply was lost counts (see the module doc)."""
        while self.in_doubt:
            flush = self.in_doubt[0]
            taken_back = await self.run_cancel(flush)
            self.in_doubt.remove(flush)
            if taken_back:
                log.warning(
                    "a flush of %+d to %s whose reply was lost had been applied; "
                    "taken back, as its senders were told it failed",
                    flush.delta,
                    flush.room,
                )

    async def follow(self, pubsub: PubSub | None) -> None:
        """Apply other instances' changes as they arrive; after an outage, reconnect."""
        delay = RECONNECT_FIRST
        try:
            while not self.stopping:
                try:
                    if pubsub is None:
                        pubsub = await self.connect()
                        self.recovered()
                        delay = RECONNECT_FIRST
                    await self.listen(pubsub)
                except Exception as exc:
                    # Whatever went wrong, this task must go on: it is the
                    # one that brings the store back.
                    if not isinstance(exc, ERRORS):
                        log.exception("unexpected error while following Redis")
                    self.lost(exc)
                if pubsub is not None:
                    await close_quietly(pubsub)
                    pubsub = None
                if self.stopping:
                    break
                # Jitter, so instances do not all knock at the same moment.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_LAST)
        finally:
            if pubsub is not None:
                await close_quietly(pubsub)

    async def listen(self, pubsub: PubSub) -> None:
        """Take in what arrives, and send the queued (un)subscriptions, until Redis fails."""
        sender = asyncio.create_task(self.send_subscriptions(pubsub, self.commands))
        try:
            while self.up and not self.stopping:
                message = await pubsub.get_message(timeout=LISTEN_POLL)
                if message is None:
                    continue
                if message["type"] == "message":
                    self.receive_published(message["channel"], message["data"])
                elif message["type"] == "subscribe":
                    self.confirm(message["channel"])
        finally:
            sender.cancel()

    async def beat(self) -> None:
        """Renew this instance's entry four times per expiry; send count changes at once."""
        while not self.stopping:
            # asyncio.timeout, not wait_for: in Python 3.11, wait_for can swallow
            # a cancellation that races with the event, and close() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.expiry / 4):
                    await self.beat_now.wait()
            self.beat_now.clear()
            if not self.up:
                continue  # recovered() wakes this task
            rooms, self.unsent = self.unsent, set()
            try:
                await self.share_here(rooms=rooms)
            except ERRORS as exc:
                self.unsent |= rooms
                self.lost(exc)

    async def share_here(self, *, rooms: Iterable[str] = (), full: bool = False) -> None:
        """Send this instance's counts in ``rooms`` (every room if ``full``) and renew its entry."""
        reply = await self.run_users_script(self.here if full else rooms, full=full)
        if reply[0] and not full:
            # Pruned during an outage, or Redis restarted empty: send it all.
            reply = await self.run_users_script(self.here, full=True)
        for index in range(1, len(reply), 2):
            room, message = reply[index], reply[index + 1]
            if (shared := self.rooms.get(room)) is not None:
                self.receive(shared, json.loads(message))
                self.show(room)

    async def part(self) -> None:
        """What a clean stop owes the others: settle what is in doubt, leave every room."""
        await asyncio.gather(
            self.settle(), self.run_users_script(leave=True), return_exceptions=True
        )

    # The scripts, each in one place.

    async def run_add(self, flush: Flush) -> str | None:
        """Apply a flush unless it was applied or settled; None if it would leave the range."""
        keys = room_keys(flush.room, self.db)
        reply: str | None = await self.scripts["add"](
            keys=[keys.state, self.flush_key(flush.room)],
            args=[flush.delta, flush.number, keys.channel, FLUSH_MEMORY, MAX_VALUE],
        )
        return reply

    async def run_cancel(self, flush: Flush) -> int:
        """Settle a flush whose reply was lost; 1 if it had been applied and was taken back."""
        keys = room_keys(flush.room, self.db)
        taken_back: int = await self.scripts["cancel"](
            keys=[keys.state, self.flush_key(flush.room)],
            args=[flush.delta, flush.number, keys.channel, FLUSH_MEMORY],
        )
        return taken_back

    async def run_users_script(
        self, rooms: Iterable[str] = (), *, full: bool = False, leave: bool = False
    ) -> list[Any]:
        """Renew (or remove) this instance's entry and send its counts in ``rooms``."""
        counts = [str(item) for room in rooms for item in (room, self.here.get(room, 0))]
        reply: list[Any] = await self.scripts["users"](
            keys=[INSTANCES, ALIVE, self.instance_key("rooms"), self.instance_key("gone")],
            args=[
                PREFIX,
                f"{PREFIX}:{self.db}",
                self.instance,
                # The entry lapses at 3/4 of the expiry and every instance
                # prunes every 1/4: a dead one is gone within the expiry.
                "" if leave else int(self.expiry * 750),
                int(full),
                # Long enough for any script of this instance still on its way.
                FLUSH_MEMORY,
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
            )
        self.up = False
        # Loads waiting for a confirmation on this connection will not get one.
        for waiting in self.confirmations.values():
            for confirmed in waiting:
                if not confirmed.done():
                    confirmed.set_exception(ConnectionError("Redis connection lost"))
        self.confirmations.clear()

    def recovered(self) -> None:
        self.up = True
        log.info("Redis at %s is back: resynced %d room(s)", self.where, len(self.rooms))
        self.beat_now.set()  # counts that changed meanwhile
        for room in self.rooms:
            self.show(room)

    # What arrives: replies and published messages, in any order.

    def receive_published(self, channel: str, data: str) -> None:
        room = self.by_channel.get(channel)
        if room is None:
            return  # released since; the unsubscription is on its way
        try:
            self.receive(self.rooms[room], json.loads(data))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", channel)
            return
        self.show(room)

    def receive(self, shared: SharedRoom, message: dict[str, Any]) -> None:
        """Keep what is newer than what is known; ignore what is not."""
        if message["type"] == "state":
            if int(message["seq"]) > shared.seq:
                shared.value, shared.seq = int(message["value"]), int(message["seq"])
        elif message["type"] == "users" and int(message["seq"]) > shared.users_seq:
            self.replace_users(shared, message)

    def replace_users(self, shared: SharedRoom, message: dict[str, Any]) -> None:
        shared.users_seq = int(message["seq"])
        shared.users = {instance: int(count) for instance, count in message["users"].items()}

    def show(self, room: str) -> None:
        """Hand the hub what changed in ``room`` since it was last told."""
        shared = self.rooms.get(room)
        if self.observer is None or shared is None or not shared.opened:
            return
        if shared.value != shared.shown and not shared.adding:
            shared.shown = shared.value
            self.observer.observe(room, value=shared.value)
        elsewhere = sum(count for who, count in shared.users.items() if who != self.instance)
        if elsewhere != shared.shown_elsewhere:
            shared.shown_elsewhere = elsewhere
            self.observer.observe(room, elsewhere=elsewhere)

    def flush_key(self, room: str) -> str:
        """Where Redis keeps this instance's last flush number in ``room``, and last settled one."""
        return f"{PREFIX}:flush:{self.instance}:{room}"

    def instance_key(self, what: str) -> str:
        return f"{PREFIX}:instance:{self.instance}:{what}"


async def subscriptions_confirmed(pubsub: PubSub, count: int) -> None:
    """Wait for Redis to confirm ``count`` subscriptions; what is published meanwhile is read."""
    async with asyncio.timeout(COMMAND_TIMEOUT):
        while count:
            message = await pubsub.get_message(timeout=COMMAND_TIMEOUT)
            if message is not None and message["type"] == "subscribe":
                count -= 1


async def within(seconds: float, awaitable: Awaitable[Any]) -> None:
    """Run ``awaitable`` for at most ``seconds``, ignoring its errors: the store is stopping.

    It runs as a task of its own, so that if it swallows its cancellation the
    caller still goes on.
    """
    task = asyncio.ensure_future(awaitable)
    # Fetch the outcome whenever it comes, so that it is not reported as lost.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait({task}, timeout=seconds)
    finally:
        task.cancel()


async def close_quietly(pubsub: PubSub) -> None:
    """Drop a subscription's connection; Redis forgets the subscriptions with it."""
    await within(DISCONNECT_TIMEOUT, pubsub.aclose())  # type: ignore[no-untyped-call]


def one_line(exc: BaseException) -> str:
    """An exception's text on one line, for the operator."""
    return " ".join(str(exc).split()) or type(exc).__name__
