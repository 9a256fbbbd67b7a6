-- promote: move retries and delayed tasks whose due time has come to the pending list.
-- (Prelude: lib_task_id.)
-- Only as many as the pending list has room for: the rest wait, never lost.
-- KEYS[1]  scheduled sorted set
-- KEYS[2]  pending list
-- KEYS[3]  state hash: each promoted task becomes pending again
-- ARGV[1]  most tasks to move in this call
-- ARGV[2]  MAX_QUEUE_LENGTH
-- ARGV[3]  MAX_NAME_LENGTH
-- Returns the number moved.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local room = tonumber(ARGV[2]) - redis.call('LLEN', KEYS[2])
local n = math.min(tonumber(ARGV[1]), room)
if n <= 0 then
  return 0
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, n)
for _, task in ipairs(due) do
  redis.call('LPUSH', KEYS[2], task)
  redis.call('ZREM', KEYS[1], task)
  set_status(KEYS[3], key_of(task, tonumber(ARGV[3])), 'pending')
end
return #due
