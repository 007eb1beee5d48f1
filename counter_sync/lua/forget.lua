-- Reset a room to 0 and forget it (the API's DELETE): its key goes, and its
-- state takes a new version, so it replaces whatever anyone shows. Its
-- sessions are kept: a client still connected goes on with its next op.
--
-- KEYS[1]: the history; KEYS[2]: the room's state key. ARGV: [1] the epoch
-- the instance believes in, [2] a new epoch in case the history is gone,
-- [3] the epoch channel, [4] the room's channel.
--
-- Returns {'epoch', epoch} and does nothing if the history is not the one
-- believed in; else {'ok', seq}. The state published says "forgotten", so
-- that no instance takes the missing key for a loss.
local epoch = current_epoch(KEYS[1], ARGV[2], ARGV[3])
if epoch ~= ARGV[1] then return {'epoch', epoch} end
local seq = next_seq(KEYS[1], tonumber(redis.call('HGET', KEYS[2], 'seq') or 0))
redis.call('DEL', KEYS[2])
local message = string.sub(state_message(0, seq, epoch), 1, -2) .. ',"forgotten":true}'
redis.call('PUBLISH', ARGV[4], message)
return {'ok', seq}
