-- release: a stopping worker gives back the tasks it cannot finish, then deregisters.
-- Released tasks go to the taking end of the pending list, marked '~N~' like recovered
-- ones (their delivery was lost) but never dead-lettered for it.
-- KEYS[1]  workers sorted set
-- KEYS[2]  the worker's in-flight list
-- KEYS[3]  pending list
-- ARGV[1]  worker id
-- ARGV[2]  MAX_QUEUE_LENGTH (what does not fit stays; recovery moves it later)
-- Returns the number of tasks left in flight (0 when the worker is deregistered).
local room = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[3])
while room > 0 do
  local task = redis.call('LPOP', KEYS[2])
  if not task then
    break
  end
  local lost, body = string.match(task, '^~(%d+)~(.*)$')
  lost = (tonumber(lost) or 0) + 1
  redis.call('RPUSH', KEYS[3], '~' .. lost .. '~' .. (body or task))
  room = room - 1
end
local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return left
