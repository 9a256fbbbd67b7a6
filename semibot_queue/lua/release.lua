-- release: a stopping worker gives back the tasks it cannot finish, then deregisters.
-- Released tasks go to the taking end of the pending list, unchanged; the releases hash
-- counts them per task id: they show in delivery_count, but unlike deliveries lost to
-- dead workers they never make a task poison. (Prelude: lib_task_id.)
-- KEYS[1]  workers sorted set
-- KEYS[2]  the worker's in-flight list
-- KEYS[3]  pending list
-- KEYS[4]  releases hash
-- KEYS[5]  state hash: each released task becomes pending again
-- ARGV[1]  worker id
-- ARGV[2]  MAX_QUEUE_LENGTH (what does not fit stays; recovery moves it later)
-- ARGV[3]  MAX_NAME_LENGTH
-- ARGV[4]  bytes of task bodies one call moves at most (MAX_PAYLOAD_BYTES); the caller
--          calls again while tasks are left and the last call moved some
-- Returns {tasks left in flight (0 when the worker is deregistered), tasks moved}.
local room = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[3])
local budget = tonumber(ARGV[4])
local moved = 0
while room > 0 and budget > 0 do
  local task = redis.call('LPOP', KEYS[2])
  if not task then
    break
  end
  local id = key_of(task, tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[4], id, 1)
  set_status(KEYS[5], id, 'pending')
  redis.call('RPUSH', KEYS[3], task)
  room = room - 1
  budget = budget - #task
  moved = moved + 1
end
local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {left, moved}
