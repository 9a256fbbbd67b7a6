-- ack: finish tasks: remove each from the in-flight list, store and publish its result.
-- A task no longer in the list (recovered after this worker was thought dead) records
-- nothing, so that its redelivery is the only one that does.
-- KEYS[1]     the worker's in-flight list
-- KEYS[2..]   one result key per task
-- ARGV[1]     RESULT_TTL in seconds
-- ARGV[2..]   per task, three values: stored task, result JSON, result channel
-- Returns one flag per task: 1 recorded, 0 already gone.
local ttl = tonumber(ARGV[1])
local flags = {}
for i = 2, #KEYS do
  local base = 2 + (i - 2) * 3
  if redis.call('LREM', KEYS[1], 1, ARGV[base]) == 1 then
    redis.call('SET', KEYS[i], ARGV[base + 1], 'EX', ttl)
    redis.call('PUBLISH', ARGV[base + 2], ARGV[base + 1])
    flags[#flags + 1] = 1
  else
    flags[#flags + 1] = 0
  end
end
return flags
