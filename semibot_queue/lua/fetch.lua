-- fetch: move up to N tasks from the pending list into one worker's in-flight list.
-- The non-blocking batch form of BLMOVE; the worker calls BLMOVE when this returns none.
-- (Prelude: lib_task_id.)
-- KEYS[1]  pending list
-- KEYS[2]  the worker's in-flight list
-- KEYS[3]  crashes hash (task id -> deliveries lost to dead workers)
-- KEYS[4]  releases hash (task id -> deliveries given back by stopping workers)
-- KEYS[5]  state hash (task id -> "<status> <session>"): each moved task becomes running
-- KEYS[6]  cancel hash (task id -> 1 when its cancel was asked)
-- ARGV[1]  N, the worker's free slots
-- ARGV[2]  MAX_NAME_LENGTH
-- Returns {moved tasks, oldest first; their earlier lost or given-back deliveries; 1 for
-- each whose cancel was asked, else 0}.
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local task = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not task then
    break
  end
  moved[#moved + 1] = task
end
local K = {crashes = KEYS[3], releases = KEYS[4], state = KEYS[5], cancel = KEYS[6]}
local counts, cancelled = taken(K, moved, tonumber(ARGV[2]))
return {moved, counts, cancelled}
