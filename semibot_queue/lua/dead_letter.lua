-- dead_letter: move an in-flight task to the dead-letter store and record its failure.
-- KEYS[1]  the worker's in-flight list
-- KEYS[2]  dead-letter hash (task id -> record)
-- KEYS[3]  dead-letter index sorted set (score: failure time in ms)
-- KEYS[4]  the task's result key
-- ARGV[1]  the task as taken
-- ARGV[2]  task id
-- ARGV[3]  dead-letter record JSON
-- ARGV[4]  failed result JSON, or '' for a task with no session to tell
-- ARGV[5]  RESULT_TTL in seconds
-- ARGV[6]  result channel
-- Returns 1, or 0 when the task was no longer in flight (nothing written).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], now_ms, ARGV[2])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[4], ARGV[4], 'EX', tonumber(ARGV[5]))
  redis.call('PUBLISH', ARGV[6], ARGV[4])
end
return 1
