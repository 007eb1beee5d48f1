"""Share the counter and the user count between instances through Redis: ``--redis URL``.

What shared mode promises, in the order a change goes through it:

* One order. The counter lives in Redis. Each instance applies the net change
  of one flush with one Lua script that adds it, bumps a sequence number and
  publishes the new ``{value, seq}``: actions from every instance add up, and
  each value carries its place in the one order Redis applied them in.
* No reordering. Every instance subscribes and keeps the value with the
  highest sequence number it has seen; an older message is ignored. The hub
  learns of it through :meth:`counter_sync.store.Observer.observe` and shows it in its next
  flush, the one place where its value changes.
* Nothing missed. On every (re)subscription, Redis confirms the subscription
  before the value is read: a change published in between is in what is read
  or arrives afterwards, never neither.
* Users everywhere. Each instance keeps its user count in Redis with an
  expiry, refreshes it four times per expiry, and publishes changes at once.
  The count shown is the sum over live instances: one killed with ``kill -9``
  stops counting within the expiry; one that stops cleanly, at once.
* Outages. While Redis is unreachable, actions get an error reply and
  ``/healthz`` answers 503. The store reconnects with backoff, resubscribes,
  resyncs, and the hub shows what Redis holds. One log line per outage.

A flush whose reply is lost (the connection broke after the script was sent)
may or may not have been applied. It is never retried: its senders get an
error reply, like any action that was not applied. On reconnection the store
settles it before anything else: it marks the flush number as used, so a
delayed copy can no longer apply, and if it had been applied, takes it back.
So an error reply always means "not counted", and no action counts twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from counter_sync.store import DEFAULT_ROOM, Observer, StoreError, StoreUnavailable

__all__ = ["RedisStore"]

log = logging.getLogger("counter-sync")

# Seconds one command (or connecting) may take before Redis counts as down.
COMMAND_TIMEOUT = 2.0
# Seconds between reconnection attempts: doubling from the first to the last.
RECONNECT_FIRST = 0.05
RECONNECT_LAST = 1.0
# Seconds the listener waits for a message before checking it should go on.
LISTEN_POLL = 1.0
# How long Redis remembers an instance's flush numbers (milliseconds): far
# longer than any reply can be delayed or any outage lasts.
FLUSH_MEMORY = 24 * 60 * 60 * 1000

PREFIX = "counter-sync"
STATE = f"{PREFIX}:state"  # hash: value, seq
USERS = f"{PREFIX}:users"  # hash: instance id -> its user count
ALIVE = f"{PREFIX}:alive"  # sorted set: instance id -> when its entry lapses (ms)
USERS_SEQ = f"{PREFIX}:users:seq"  # bumped by every change to USERS

# Errors that mean "Redis cannot be used right now". A Lua error is a
# RedisError too: it leaves the store down rather than half-working.
ERRORS = (RedisError, OSError)

# Apply one flush at most once. KEYS[2] holds this instance's highest flush
# number used ("last") and settled ("settled"); a number not above "last" is a
# delayed copy of a flush that was applied or settled already.
ADD = """
local number = tonumber(ARGV[2])
local fresh = number > tonumber(redis.call('HGET', KEYS[2], 'last') or 0)
if fresh then
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

# Record this instance's user count (ARGV[2]; empty to leave) with an entry
# that lapses after ARGV[3] ms, drop instances whose entry lapsed, and return
# every live count. Redis's clock decides, so instances' clocks never matter.
USERS_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local changed = false
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #lapsed > 0 then
  redis.call('ZREM', KEYS[1], unpack(lapsed))
  redis.call('HDEL', KEYS[2], unpack(lapsed))
  changed = true
end
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then changed = true end
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    changed = true
  end
end
local seq = tonumber(redis.call('GET', KEYS[3]) or 0)
if changed then seq = redis.call('INCR', KEYS[3]) end
local users = {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do users[flat[i]] = tonumber(flat[i + 1]) end
local message = cjson.encode({type = 'users', seq = seq, users = users})
if changed then redis.call('PUBLISH', ARGV[4], message) end
return message
"""


class RedisStore:
    """The counter and the user count in Redis, shared by every instance that uses it.

    ``expiry`` is the number of seconds after which the users of an instance
    that died without closing stop counting on the others.
    """

    def __init__(self, url: str, *, expiry: float) -> None:
        self.url = url
        self.expiry = expiry
        self.instance = uuid.uuid4().hex[:16]  # this process, among the instances
        self.where = "Redis"  # host:port/db for messages: the URL may hold a password
        self.redis: Redis | None = None
        self.scripts: dict[str, AsyncScript] = {}
        self.channel = ""
        self.observer: Observer | None = None
        # The newest value known, its sequence number, and the value the hub
        # was last handed (returned by add, or passed to observe).
        self.value = 0
        self.seq = 0
        self.shown = 0
        self.adding = False
        # Users per live instance, as of the newest snapshot; our own count.
        self.users: dict[str, int] = {}
        self.users_seq = 0
        self.shown_elsewhere = 0
        self.here = 0
        self.beat_now = asyncio.Event()
        self.flushes = 0  # number of this instance's last flush
        self.in_doubt: tuple[int, int] | None = None  # (number, delta), reply lost
        self.up = False
        self.tasks: list[asyncio.Task[None]] = []

    # The Store interface (see counter_sync.store.Store).

    async def open(self) -> None:
        """Connect, subscribe, register this instance and read the value.

        Raise :exc:`StoreError` with one line if the URL is bad or Redis cannot
        be used, so the server stops before serving anyone.
        """
        self.redis = self.open_client()
        try:
            pubsub = await self.connect()
        except ERRORS as exc:
            await self.redis.aclose()
            raise StoreError(f"cannot use Redis at {self.where}: {one_line(exc)}") from None
        self.up = True
        self.shown = self.value
        self.tasks = [
            asyncio.create_task(self.follow(pubsub)),
            asyncio.create_task(self.beat()),
        ]
        log.info(
            "sharing the counter through Redis at %s: value %d, %d users elsewhere",
            self.where,
            self.value,
            self.elsewhere(),
        )

    async def load(self, room: str) -> int:
        if room != DEFAULT_ROOM:
            raise StoreUnavailable("named counters are not shared through Redis yet")
        return self.value

    def release(self, room: str) -> None:
        pass

    def has_room_for(self, room: str) -> bool:
        return room == DEFAULT_ROOM

    async def add(self, room: str, delta: int) -> int:
        """Apply one flush's net change; return the newest value known.

        Raise :exc:`StoreUnavailable` if it was not applied: at once while
        Redis is known to be down, else when the script fails. In the second
        case the reply may be all that was lost; :meth:`settle` sees to it.
        """
        if not self.up:
            raise StoreUnavailable(f"Redis at {self.where} is unreachable")
        self.flushes += 1
        number = self.flushes
        # Messages that arrive meanwhile are not shown to the hub: the value
        # returned here is at least as new, and observe() must never undo it.
        self.adding = True
        try:
            reply = await self.scripts["add"](
                keys=[STATE, self.flush_key()], args=[delta, number, self.channel, FLUSH_MEMORY]
            )
        except ERRORS as exc:
            self.in_doubt = (number, delta)
            self.lost(exc)
            raise StoreUnavailable(f"Redis at {self.where} is unreachable") from None
        finally:
            self.adding = False
        self.receive(json.loads(reply))
        self.shown = self.value
        return self.value

    def healthy(self) -> bool:
        """True while connected and in sync; False from an error to the resync."""
        return self.up

    async def close(self) -> None:
        """Leave the user count at once (not at the expiry) and disconnect."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        redis, self.redis = self.redis, None
        if redis is None:
            return  # closed already
        if self.up:
            with contextlib.suppress(*ERRORS):
                await self.run_users_script(leave=True)
        self.up = False
        await redis.aclose()

    def watch(self, observer: Observer) -> None:
        """Tell ``observer`` from now on what the other instances change."""
        self.observer = observer
        self.show()

    def share_users(self, room: str, here: int) -> None:
        """Publish this instance's user count soon, coalescing quick changes."""
        if here != self.here:
            self.here = here
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
        db = options.get("db") or 0
        if options.get("path"):
            self.where = f"{options['path']} (db {db})"
        else:
            self.where = f"{options.get('host') or 'localhost'}:{options.get('port') or 6379}/{db}"
        # Keys belong to a database; channels do not: name it in the channel.
        self.channel = f"{PREFIX}:{db}:changes"
        self.scripts = {
            "add": redis.register_script(ADD),
            "cancel": redis.register_script(CANCEL),
            "users": redis.register_script(USERS_SCRIPT),
        }
        return redis

    async def connect(self) -> PubSub:
        """Subscribe, then settle and read what Redis holds: the order that misses nothing."""
        assert self.redis is not None
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # Read only once Redis confirms: a change published before the
            # subscription took effect would otherwise be in neither.
            while True:
                message = await pubsub.get_message(timeout=COMMAND_TIMEOUT)
                if message is None:
                    raise TimeoutError("Redis did not confirm the subscription")
                if message["type"] == "subscribe":
                    break
            await self.settle()
            snapshot = await self.run_users_script()
            value, seq = await self.redis.hmget(STATE, ["value", "seq"])
        except BaseException:
            await close_quietly(pubsub)
            raise
        # What was just read replaces what was known, even with a lower
        # sequence number: Redis may have restarted without its data.
        self.value, self.seq = int(value or 0), int(seq or 0)
        self.replace_users(json.loads(snapshot))
        return pubsub

    async def settle(self) -> None:
        """Make sure a flush whose reply was lost does not count (see the module doc)."""
        if self.in_doubt is None:
            return
        number, delta = self.in_doubt
        taken_back = await self.scripts["cancel"](
            keys=[STATE, self.flush_key()], args=[delta, number, self.channel, FLUSH_MEMORY]
        )
        self.in_doubt = None
        if taken_back:
            log.warning(
                "a flush of %+d whose reply was lost had been applied; "
                "taken back, as its senders were told it failed",
                delta,
            )

    async def follow(self, pubsub: PubSub | None) -> None:
        """Apply other instances' changes as they arrive; after an outage, reconnect."""
        delay = RECONNECT_FIRST
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = await self.connect()
                        self.recovered()
                        delay = RECONNECT_FIRST
                    while self.up:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=LISTEN_POLL
                        )
                        if message is not None:
                            self.receive_published(message["data"])
                except Exception as exc:
                    # Whatever went wrong, this task must go on: it is the
                    # one that brings the store back.
                    if not isinstance(exc, ERRORS):
                        log.exception("unexpected error while following Redis")
                    self.lost(exc)
                if pubsub is not None:
                    await close_quietly(pubsub)
                    pubsub = None
                # Jitter, so instances do not all knock at the same moment.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_LAST)
        finally:
            if pubsub is not None:
                await close_quietly(pubsub)

    async def beat(self) -> None:
        """Refresh this instance's entry four times per expiry, and at once on a change."""
        while True:
            # asyncio.timeout, not wait_for: in Python 3.11, wait_for can swallow
            # a cancellation that races with the event, and close() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.expiry / 4):
                    await self.beat_now.wait()
            self.beat_now.clear()
            if not self.up:
                continue  # the resync registers the count again
            try:
                snapshot = await self.run_users_script()
            except ERRORS as exc:
                self.lost(exc)
                continue
            self.receive(json.loads(snapshot))
            self.show()

    async def run_users_script(self, *, leave: bool = False) -> str:
        """Refresh (or remove) this instance's entry; return the users snapshot."""
        snapshot: str = await self.scripts["users"](
            keys=[ALIVE, USERS, USERS_SEQ],
            args=[
                self.instance,
                "" if leave else self.here,
                # The entry lapses at 3/4 of the expiry and every instance
                # prunes every 1/4: a dead one is gone within the expiry.
                int(self.expiry * 750),
                self.channel,
            ],
        )
        return snapshot

    def lost(self, exc: BaseException) -> None:
        """Redis failed: reject actions until the listener has resynced."""
        if self.up:  # one line per outage, not one per action
            log.warning(
                "Redis at %s is unreachable, rejecting actions until it is back: %s",
                self.where,
                one_line(exc),
            )
        self.up = False

    def recovered(self) -> None:
        self.up = True
        log.info("Redis at %s is back: resynced, value %d", self.where, self.value)
        self.show()

    # What arrives: replies and published messages, in any order.

    def receive_published(self, data: str) -> None:
        try:
            self.receive(json.loads(data))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", self.channel)
            return
        self.show()

    def receive(self, message: dict[str, Any]) -> None:
        """Keep what is newer than what is known; ignore what is not."""
        if message["type"] == "state":
            if int(message["seq"]) > self.seq:
                self.value, self.seq = int(message["value"]), int(message["seq"])
        elif message["type"] == "users" and int(message["seq"]) > self.users_seq:
            self.replace_users(message)

    def replace_users(self, message: dict[str, Any]) -> None:
        self.users_seq = int(message["seq"])
        self.users = {instance: int(count) for instance, count in message["users"].items()}

    def show(self) -> None:
        """Hand the hub what changed since it was last told."""
        if self.observer is None:
            return
        if self.value != self.shown and not self.adding:
            self.shown = self.value
            self.observer.observe(DEFAULT_ROOM, value=self.value)
        elsewhere = self.elsewhere()
        if elsewhere != self.shown_elsewhere:
            self.shown_elsewhere = elsewhere
            self.observer.observe(DEFAULT_ROOM, elsewhere=elsewhere)

    def elsewhere(self) -> int:
        """Users connected to the other live instances."""
        return sum(count for instance, count in self.users.items() if instance != self.instance)

    def flush_key(self) -> str:
        """Where Redis keeps this instance's last flush number, and last settled one."""
        return f"{PREFIX}:flush:{self.instance}"


async def close_quietly(pubsub: PubSub) -> None:
    """Drop a subscription's connection; Redis forgets the subscription with it."""
    await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py


def one_line(exc: BaseException) -> str:
    """An exception's text on one line, for the operator."""
    return " ".join(str(exc).split()) or type(exc).__name__
