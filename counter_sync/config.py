"""Every limit and default in one place, and the settings a server runs with.

Each limit is a flag of the command line (see :mod:`counter_sync.flags`) or a
named constant here, and each is documented in docs/operations.md. The settings are
one frozen dataclass, so two servers with different settings can run in one
process (the tests do).
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "BROADCAST_SLICE",
    "BURST",
    "BUSY_TIMEOUT",
    "CLOSE_GRACE",
    "CLOSE_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "FD_HEADROOM",
    "FEED_SIZE",
    "FITTED_MINIMUM",
    "FITTED_SHARE",
    "FLUSH_PAUSE_RATIO",
    "FLUSH_TIMEOUT",
    "FORGET_AFTER",
    "GC_FREEZES_PER_THAW",
    "GC_THAW_MINIMUM",
    "GC_THAW_SHARE",
    "GC_THRESHOLDS",
    "HANDSHAKE_TIMEOUT",
    "HANDSHAKE_TIMEOUT_UNDER_PRESSURE",
    "HTTP_BURST",
    "HTTP_RATE",
    "LAG_PERIOD",
    "LISTEN_BACKLOG",
    "LOG_BATCH_LINES",
    "LOG_FLUSH_DELAY",
    "LOG_INTERVAL",
    "MAX_API_BODY",
    "MAX_API_HEAD",
    "MAX_API_PAGE",
    "MAX_CONNECTIONS_PER_USER",
    "MAX_DRAIN_SECONDS",
    "MAX_FLAG_SECONDS",
    "MAX_FORGET_AFTER",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_LOG_KEYS",
    "MAX_MESSAGE_SIZE",
    "MAX_PENDING",
    "MAX_PENDING_PER_IP",
    "MAX_RATED_ADDRESSES",
    "MAX_ROOMS",
    "MAX_SESSIONS",
    "MAX_USERS",
    "MAX_USERS_PER_IP",
    "MAX_VALUE",
    "MIN_FORGET_AFTER",
    "MIN_MESSAGE_SIZE",
    "MIN_PACING_DELAY",
    "MIN_REDIS_EXPIRY",
    "MIN_SECRET_BYTES",
    "MIN_SESSION_TTL",
    "NEW_ROOMS_PER_IP",
    "PENDING_PRESSURE",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "RATE",
    "REDIS_COMMAND_TIMEOUT",
    "REDIS_COMMIT_MEMORY",
    "REDIS_DISCONNECT_TIMEOUT",
    "REDIS_EXPIRY",
    "REDIS_LAPSE_FRACTION",
    "REDIS_LISTEN_POLL",
    "REDIS_PART_TIMEOUT",
    "REDIS_RECONNECT_FIRST",
    "REDIS_RECONNECT_LAST",
    "REDIS_RENEWALS_PER_EXPIRY",
    "REDIS_SCAN_COUNT",
    "REDIS_STOP_TIMEOUT",
    "REDIS_TASKS_STOP_TIMEOUT",
    "SESSION_ID",
    "SESSION_TTL",
    "SOCKET_RECEIVE_BUFFER",
    "SOCKET_SEND_BUFFER",
    "STORE_CLOSE_TIMEOUT",
    "STORE_RETRY_DELAY",
    "SWEEPS_PER_DEADLINE",
    "SWEEP_INTERVAL",
    "SWEEP_LIMIT",
    "SWEEP_PERIOD",
    "SWEEP_SLICE",
    "USERS_PERIOD",
    "WELCOME_PERIOD",
    "WRITE_BUFFER_LIMIT",
    "Settings",
]

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 6789  # the classic example's port, so its page works unchanged
MAX_MESSAGE_SIZE = 4 * 1024  # bytes; a valid action is ~20 bytes
# The smallest --max-message-size: the longest valid message,
# {"action": "minus", "op": 9007199254740991}, is 43 bytes; 64 leaves room for
# the spaces a client's JSON may add, so no valid message is closed with 1009.
MIN_MESSAGE_SIZE = 64
MAX_USERS = 10_000
# Users from one client address (IPv4, or IPv6 /64) at once; beyond, 429.
MAX_USERS_PER_IP = 100
# Connections accepted whose handshake is not done yet, overall and per
# address: a peer that connects and sends nothing holds at most this many.
MAX_PENDING = 1_000
MAX_PENDING_PER_IP = 20
HANDSHAKE_TIMEOUT = 5.0  # seconds from accept to a finished handshake
# Over this share of --max-pending, a new handshake gets at most
# HANDSHAKE_TIMEOUT_UNDER_PRESSURE seconds: a socket that trickles its
# request (and so is never evicted as silent) then holds its place for less,
# and an attacker must open that many times more of them to keep the cap
# full. Half: ordinary traffic finishes its handshakes in milliseconds and
# never gets there.
PENDING_PRESSURE = 0.5
# A client sends its request as soon as it is connected: it arrives within a
# round trip, or two with a lost packet resent (Linux resends after 200 ms
# at the least), even over a slow mobile link.
HANDSHAKE_TIMEOUT_UNDER_PRESSURE = 2.0
# Seconds between two warnings about one connection's input or one
# address's refused handshakes; the next says how many were held back.
LOG_INTERVAL = 10.0
# Log lines are written together: a line waits at most LOG_FLUSH_DELAY seconds,
# or until LOG_BATCH_LINES wait (an ERROR is written at once, with them).
LOG_FLUSH_DELAY = 0.05
LOG_BATCH_LINES = 256
# When the open-files limit is too low for the caps and cannot be raised, the
# listen backlog and the pending handshakes get this share of what is left
# each (users the rest), but never fewer than FITTED_MINIMUM: a queue of a few
# is what a small server needs to take reconnecting clients.
FITTED_SHARE = 1 / 8
FITTED_MINIMUM = 16
# Bytes handed to the protocol at a time: one read can hold thousands of tiny
# frames, each an object once parsed; a pause between slices leaves the rest
# as bytes.
FEED_SIZE = 1024
# Client addresses whose warnings are throttled one by one: beyond, the idle
# ones are dropped, so an attacker with many addresses cannot grow the table.
MAX_LOG_KEYS = 4096
# Sweeps of the connections per ping interval: a silent peer is pinged at most
# a quarter of the interval late (and failed or dropped as late).
SWEEPS_PER_DEADLINE = 4
# What survives a full garbage collection, or a young one while more connections
# are open than ever before, is frozen (see counter_sync.collector). Everything is
# thawed and collected in full once connections that closed since the last thaw
# add up to GC_THAW_SHARE of those open, and at least GC_THAW_MINIMUM, or once
# GC_FREEZES_PER_THAW collections froze what they found: this bounds the frozen
# garbage, and the long collection that frees it comes after churn, or after
# hours of traffic.
GC_THAW_SHARE = 0.25
GC_THAW_MINIMUM = 1000
GC_FREEZES_PER_THAW = 10_000
# The collector's thresholds (gc.set_threshold): the young generation every 700
# allocations, as Python's default; the middle one after more than 5 of those,
# the oldest after more than 1 of those (Python: 10 and 10). With the survivors
# frozen after each full collection, a full one sees only what 12 young
# collections left: while 19,000 connections joined (two runs here), 8,300
# objects and at most 5.5 ms of CPU; with (700, 5, 3), 24 young collections',
# 16,700 objects and up to 10.6 ms. Every object is looked at by one full
# collection either way, so smaller ones cost no more CPU in all.
GC_THRESHOLDS = (700, 5, 1)
# Open files kept for everything that is not a client: the listening
# sockets, the event loop, logs, the store's files or Redis connections.
FD_HEADROOM = 64
# Rooms with users at once; in memory mode also the counters kept in all.
MAX_ROOMS = 10_000
# Every counter stays within ±(2**53 - 1), the integers a browser's JSON.parse
# (a double) holds exactly.
MAX_VALUE = 2**53 - 1
RATE = 20.0  # actions per second per connection; no human clicks faster
# Plain HTTP requests (the page, /healthz, /metrics, /admission, 404s) per
# second per client address, and at once; WebSocket handshakes have their own
# caps. A page load costs one or two, a load balancer's probe or a scrape one
# every few seconds; the burst lets everyone behind one NAT (--max-users-per-ip
# of them) load the page at once.
HTTP_RATE = 20.0
HTTP_BURST = 200
# Client addresses whose HTTP request rate is remembered (~200 bytes each):
# beyond, the one quiet longest is forgotten; its bucket had refilled the
# most, so an attacker with many addresses gains at most a burst per eviction.
MAX_RATED_ADDRESSES = 10_000
BURST = 40  # actions a connection may send at once before RATE applies
PING_INTERVAL = 20.0  # seconds between keepalive pings
PING_TIMEOUT = 20.0  # seconds to wait for the pong before dropping the peer
CLOSE_TIMEOUT = 1.0  # seconds to wait for the peer's close frame
# Seconds a stop waits for the handlers after closing every connection: each
# close waits CLOSE_TIMEOUT for the peer's close frame, and a handler needs a
# moment after it to log and unregister. Then stalled ones are aborted.
CLOSE_GRACE = CLOSE_TIMEOUT + 1.0
# Seconds the last flushes may take to commit at shutdown.
FLUSH_TIMEOUT = 1.0
# Seconds a store may take to close (commit the last flushes, leave the
# shared user count): beyond, the process exits anyway.
STORE_CLOSE_TIMEOUT = 1.0
# Bytes queued in user space for one connection before broadcasts skip it. It
# is also the library's write_limit, so send() waits for exactly this drain.
WRITE_BUFFER_LIMIT = 16 * 1024
# Kernel send buffer per connection. Without a cap Linux autotunes it to
# hundreds of KiB, where a stalled reader would hoard thousands of stale
# updates that the user-space limit above cannot see.
SOCKET_SEND_BUFFER = 16 * 1024
# Kernel receive buffer per connection: a client's messages are tiny, and a
# flood of pings is read (and answered) at most this much at a time.
SOCKET_RECEIVE_BUFFER = 16 * 1024
# Under load, the pause after a broadcast is this many times its writes' time, so
# broadcasting takes at most a third of the time and the rest goes to reading
# clients and handshakes. Measured with the bench (join storm, N=1000): no
# pause 5-7 s, 1x 1.1-1.2 s, 2x 0.92-0.95 s, 3x 0.89-0.97 s but slower bursts.
FLUSH_PAUSE_RATIO = 2
# Seconds between two broadcasts of a room's user count alone: in a join storm
# each join would otherwise be a write to every connection of the room. A
# value and a newcomer's first messages never wait for it; a count a tenth of
# a second late is not seen as late.
USERS_PERIOD = 0.1
# Seconds between two passes of a room that only welcome newcomers: in a join
# storm a pass ran for every join or two and cost a third of the join's CPU.
# A newcomer's first messages wait at most this long; a value never waits.
WELCOME_PERIOD = 0.002
# Connections a broadcast writes to per event-loop turn: a big room's
# broadcast yields between slices, so a small room's flush is never held up
# for more than one slice (about 2 ms of writes).
BROADCAST_SLICE = 256
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# Flush pacing skips shorter waits: the event loop's timer resolution is a
# millisecond, so a 20 µs sleep would cost a whole one.
MIN_PACING_DELAY = 0.001
# With --redis: seconds after which the users of an instance that died without
# closing stop counting on the others (a live one refreshes well inside it).
REDIS_EXPIRY = 15.0
# The shortest --redis-expiry: an instance renews its entry over the network
# every quarter of it; below a second, one slow round trip to Redis would make
# a live instance's users stop counting (and Redis takes no expiry under 1 ms).
MIN_REDIS_EXPIRY = 1.0
# With --redis: an instance renews its liveness entry this many times per
# expiry, and each renewal lets the entry lapse after this fraction of it.
# Every live instance prunes lapsed ones at each renewal, so a dead instance
# stops counting within 3/4 + 1/4 of the expiry; a live one has three
# renewals' worth of slack before its entry could lapse.
REDIS_RENEWALS_PER_EXPIRY = 4
REDIS_LAPSE_FRACTION = 0.75
# With --redis: seconds one command (or connecting, or a subscription) may
# take before Redis counts as down. A healthy Redis answers in a millisecond;
# two seconds rides out a fork for a snapshot or a slow network, and still
# tells the clients well before they give up on their action.
REDIS_COMMAND_TIMEOUT = 2.0
# With --redis: seconds between reconnection attempts, doubling from the first
# to the last: quick after a blip, and at most one attempt a second per
# instance against a Redis that is down (with jitter, so instances spread out).
REDIS_RECONNECT_FIRST = 0.05
REDIS_RECONNECT_LAST = 1.0
# With --redis: seconds the subscription's listener waits for a message before
# checking it should go on (it stops at once on close(); this only bounds a
# check of the connection's state).
REDIS_LISTEN_POLL = 1.0
# With --redis: seconds Redis keeps an instance's commit record (the number of
# its last commit, and what that commit changed), which settles a commit whose
# reply was lost. Far longer than any reply can be delayed or any outage lasts.
REDIS_COMMIT_MEMORY = 86_400.0
# With --redis: keys Redis looks at per SCAN step when the API lists the
# counters (Redis keeps no index of them): a step of a thousand keys takes well
# under a millisecond, so the scan never holds Redis up for long.
REDIS_SCAN_COUNT = 1000
# With --redis, a clean stop: seconds for the store's tasks to end, then for
# settling and leaving the user counts (milliseconds when Redis answers), then
# for disconnecting. Their sum bounds RedisStore.close() within the second the
# server gives a store (STORE_CLOSE_TIMEOUT in app.py), whatever Redis does.
REDIS_TASKS_STOP_TIMEOUT = 0.25
REDIS_PART_TIMEOUT = 0.5
REDIS_DISCONNECT_TIMEOUT = 0.2
REDIS_STOP_TIMEOUT = REDIS_TASKS_STOP_TIMEOUT + REDIS_PART_TIMEOUT + REDIS_DISCONNECT_TIMEOUT
# Sessions (exactly-once actions): a store remembers a session's last done op
# for at least this many seconds after its last op, so a client that retries
# within it counts each action once. Ten minutes outlasts a Wi-Fi hand-over,
# a rolling restart and a phone that slept a few minutes.
SESSION_TTL = 600.0
# Seconds after which a counter nobody changed or joined is forgotten, in every
# store (--forget-after): 30 days keeps a weekly or monthly vote, and bounds
# what one-off counters (and whoever makes them on purpose) leave behind.
FORGET_AFTER = 30 * 24 * 60 * 60.0
# Its range: under a second a counter would go between a leave and a rejoin;
# ten years is "never" for any vote, and keeps the number finite.
MIN_FORGET_AFTER = 1.0
MAX_FORGET_AFTER = 10 * 365 * 24 * 60 * 60.0
# The shortest --session-ttl: a client must get the chance to reconnect and
# resend (the page waits up to a few seconds between attempts).
MIN_SESSION_TTL = 10.0
# Sessions a memory store remembers at most (a few integers each, ~200 bytes
# with the dict entry): beyond, the longest idle ones go first, counted in
# counter_sync_sessions_evicted_total.
MAX_SESSIONS = 100_000
# With --state: seconds between two sweeps of the SQLite file, which delete
# the sessions idle for longer than --session-ttl and the counters unused for
# longer than --forget-after (or every --forget-after, if that is shorter).
# A sweep rides on a commit's transaction when one comes (no fsync of its
# own), and otherwise takes one only if it finds something to delete; once a
# minute keeps each table within a minute of what it must hold, at the cost
# of two indexed reads.
SWEEP_INTERVAL = 60.0
# With --state: sessions, and counters, one sweep deletes at most, so that a
# commit after a long quiet spell (or a restart after days) is not held up by
# one huge DELETE; a full sweep is followed by another at once, a transaction
# each, until it caught up. A few milliseconds of work each.
SWEEP_LIMIT = 1_000
# With --state: seconds a commit waits for another process's write lock (say,
# an operator's sqlite3 shell) before its flush fails with "store
# unavailable": long enough for a quick manual write, short enough that
# clients hear of it while they still watch.
BUSY_TIMEOUT = 5.0
# A session id: 16 to 64 characters a URL carries as they are; the page makes
# a random 128-bit one (22 characters of base64url).
SESSION_ID = r"[A-Za-z0-9_-]{16,64}"
# The API: the largest request body (a change is ~20 bytes of JSON; beyond,
# 413), and the most counters one page of GET /api/counters lists.
MAX_API_BODY = 4 * 1024
# The largest head of an API write held whole to take its body aside: the
# library's own limits allow more, but an API request has a few short headers.
MAX_API_HEAD = 16 * 1024
MAX_API_PAGE = 1000
# An API write's Idempotency-Key: what client libraries send (a UUID, usually)
# fits many times over; the key is hashed into a session id, whatever its length.
MAX_IDEMPOTENCY_KEY = 255
# Seconds between two ticks of the sweep that looks after every connection
# (keepalive, the liveness deadline, expired tokens; each connection only when
# its next deadline comes): one sweep for all instead of a timer each, and a
# second is as late as a liveness drop or a token's expiry may come.
SWEEP_PERIOD = 1.0
# Seconds between two looks at the event loop's lag (the lag histogram of
# /metrics): often enough to catch a stall of a fraction of a second, at the
# cost of four wake-ups a second.
LAG_PERIOD = 0.25
# Connections due at one tick that the sweep looks at per event-loop turn: a
# slice costs about a millisecond, so 19,000 due at once never hold the loop.
SWEEP_SLICE = 1000
# Connections one token's user may hold on an instance at once: a person has a
# few tabs and devices, not a hundred; beyond, 429.
MAX_CONNECTIONS_PER_USER = 10
# Counters one client address may open per minute (rooms nobody is in on this
# instance): a person opens a few; a script that makes counters without end
# gets 429 after this many, and what it made is forgotten after --forget-after.
NEW_ROOMS_PER_IP = 30
# The shortest token secret: HS256 is as strong as its key, and RFC 7518
# (3.2) asks for a key at least as long as the hash, 256 bits.
MIN_SECRET_BYTES = 32
# Seconds before a room asks the store again for what a failed commit left
# to do (session ops it must record, sessions a newcomer must be told of):
# soon enough for a blip, slow enough not to hammer a store that is down.
STORE_RETRY_DELAY = 1.0
# The longest --drain-seconds: a drain past an hour outlives any supervisor's
# stop timeout (Kubernetes' grace period is 30 s by default, systemd's 90 s),
# which would kill the process in the middle of it anyway.
MAX_DRAIN_SECONDS = 3600.0
# The longest the other time flags may be (--handshake-timeout, --ping-interval,
# --ping-timeout, --redis-expiry): a day. Beyond, a value is a typo, not a
# choice (keepalive is turned off with 0, not with a year).
MAX_FLAG_SECONDS = 86_400.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the command line can change, with the documented defaults."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    origins: tuple[str, ...] = ()
    max_users: int = MAX_USERS
    max_users_per_ip: int = MAX_USERS_PER_IP
    max_pending: int = MAX_PENDING
    max_pending_per_ip: int = MAX_PENDING_PER_IP
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks, e.g. 10.0.0.0/8
    listen_backlog: int = LISTEN_BACKLOG
    max_rooms: int = MAX_ROOMS
    max_message_size: int = MAX_MESSAGE_SIZE
    rate: float = RATE
    burst: int = BURST
    http_rate: float = HTTP_RATE
    http_burst: int = HTTP_BURST
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    redis: str | None = None  # URL: share the counter with other instances
    redis_expiry: float = REDIS_EXPIRY
    state: str | None = None  # SQLite file: keep the counters across restarts
    forget_after: float = FORGET_AFTER
    session_ttl: float = SESSION_TTL
    max_sessions: int = MAX_SESSIONS
    # Who may read and who may change (see counter_sync.tokens): the HS256
    # secret (read from --token-secret-file), and what a connection without a
    # token may do (None: "read" with a secret, "write" without).
    token_secret: bytes | None = None
    anonymous: str | None = None
    max_connections_per_user: int = MAX_CONNECTIONS_PER_USER
    new_rooms_per_ip: int = NEW_ROOMS_PER_IP
    api_keys: tuple[bytes, ...] = ()  # from --api-key-file; none: no API
    log_format: str = "text"  # or "json"
    drain_seconds: float = 0.0  # SIGTERM: close with 1012 spread over this time
