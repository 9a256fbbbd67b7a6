-- recover: give a dead worker's in-flight tasks back to the pending list.
-- Each recovered task is stored as '~N~<task>', N counting deliveries lost to dead
-- workers; at MAX_DELIVERY_ATTEMPTS it is dead-lettered as poison instead.
-- The worker is forgotten once its in-flight list is empty.
-- KEYS[1]  workers sorted set
-- KEYS[2]  the dead worker's in-flight list
-- KEYS[3]  pending list
-- KEYS[4]  dead-letter hash
-- KEYS[5]  dead-letter index sorted set
-- ARGV[1]  worker id
-- ARGV[2]  WORKER_DEAD_AFTER in ms: a worker seen more recently is left alone
-- ARGV[3]  MAX_DELIVERY_ATTEMPTS
-- ARGV[4]  most tasks to move in this call
-- ARGV[5]  MAX_QUEUE_LENGTH (recovered tasks wait in place while pending is full)
-- Returns {tasks left in flight, {requeued task ids}, {poisoned task ids}}, or {-1} if alive.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) > now_ms - tonumber(ARGV[2]) then
  return {-1}
end
local requeued = {}
local poisoned = {}
local room = tonumber(ARGV[5]) - redis.call('LLEN', KEYS[3])
for _ = 1, tonumber(ARGV[4]) do
  if room <= 0 then
    break
  end
  -- Newest first onto the taking end, so the oldest ends up taken first.
  local task = redis.call('LPOP', KEYS[2])
  if not task then
    break
  end
  local lost, body = string.match(task, '^~(%d+)~(.*)$')
  lost = (tonumber(lost) or 0) + 1
  body = body or task
  local ok, decoded = pcall(cjson.decode, body)
  local id = ok and type(decoded) == 'table' and type(decoded.task_id) == 'string'
    and decoded.task_id or ('raw-' .. redis.sha1hex(body))
  if lost >= tonumber(ARGV[3]) then
    local record = cjson.encode({
      task_id = id, reason = 'poison', error_type = 'PoisonTaskError',
      error = 'a worker died holding this task ' .. lost .. ' times',
      delivery_count = lost, failed_at = now_ms / 1000, worker_id = ARGV[1],
      raw = body, raw_encoding = 'utf-8',
    })
    redis.call('HSET', KEYS[4], id, record)
    redis.call('ZADD', KEYS[5], now_ms, id)
    poisoned[#poisoned + 1] = id
  else
    redis.call('RPUSH', KEYS[3], '~' .. lost .. '~' .. body)
    requeued[#requeued + 1] = id
    room = room - 1
  end
end
local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {left, requeued, poisoned}
