-- dlq_retry: put a dead-lettered task back on the pending list, if it still is as read.
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index sorted set
-- KEYS[3]  pending list
-- ARGV[1]  task id
-- ARGV[2]  the record as the caller read it (compare-and-set: no lost updates)
-- ARGV[3]  the task to push, with its retry count reset
-- ARGV[4]  MAX_QUEUE_LENGTH
-- Returns 1 moved, 0 record gone or changed, -1 pending list full (record kept).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if redis.call('LLEN', KEYS[3]) + 1 > tonumber(ARGV[4]) then
  return -1
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[3])
return 1
