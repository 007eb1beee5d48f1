-- Check that Redis still holds what an instance believes it holds, and keep
-- the rooms it has users in: the history, and each room's keys.
--
-- KEYS[1]: the history; then per room its state key, its users key and the
-- key of its users' version. ARGV: [1] a new epoch in case the history is
-- gone, [2] the epoch channel, [3] the least lifetime of every room's keys
-- (ms), [4] one character per room: '1' if its state key was there when the
-- instance last heard of it (so that a missing one was lost), else '0'.
--
-- Returns {epoch, then the positions (1 = the first room) of the rooms
-- whose state key is missing though it was there}. Their keys could not
-- have expired: the instance has kept them from the moment it read them.
local reply = {current_epoch(KEYS[1], ARGV[1], ARGV[2])}
for room = 1, (#KEYS - 1) / 3 do
  local first = 2 + (room - 1) * 3
  if string.sub(ARGV[4], room, room) == '1' and redis.call('EXISTS', KEYS[first]) == 0 then
    reply[#reply + 1] = room
  end
  for key = first, first + 2 do keep_for(KEYS[key], ARGV[3]) end
end
return reply
