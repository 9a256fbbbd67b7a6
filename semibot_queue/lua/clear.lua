-- clear: delete pending tasks, oldest first, at most one batch per call (the caller calls
-- again until it has cleared what was pending), with what the queue keeps per task id:
-- the idempotency marker (so that the id can be enqueued again), the crash and release
-- counts, the state (its status becomes unknown) and a cancel flag waiting for a worker.
-- The task id is found by a plain search (lib_task_id), never by decoding a body.
-- (Prelude: lib_task_id.)
-- KEYS[1]  pending list
-- KEYS[2]  crashes hash (task id -> deliveries lost to dead workers)
-- KEYS[3]  releases hash (task id -> deliveries given back by stopping workers)
-- KEYS[4]  state hash (task id -> "<status> <session id>")
-- KEYS[5]  cancel hash (task id -> 1 while its cancel waits to be carried out)
-- ARGV[1]  most tasks to delete in this call (MAINTENANCE_BATCH)
-- ARGV[2]  bytes after which this call stops (it deletes at least one task)
-- ARGV[3]  prefix of the idempotency markers; a task id appended names one
-- ARGV[4]  MAX_NAME_LENGTH
-- Returns {tasks deleted, tasks still pending}.
local batch, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_length = tonumber(ARGV[4])
local counted = redis.call('EXISTS', KEYS[2], KEYS[3]) > 0
local deleted, bytes = 0, 0
while deleted < batch and bytes < budget do
  local body = redis.call('RPOP', KEYS[1])
  if not body then
    break
  end
  deleted = deleted + 1
  bytes = bytes + #body
  local id = task_id_of(body, max_length)
  if id then
    redis.call('DEL', ARGV[3] .. id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[5], id)
  end
  if counted then
    local field = id or ('raw-' .. redis.sha1hex(body))
    redis.call('HDEL', KEYS[2], field)
    redis.call('HDEL', KEYS[3], field)
  end
end
return {deleted, redis.call('LLEN', KEYS[1])}
