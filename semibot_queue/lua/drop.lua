-- drop: a worker took a task whose cancel was asked before it started: it never runs.
-- A cancel asked while the task was pending or scheduled stored and published its
-- cancelled result already; one asked while it ran on a worker that then lost it (died,
-- stopped) did not, so the result given here is stored and published when none is.
-- The task leaves the worker's in-flight list and its bookkeeping goes (final outcome).
-- KEYS[1]  the worker's in-flight list
-- KEYS[2]  crashes hash
-- KEYS[3]  releases hash
-- KEYS[4]  state hash
-- KEYS[5]  cancel hash
-- KEYS[6]  the task's result key
-- KEYS[7]  the task's idempotency marker
-- ARGV[1]  the task as taken
-- ARGV[2]  the key its bookkeeping is kept under (lib_task_id's key_of of ARGV[1])
-- ARGV[3]  its cancelled result JSON
-- ARGV[4]  RESULT_TTL in seconds
-- ARGV[5]  result channel
-- Returns 1, or 0 when the task was no longer in flight (nothing written).
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
if redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('SET', KEYS[6], ARGV[3], 'EX', tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[5], ARGV[3])
end
for i = 2, 5 do
  redis.call('HDEL', KEYS[i], ARGV[2])
end
redis.call('DEL', KEYS[7])
redis.call('LREM', KEYS[1], 1, ARGV[1])
return 1
