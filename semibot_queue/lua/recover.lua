-- recover: give a dead worker's in-flight tasks back to the pending list.
-- A recovered task is stored with the header '~C~' (or '~CrR~'), C counting deliveries
-- lost to dead workers and R those given back by stopping ones; at C ==
-- MAX_DELIVERY_ATTEMPTS it is dead-lettered as poison instead, its bytes kept in base64.
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
-- ARGV[6]  MAX_NAME_LENGTH: a task id longer, or with other characters than [%w_.:-],
--          is replaced by 'raw-<sha1>' as the dead-letter key
-- Returns {tasks left in flight, {requeued task ids}, {poisoned task ids}}, or {-1} if alive.
local ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'

local function base64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = string.byte(data, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chunk = {}
    for shift = 3, 0, -1 do
      local k = math.floor(n / 64 ^ shift) % 64
      chunk[#chunk + 1] = string.sub(ALPHABET, k + 1, k + 1)
    end
    if not b then
      chunk[3] = '='
    end
    if not c then
      chunk[4] = '='
    end
    out[#out + 1] = table.concat(chunk)
  end
  return table.concat(out)
end

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
  local crashes, released, body = string.match(task, '^~(%d+)r?(%d*)~(.*)$')
  crashes = (tonumber(crashes) or 0) + 1
  released = tonumber(released) or 0
  body = body or task
  local ok, decoded = pcall(cjson.decode, body)
  local id = ok and type(decoded) == 'table' and type(decoded.task_id) == 'string'
    and string.match(decoded.task_id, '^[%w_.:%-]+$') and #decoded.task_id <= tonumber(ARGV[6])
    and decoded.task_id or ('raw-' .. redis.sha1hex(body))
  if crashes >= tonumber(ARGV[3]) then
    local record = cjson.encode({
      task_id = id, reason = 'poison', error_type = 'PoisonTaskError',
      error = 'a worker died holding this task ' .. crashes .. ' times',
      delivery_count = crashes + released, failed_at = now_ms / 1000, worker_id = ARGV[1],
      raw = base64(body), raw_encoding = 'base64',
    })
    redis.call('HSET', KEYS[4], id, record)
    redis.call('ZADD', KEYS[5], now_ms, id)
    poisoned[#poisoned + 1] = id
  else
    local header = '~' .. crashes .. (released > 0 and ('r' .. released) or '') .. '~'
    redis.call('RPUSH', KEYS[3], header .. body)
    requeued[#requeued + 1] = id
    room = room - 1
  end
end
local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {left, requeued, poisoned}
