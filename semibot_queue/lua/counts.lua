-- counts: the bookkeeping of one task taken by a plain BLMOVE, which cannot do it: the
-- task becomes running; its earlier lost or given-back deliveries and whether its cancel
-- was asked are read. (Prelude: lib_task_id.)
-- KEYS[1]  crashes hash
-- KEYS[2]  releases hash
-- KEYS[3]  state hash
-- KEYS[4]  cancel hash
-- ARGV[1]  the task as taken
-- ARGV[2]  MAX_NAME_LENGTH
-- Returns {the count, 1 if its cancel was asked else 0}.
local K = {crashes = KEYS[1], releases = KEYS[2], state = KEYS[3], cancel = KEYS[4]}
local counts, cancelled = taken(K, {ARGV[1]}, tonumber(ARGV[2]))
return {counts[1], cancelled[1]}
