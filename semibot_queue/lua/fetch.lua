-- fetch: move up to N tasks from the pending list into one worker's in-flight list.
-- The non-blocking batch form of BLMOVE; the worker calls BLMOVE when this returns none.
-- (Prelude: lib_task_id.)
-- KEYS[1]  pending list
-- KEYS[2]  the worker's in-flight list
-- KEYS[3]  crashes hash (task id -> deliveries lost to dead workers)
-- KEYS[4]  releases hash (task id -> deliveries given back by stopping workers)
-- ARGV[1]  N, the worker's free slots
-- ARGV[2]  MAX_NAME_LENGTH
-- Returns {moved tasks, oldest first; their earlier lost or given-back deliveries}.
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local task = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not task then
    break
  end
  moved[#moved + 1] = task
end
return {moved, counts_of(KEYS[3], KEYS[4], moved, tonumber(ARGV[2]))}
