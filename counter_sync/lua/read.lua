-- Read rooms in one step, with the history they belong to.
--
-- KEYS[1]: the history; then per room its state key, its users key and the
-- key of its users' version. ARGV: [1] a new epoch in case the history is
-- gone, [2] the epoch channel, [3] the least lifetime of the keys read (ms):
-- someone joins these rooms (or is in them) on this instance; '' to leave
-- the lifetimes alone (a read that joins nothing).
--
-- Returns {epoch, then per room: value, seq, exists, users message}. A
-- room whose key is missing reads as 0 with a new version: newer than
-- whatever the key held before it was lost or forgotten, so every instance
-- takes it.
local epoch = current_epoch(KEYS[1], ARGV[1], ARGV[2])
local reply = {epoch}
for i = 2, #KEYS, 3 do
  local state = redis.call('HMGET', KEYS[i], 'value', 'seq')
  if state[1] or state[2] then
    reply[#reply + 1] = state[1] or '0'
    reply[#reply + 1] = state[2] or '0'
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = '0'
    reply[#reply + 1] = int(next_seq(KEYS[1], 0))
    reply[#reply + 1] = 0
  end
  reply[#reply + 1] = users_message(KEYS[i + 1], tonumber(redis.call('GET', KEYS[i + 2]) or 0))
  if ARGV[3] ~= '' then
    for key = i, i + 2 do keep_for(KEYS[key], ARGV[3]) end
  end
end
return reply
