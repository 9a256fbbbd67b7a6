-- dead_letter: the final outcome of a task that cannot succeed: out of the worker's
-- in-flight list into a dead-letter record of its own, its failed result stored and
-- published, and its delivery counts and idempotency marker dropped. (Prelude:
-- lib_dead_letter.) Moves one body: O(its size), never parsed here.
-- KEYS[1]   the worker's in-flight list
-- KEYS[2]   dead-letter hash
-- KEYS[3]   dead-letter index
-- KEYS[4]   dead-letter ids (lex)
-- KEYS[5]   dead-letter raw bytes
-- KEYS[6]   dead-letter sequence
-- KEYS[7]   crashes hash
-- KEYS[8]   releases hash
-- KEYS[9]   the task's idempotency marker
-- KEYS[10]  the task's result key (written only when ARGV[6] is not empty)
-- KEYS[11]  state hash
-- KEYS[12]  cancel hash
-- ARGV[1]   the task as taken
-- ARGV[2]   task id
-- ARGV[3]   dead-letter record JSON
-- ARGV[4]   raw bytes to keep verbatim (a body that could not be parsed), if ARGV[5] is '1'
-- ARGV[5]   '1' to keep ARGV[4], '2' to keep ARGV[1] itself (sent once), '0' to keep none
-- ARGV[6]   failed result JSON, or '' for a task with no session to tell
-- ARGV[7]   RESULT_TTL in seconds
-- ARGV[8]   result channel
-- ARGV[9]   the key its delivery counts are kept under (lib_task_id's key_of of ARGV[1])
-- Returns the new record id, or nil when the task was no longer in flight (nothing written).
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return false
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local raw = false
if ARGV[5] == '1' then
  raw = ARGV[4]
elseif ARGV[5] == '2' then
  raw = ARGV[1]
end
local id = add_dead_letter(dead_keys(2), ARGV[2], ARGV[3], raw, now_ms)
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[10], ARGV[6], 'EX', tonumber(ARGV[7]))
  redis.call('PUBLISH', ARGV[8], ARGV[6])
end
redis.call('HDEL', KEYS[7], ARGV[9])
redis.call('HDEL', KEYS[8], ARGV[9])
redis.call('HDEL', KEYS[11], ARGV[9])
redis.call('HDEL', KEYS[12], ARGV[9])
redis.call('DEL', KEYS[9])
-- Out of flight last: a refused write above leaves the task in flight, never lost.
redis.call('LREM', KEYS[1], 1, ARGV[1])
return id
