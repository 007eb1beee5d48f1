-- How long a room's keys live: every script that writes or uses a room's key
-- makes it live at least so long from now, never less than it would anyway
-- (another instance may keep the room for longer: it has users in it).

-- Make `key` expire no sooner than `ms` milliseconds from now. A key without
-- an expiry gets one (the version before rooms expired set none); a missing
-- key stays missing.
local function keep_for(key, ms)
  local left = redis.call('PTTL', key)
  if left == -1 or (left >= 0 and left < tonumber(ms)) then
    redis.call('PEXPIRE', key, ms)
  end
end
