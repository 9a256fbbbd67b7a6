-- dlq_delete: remove one dead-letter record.
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index sorted set
-- ARGV[1]  task id
-- Returns 1 if it existed, else 0.
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
