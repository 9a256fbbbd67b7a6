-- enqueue: push one or more tasks onto the pending list, all or none, within the limit.
-- Each task id is marked as accepted for a while, and a task whose id is marked is not
-- pushed again: a producer that repeats an enqueue whose reply it lost (or enqueues the
-- same payload twice) leaves one copy.
-- KEYS[1]     pending list
-- KEYS[2..]   one "accepted" marker key per task, in the order of the tasks
-- ARGV[1]     MAX_QUEUE_LENGTH
-- ARGV[2]     seconds a marker lasts (RESULT_TTL)
-- ARGV[3..]   encoded tasks, oldest first
-- Returns the new pending length, or -1 (nothing written) when the new tasks do not fit.
local fresh = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    fresh[#fresh + 1] = i
  end
end
if redis.call('LLEN', KEYS[1]) + #fresh > tonumber(ARGV[1]) then
  return -1
end
for _, i in ipairs(fresh) do
  redis.call('SET', KEYS[i], 1, 'EX', tonumber(ARGV[2]))
  redis.call('LPUSH', KEYS[1], ARGV[i + 1])
end
return redis.call('LLEN', KEYS[1])
