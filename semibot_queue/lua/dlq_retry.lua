-- dlq_retry: put a dead letter's task back on the pending list, if its record still is as
-- the caller read it, and remove that record (only that one). A task that parses is
-- marked accepted, as enqueue marks it, and is refused while another copy of its id is
-- live; its state becomes "pending <session>" and its old (failed) result is deleted, so
-- that status() and waiters see the new run. (Prelude: lib_dead_letter.)
-- KEYS[1]  dead-letter hash
-- KEYS[2]  dead-letter index
-- KEYS[3]  dead-letter ids (lex)
-- KEYS[4]  dead-letter raw bytes
-- KEYS[5]  dead-letter sequence
-- KEYS[6]  pending list
-- KEYS[7]  the task's idempotency marker (used only when ARGV[6] is '1')
-- KEYS[8]  state hash (used only when ARGV[6] is '1')
-- KEYS[9]  the task's result key (used only when ARGV[6] is '1')
-- KEYS[10] scheduled sorted set: counted with pending against MAX_QUEUE_LENGTH, as enqueue does
-- KEYS[11] voided set: scheduled copies of cancelled tasks, not counted (as enqueue does)
-- ARGV[1]  record id
-- ARGV[2]  the record JSON as the caller read it (compare-and-set: no lost updates)
-- ARGV[3]  the task to push: plain JSON with its counts reset, or the raw bytes kept
-- ARGV[4]  MAX_QUEUE_LENGTH
-- ARGV[5]  IDEMPOTENCY_TTL in seconds
-- ARGV[6]  '1' to check and set the marker (a task that parses), '0' for raw bytes
-- ARGV[7]  this call's token, the marker's value: a repeat of the same call is a no-op
-- ARGV[8]  the task id (used only when ARGV[6] is '1')
-- ARGV[9]  its state value, "pending <session id>" (used only when ARGV[6] is '1')
-- Returns 1 moved (or moved by this same call before), 0 record gone or changed,
-- -1 pending list full, -2 the task id is live again (both: nothing written).
local K = dead_keys(1)
local mark = ARGV[6] == '1'
local current = redis.call('HGET', K.dead, ARGV[1])
if current ~= ARGV[2] then
  if mark and not current and redis.call('GET', KEYS[7]) == ARGV[7] then
    return 1
  end
  return 0
end
if mark then
  local holder = redis.call('GET', KEYS[7])
  if holder and holder ~= ARGV[7] then
    return -2
  end
end
local live, limit = redis.call('LLEN', KEYS[6]) + redis.call('ZCARD', KEYS[10]), tonumber(ARGV[4])
if live + 1 > limit and live - redis.call('SCARD', KEYS[11]) + 1 > limit then
  return -1
end
remove_dead_letter(K, ARGV[1])
forget_if_empty(K)
if mark then
  redis.call('SET', KEYS[7], ARGV[7], 'EX', tonumber(ARGV[5]))
  redis.call('HSET', KEYS[8], ARGV[8], ARGV[9])
  redis.call('DEL', KEYS[9])
end
redis.call('LPUSH', KEYS[6], ARGV[3])
return 1
