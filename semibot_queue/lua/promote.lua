-- promote: move retries and delayed tasks whose due time has come to the pending list.
-- (Prelude: lib_task_id.)
-- Only as many as the pending list has room for: the rest wait, never lost. A due copy
-- of a task cancelled while scheduled (its id in the voided set) is dropped instead: its
-- cancelled result was stored and published by cancel.lua, so only its bookkeeping goes,
-- the idempotency marker last, and the id may be used again.
-- KEYS[1]  scheduled sorted set
-- KEYS[2]  pending list
-- KEYS[3]  state hash: each promoted task becomes pending again
-- KEYS[4]  voided set
-- KEYS[5]  cancel hash
-- KEYS[6]  crashes hash
-- KEYS[7]  releases hash
-- ARGV[1]  most tasks to move in this call
-- ARGV[2]  MAX_QUEUE_LENGTH
-- ARGV[3]  MAX_NAME_LENGTH
-- ARGV[4]  prefix of the idempotency markers (the task id is appended)
-- Returns the number moved or dropped.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local room = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[2])
local n = math.min(tonumber(ARGV[1]), room)
if n <= 0 then
  return 0
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, n)
for _, task in ipairs(due) do
  local id = key_of(task, tonumber(ARGV[3]))
  redis.call('ZREM', KEYS[1], task)
  if redis.call('SREM', KEYS[4], id) == 1 then
    for i = 5, 7 do
      redis.call('HDEL', KEYS[i], id)
    end
    redis.call('DEL', ARGV[4] .. id)
  else
    redis.call('LPUSH', KEYS[2], task)
    set_status(KEYS[3], id, 'pending')
  end
end
return #due
