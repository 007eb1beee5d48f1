-- Apply one flush pass of one instance: every room's change, each by the
-- rules of counter_sync.store.MemoryStore.apply (apply_batch for the ops),
-- in one atomic step.
--
-- KEYS[1]: the history; KEYS[2]: this instance's commit record (hash: last,
-- the number of its latest commit; settled, the latest it settled; and
-- 'd:' .. state key -> the delta that commit applied to that room); then
-- each room's state key and its sessions' keys, as the changes name them.
-- ARGV: [1] the epoch the instance believes in, [2] a new epoch in case the
-- history is gone, [3] the epoch channel, [4] this commit's number, [5] the
-- value's bound, [6] a session key's lifetime (ms), [7] the record's
-- lifetime (ms), [8] the changes as JSON (below), [9] the least lifetime of
-- a room's state key after a change (ms), --forget-after:
--   [[state key index, channel, delta, [[session key index, first op, deltas], ...],
--     [session key index, ...], [] or [the value to set]], ...]
-- where deltas is a string of '+', '-' and '0', one per op (a click), or a
-- list of integers (the API's add of any size).
--
-- Returns {'epoch', epoch} and applies nothing if the history is not the one
-- the instance believes in; {'stale'} for a commit the record says was
-- settled already (a delayed copy); else {'ok'} followed, per room, by
-- value, seq, applied, existed (its key was there before), exists, n, then n
-- times (session key index, last done op before, after).
local epoch = current_epoch(KEYS[1], ARGV[2], ARGV[3])
if epoch ~= ARGV[1] then return {'epoch', epoch} end
local record, number = KEYS[2], tonumber(ARGV[4])
local mark = redis.call('HMGET', record, 'last', 'settled')
if number <= tonumber(mark[1] or 0) then return {'stale'} end
-- The record describes only the latest commit: an instance commits one at a
-- time, and settles a lost one before it commits again.
redis.call('DEL', record)
redis.call('HSET', record, 'last', int(number), 'settled', mark[2] or '0')
redis.call('PEXPIRE', record, ARGV[7])
local limit, session_ttl, lifetime = tonumber(ARGV[5]), ARGV[6], ARGV[9]
local reply = {'ok'}
for _, change in ipairs(cjson.decode(ARGV[8])) do
  local key, channel, delta = KEYS[change[1]], change[2], change[3]
  local state = redis.call('HMGET', key, 'value', 'seq')
  local existed = state[1] ~= false or state[2] ~= false
  local value, seq = tonumber(state[1] or 0), tonumber(state[2] or 0)
  local done, order, retried = {}, {}, false
  for _, batch in ipairs(change[4]) do
    local s, first, deltas = batch[1], batch[2], batch[3]
    local before
    if done[s] then before = done[s][2] else before = tonumber(redis.call('GET', KEYS[s]) or 0) end
    local last = first + #deltas - 1
    local start, after = math.max(first, before + 1), math.max(before, last)
    if first > before + 1 then start, after = last + 1, before end -- skipped ahead
    retried = retried or start ~= first
    for op = start, last do
      if type(deltas) == 'table' then
        delta = delta + deltas[op - first + 1]
      else
        local sign = string.byte(deltas, op - first + 1)
        if sign == 43 then delta = delta + 1 elseif sign == 45 then delta = delta - 1 end
      end
    end
    if done[s] then
      done[s][2] = after
    else
      done[s] = {before, after}
      order[#order + 1] = s
    end
  end
  for _, s in ipairs(change[5]) do
    if not done[s] then
      local last = tonumber(redis.call('GET', KEYS[s]) or 0)
      done[s] = {last, last}
      order[#order + 1] = s
    end
  end
  -- A set sent again must not undo what came after it.
  local base = value
  if change[6][1] ~= nil and not retried then base = change[6][1] end
  local applied = math.abs(base + delta) <= limit
  local changed = applied and base + delta ~= value
  if changed then
    redis.call('HSET', record, 'd:' .. key, int(base + delta - value))
    value = base + delta
    seq = next_seq(KEYS[1], seq)
    redis.call('HSET', key, 'value', int(value), 'seq', int(seq))
    keep_for(key, lifetime)
    redis.call('PUBLISH', channel, state_message(value, seq, epoch))
  elseif not existed then
    -- Read as 0 with a new version: newer than whatever the key held
    -- before it was lost (deleted, evicted), so every instance takes it.
    seq = next_seq(KEYS[1], 0)
  end
  reply[#reply + 1] = value
  reply[#reply + 1] = seq
  reply[#reply + 1] = applied and 1 or 0
  reply[#reply + 1] = existed and 1 or 0
  reply[#reply + 1] = (existed or changed) and 1 or 0
  reply[#reply + 1] = #order
  for _, s in ipairs(order) do
    local before, after = done[s][1], done[s][2]
    if after ~= before then redis.call('SET', KEYS[s], int(after), 'PX', session_ttl) end
    reply[#reply + 1] = s
    reply[#reply + 1] = before
    reply[#reply + 1] = after
  end
end
return reply
