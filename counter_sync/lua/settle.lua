-- Settle a commit whose reply was lost: its senders were told it was not
-- applied, so make that true. Using up its number stops a delayed copy; if
-- it had been applied, each room's delta is taken back. Either way its
-- sessions' ops count as done (with no delta), so that later ops follow on.
-- Settling twice (this script's own reply lost) does nothing the second time.
--
-- KEYS: as for commit.lua. ARGV: [1] the epoch the commit was sent in, [2] a
-- new epoch in case the history is gone, [3] the epoch channel, [4] the
-- commit's number, [5] a session key's lifetime (ms), [6] the record's
-- lifetime (ms), [7] the rooms as JSON (below), [8] the least lifetime of a
-- room's state key after a change (ms):
--   [[state key index, channel, [[session key index, last op], ...]], ...]
--
-- Returns {'epoch', epoch} if the history it was sent in is gone (so is
-- what it did); {'settled'} if it was settled already; else {'ok', applied,
-- then per room taken back: state key index, the delta taken back}.
local epoch = current_epoch(KEYS[1], ARGV[2], ARGV[3])
if epoch ~= ARGV[1] then return {'epoch', epoch} end
local record, number = KEYS[2], tonumber(ARGV[4])
local mark = redis.call('HMGET', record, 'last', 'settled')
local last = tonumber(mark[1] or 0)
if number <= tonumber(mark[2] or 0) then return {'settled'} end
redis.call('HSET', record, 'last', int(math.max(last, number)), 'settled', int(number))
redis.call('PEXPIRE', record, ARGV[6])
-- The record holds the deltas of its latest commit only: this one, if applied.
local applied = number == last
local reply = {'ok', applied and 1 or 0}
for _, room in ipairs(cjson.decode(ARGV[7])) do
  local key, channel = KEYS[room[1]], room[2]
  local delta = applied and tonumber(redis.call('HGET', record, 'd:' .. key) or 0) or 0
  if delta ~= 0 then
    local state = redis.call('HMGET', key, 'value', 'seq')
    local value = tonumber(state[1] or 0) - delta
    local seq = next_seq(KEYS[1], tonumber(state[2] or 0))
    redis.call('HSET', key, 'value', int(value), 'seq', int(seq))
    keep_for(key, ARGV[8])
    redis.call('PUBLISH', channel, state_message(value, seq, epoch))
    reply[#reply + 1] = room[1]
    reply[#reply + 1] = delta
  end
  for _, session in ipairs(room[3]) do
    local session_key, op = KEYS[session[1]], session[2]
    if op > tonumber(redis.call('GET', session_key) or 0) then
      redis.call('SET', session_key, int(op), 'PX', ARGV[5])
    end
  end
end
return reply
