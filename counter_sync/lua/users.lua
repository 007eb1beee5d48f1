-- This instance's user counts, and the pruning of dead instances, in one step.
--
-- KEYS: [1] the instances' lapse times, [2] the single-counter version's,
-- [3] this instance's set of rooms, [4] its "gone" marker. ARGV: [1] the key
-- prefix, [2] the channel prefix, [3] this instance, [4] its entry's
-- lifetime in ms ('' to leave every room), [5] '1' if the (room, count)
-- pairs from ARGV[9] on are all of its rooms, [6] the lifetime of the "gone"
-- marker, [7] the least lifetime (ms) of the users keys of a room it has
-- users in, [8] of any other room whose counts changed (--forget-after).
-- Other instances' room keys are named here, not passed: their rooms are
-- only known inside (Redis Cluster is not supported). Every room whose
-- counts changed gets its users message published.
--
-- Returns {1 if this instance had no entry (first time, or pruned: it must
-- send all its counts), room, message, room, message...}.
local prefix, channels, me = ARGV[1], ARGV[2], ARGV[3]
local function room_keys(room)
  if room == '/' then
    return prefix .. ':users', prefix .. ':users:seq', channels .. ':changes'
  end
  local base = prefix .. ':room:' .. room
  return base .. ':users', base .. ':users:seq', channels .. ':room:' .. room
end
-- It left: a late copy of this script must not count it in again.
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
  for i = 9, #ARGV, 2 do
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
  local lifetime = ARGV[8]
  if redis.call('SISMEMBER', KEYS[3], room) == 1 then lifetime = ARGV[7] end
  keep_for(users, lifetime)
  keep_for(seq_key, lifetime)
  redis.call('PUBLISH', channel, message)
  reply[#reply + 1] = room
  reply[#reply + 1] = message
end
return reply
