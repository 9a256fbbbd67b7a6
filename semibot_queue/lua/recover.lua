-- recover: give a dead worker's in-flight tasks back to the pending list.
-- Each recovered task is counted in the crashes hash under its task id; at
-- MAX_DELIVERY_ATTEMPTS deliveries lost to dead workers it is dead-lettered as poison
-- instead (its bytes kept verbatim, never parsed here: a 1 MB body costs a copy).
-- Nothing is recovered inside a grace window (see heartbeat.lua). The worker is
-- forgotten once its in-flight list is empty. (Preludes: lib_task_id, lib_dead_letter.)
-- KEYS[1]   workers sorted set
-- KEYS[2]   the dead worker's in-flight list
-- KEYS[3]   pending list
-- KEYS[4]   crashes hash
-- KEYS[5]   releases hash
-- KEYS[6]   grace (ms)
-- KEYS[7]   dead-letter hash
-- KEYS[8]   dead-letter index
-- KEYS[9]   dead-letter ids (lex)
-- KEYS[10]  dead-letter raw bytes
-- KEYS[11]  dead-letter sequence
-- KEYS[12]  state hash: a requeued task becomes pending; a poisoned one leaves it
-- KEYS[13]  cancel hash (a poisoned task's flag goes)
-- ARGV[1]   worker id
-- ARGV[2]   WORKER_DEAD_AFTER in ms: a worker seen more recently is left alone
-- ARGV[3]   MAX_DELIVERY_ATTEMPTS
-- ARGV[4]   most tasks to move in this call
-- ARGV[5]   MAX_QUEUE_LENGTH (recovered tasks wait in place while pending is full)
-- ARGV[6]   MAX_NAME_LENGTH
-- ARGV[7]   prefix of idempotency markers (a poisoned task's marker is dropped)
-- ARGV[8]   bytes of task bodies one call moves at most (MAX_PAYLOAD_BYTES): the call
--           stays short whatever the sizes; at least one task is always moved
-- Returns {tasks left in flight, {requeued task ids}, {poison dead-letter record ids}},
-- {-1} if the worker is alive, {-2} inside a grace window.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local grace = tonumber(redis.call('GET', KEYS[6]))
if grace and grace > now_ms then
  return {-2}
end
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) > now_ms - tonumber(ARGV[2]) then
  return {-1}
end
local K = {dead = KEYS[7], index = KEYS[8], ids = KEYS[9], raw = KEYS[10], seq = KEYS[11]}
local max_name = tonumber(ARGV[6])
local requeued = {}
local poisoned = {}
local room = tonumber(ARGV[5]) - redis.call('LLEN', KEYS[3])
local budget = tonumber(ARGV[8])
for _ = 1, tonumber(ARGV[4]) do
  if room <= 0 or budget <= 0 then
    break
  end
  -- Newest first onto the taking end, so the oldest ends up taken first.
  local task = redis.call('LPOP', KEYS[2])
  if not task then
    break
  end
  budget = budget - #task
  local id = key_of(task, max_name)
  local crashes = redis.call('HINCRBY', KEYS[4], id, 1)
  if crashes >= tonumber(ARGV[3]) then
    local released = tonumber(redis.call('HGET', KEYS[5], id)) or 0
    local record = cjson.encode({
      task_id = id, reason = 'poison', error_type = 'PoisonTaskError',
      error = 'a worker died holding this task ' .. crashes .. ' times',
      delivery_count = crashes + released, failed_at = now_ms / 1000, worker_id = ARGV[1],
    })
    poisoned[#poisoned + 1] = add_dead_letter(K, id, record, task, now_ms)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[5], id)
    redis.call('HDEL', KEYS[12], id)
    redis.call('HDEL', KEYS[13], id)
    redis.call('DEL', ARGV[7] .. id)
  else
    redis.call('RPUSH', KEYS[3], task)
    set_status(KEYS[12], id, 'pending')
    requeued[#requeued + 1] = id
    room = room - 1
  end
end
local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {left, requeued, poisoned}
