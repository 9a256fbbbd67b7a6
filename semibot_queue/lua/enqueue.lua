-- enqueue: push one or more tasks onto the pending list, all or none, within the limit.
-- KEYS[1]  pending list
-- ARGV[1]  MAX_QUEUE_LENGTH
-- ARGV[2..] encoded tasks, oldest first
-- Returns the new pending length, or -1 (nothing written) when the batch does not fit.
local limit = tonumber(ARGV[1])
local count = #ARGV - 1
if redis.call('LLEN', KEYS[1]) + count > limit then
  return -1
end
for i = 2, #ARGV do
  redis.call('LPUSH', KEYS[1], ARGV[i])
end
return redis.call('LLEN', KEYS[1])
