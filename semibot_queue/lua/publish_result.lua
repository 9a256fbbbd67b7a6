-- publish_result: store a task's final result and tell its session's waiters.
-- Used for poison tasks, whose dead-lettering happens inside recover.lua.
-- KEYS[1]  the task's result key
-- ARGV[1]  result JSON
-- ARGV[2]  RESULT_TTL in seconds
-- ARGV[3]  result channel
-- Returns the number of waiters that received it.
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return redis.call('PUBLISH', ARGV[3], ARGV[1])
