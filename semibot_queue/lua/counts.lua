-- counts: the earlier lost or given-back deliveries of one task, read in one trip.
-- Used after a plain BLMOVE, which cannot report them. (Prelude: lib_task_id.)
-- KEYS[1]  crashes hash
-- KEYS[2]  releases hash
-- ARGV[1]  the task as taken
-- ARGV[2]  MAX_NAME_LENGTH
-- Returns the count.
return counts_of(KEYS[1], KEYS[2], {ARGV[1]}, tonumber(ARGV[2]))[1]
