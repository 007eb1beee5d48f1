-- Check that Redis still holds what an instance believes it holds: the
-- history, and the state keys of the rooms it has seen in Redis.
--
-- KEYS[1]: the history; then state keys. ARGV: [1] a new epoch in case the
-- history is gone, [2] the epoch channel.
--
-- Returns {epoch, then the positions (1 = KEYS[2]) of the keys missing}.
local reply = {current_epoch(KEYS[1], ARGV[1], ARGV[2])}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then reply[#reply + 1] = i - 1 end
end
return reply
