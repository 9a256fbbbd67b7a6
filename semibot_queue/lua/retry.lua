-- retry: take a failed task out of the in-flight list and schedule its next attempt.
-- (Prelude: lib_task_id.)
-- KEYS[1]  the worker's in-flight list
-- KEYS[2]  scheduled sorted set (score: due time in ms, Redis clock)
-- KEYS[3]  state hash: the task becomes scheduled
-- ARGV[1]  the task as taken
-- ARGV[2]  the task as it must run next (retry_count and last_error updated)
-- ARGV[3]  delay in ms
-- ARGV[4]  the key its bookkeeping is kept under (lib_task_id's key_of of ARGV[1])
-- Returns 1, or 0 when the task was no longer in flight (nothing written).
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[2])
set_status(KEYS[3], ARGV[4], 'scheduled')
-- Out of flight last: a refused write above leaves the task in flight, never lost.
redis.call('LREM', KEYS[1], 1, ARGV[1])
return 1
