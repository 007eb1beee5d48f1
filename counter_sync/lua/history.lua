-- The store's history, shared by the scripts that read or change counters.
--
-- KEYS[1] of every such script is the history: a hash holding the epoch (the
-- name of this history) and seq (the one counter every room's version is
-- drawn from). One hash, so that both are lost together or not at all: a
-- counter that restarted under the old epoch would hand out versions that
-- compare as older than those the instances hold.

-- Lua's own number-to-string conversion keeps 14 digits; counters and
-- versions go up to 2^53 - 1.
local function int(n)
  return string.format('%d', n)
end

-- The current epoch. If the history is gone (FLUSHALL, a restart without
-- persistence, an eviction), a new one begins with the caller's candidate,
-- and every instance hears of it on the epoch channel.
local function current_epoch(history, candidate, channel)
  local epoch = redis.call('HGET', history, 'epoch')
  if not epoch then
    redis.call('HSET', history, 'epoch', candidate)
    redis.call('PUBLISH', channel, candidate)
    epoch = candidate
  end
  return epoch
end

-- A new version, above every one handed out so far in this history and
-- above `above` (a room's own: an instance of the previous version bumps a
-- room's seq by itself).
local function next_seq(history, above)
  local seq = redis.call('HINCRBY', history, 'seq', 1)
  if seq <= above then
    seq = above + 1
    redis.call('HSET', history, 'seq', int(seq))
  end
  return seq
end

local function state_message(value, seq, epoch)
  return '{"type":"state","value":' .. int(value) .. ',"seq":' .. int(seq)
    .. ',"epoch":"' .. epoch .. '"}'
end
