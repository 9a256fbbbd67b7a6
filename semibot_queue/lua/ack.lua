-- ack: finish tasks (out of the in-flight list, result stored and published, their
-- idempotency marker and delivery counts dropped), then take up to N pending tasks into
-- the same in-flight list for the slots the finished ones free. Finishing and taking in
-- one round trip is what lets a busy worker run at one round trip per task. A task no
-- longer in the list (recovered after this worker was thought dead) records nothing, so
-- that its redelivery is the only one that does. (Prelude: lib_task_id.)
-- KEYS[1]     the worker's in-flight list
-- KEYS[2]     pending list
-- KEYS[3]     crashes hash
-- KEYS[4]     releases hash
-- KEYS[5]     state hash
-- KEYS[6]     cancel hash
-- KEYS[7..]   per finished task, two keys: its result key, its idempotency marker
-- ARGV[1]     RESULT_TTL in seconds
-- ARGV[2]     N, how many tasks to take (0 when the worker is stopping)
-- ARGV[3]     MAX_NAME_LENGTH
-- ARGV[4..]   per finished task, four values: stored task, result JSON, channel, task id
--             (the task id is only logged by the caller; counts are dropped by key_of)
-- Returns {{1 recorded or 0 already gone, per finished task}, {taken tasks, oldest
-- first}, {earlier lost or given-back deliveries of each taken task}, {1 for each taken
-- task whose cancel was asked, else 0}}.
local ttl = tonumber(ARGV[1])
local flags = {}
local max_name = tonumber(ARGV[3])
for i = 0, (#KEYS - 6) / 2 - 1 do
  local base = 4 + i * 4
  if redis.call('LPOS', KEYS[1], ARGV[base]) then
    redis.call('SET', KEYS[7 + i * 2], ARGV[base + 1], 'EX', ttl)
    redis.call('PUBLISH', ARGV[base + 2], ARGV[base + 1])
    redis.call('DEL', KEYS[8 + i * 2])
    -- under the key the bookkeeping was kept by (see lib_task_id), not the parsed id
    local key = key_of(ARGV[base], max_name)
    redis.call('HDEL', KEYS[3], key)
    redis.call('HDEL', KEYS[4], key)
    redis.call('HDEL', KEYS[5], key)
    redis.call('HDEL', KEYS[6], key)
    -- Out of flight last: if Redis refuses any write above (an ACL, say), the task is
    -- still in flight and nothing is lost; a later try or a redelivery records it.
    redis.call('LREM', KEYS[1], 1, ARGV[base])
    flags[#flags + 1] = 1
  else
    flags[#flags + 1] = 0
  end
end
local moved = {}
for _ = 1, tonumber(ARGV[2]) do
  local task = redis.call('LMOVE', KEYS[2], KEYS[1], 'RIGHT', 'LEFT')
  if not task then
    break
  end
  moved[#moved + 1] = task
end
local K = {crashes = KEYS[3], releases = KEYS[4], state = KEYS[5], cancel = KEYS[6]}
local counts, cancelled = taken(K, moved, max_name)
return {flags, moved, counts, cancelled}
