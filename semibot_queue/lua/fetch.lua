-- fetch: move up to N tasks from the pending list into one worker's in-flight list.
-- The non-blocking batch form of BLMOVE; the worker calls BLMOVE when this returns none.
-- KEYS[1]  pending list
-- KEYS[2]  the worker's in-flight list
-- ARGV[1]  N, the worker's free slots
-- Returns the moved tasks, oldest first.
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local task = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not task then
    break
  end
  moved[#moved + 1] = task
end
return moved
