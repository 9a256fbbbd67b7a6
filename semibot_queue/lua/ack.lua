-- ack: finish tasks (out of the in-flight list, result stored and published), then take
-- up to N pending tasks into the same in-flight list for the slots the finished ones free.
-- Finishing and taking in one round trip is what lets a busy worker run at one round
-- trip per task. A task no longer in the list (recovered after this worker was thought
-- dead) records nothing, so that its redelivery is the only one that does.
-- KEYS[1]     the worker's in-flight list
-- KEYS[2]     pending list
-- KEYS[3..]   one result key per finished task
-- ARGV[1]     RESULT_TTL in seconds
-- ARGV[2]     N, how many tasks to take (0 when the worker is stopping)
-- ARGV[3..]   per finished task, three values: stored task, result JSON, result channel
-- Returns {{1 recorded or 0 already gone, per finished task}, {taken tasks, oldest first}}.
local ttl = tonumber(ARGV[1])
local flags = {}
for i = 3, #KEYS do
  local base = 3 + (i - 3) * 3
  if redis.call('LREM', KEYS[1], 1, ARGV[base]) == 1 then
    redis.call('SET', KEYS[i], ARGV[base + 1], 'EX', ttl)
    redis.call('PUBLISH', ARGV[base + 2], ARGV[base + 1])
    flags[#flags + 1] = 1
  else
    flags[#flags + 1] = 0
  end
end
local taken = {}
for _ = 1, tonumber(ARGV[2]) do
  local task = redis.call('LMOVE', KEYS[2], KEYS[1], 'RIGHT', 'LEFT')
  if not task then
    break
  end
  taken[#taken + 1] = task
end
return {flags, taken}
