-- A room's users message: every live instance's count, and the version of
-- the room's counts (the single-counter version sends the same message).
local function users_message(users_key, seq)
  local users = {}
  local flat = redis.call('HGETALL', users_key)
  for i = 1, #flat, 2 do users[flat[i]] = tonumber(flat[i + 1]) end
  return cjson.encode({type = 'users', seq = seq, users = users})
end
