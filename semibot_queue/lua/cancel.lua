-- cancel: cancel a task that has not ended, after checking its state again (it may have
-- moved since the caller read it).
-- * pending or scheduled: it never runs. Its cancelled result (built by the caller from
--   the session in the state it read) is stored and published now, so that its waiters
--   get it at once; the cancel flag is set and the state goes (cancelled is a final
--   outcome). The body stays where it is: the worker that takes it later sees the flag
--   and drops it without running it (drop.lua), or, for a scheduled one, promote.lua
--   drops it when it is due; only then is the idempotency marker deleted, which
--   meanwhile holds 'cancelled' without expiry: the id stays taken while a copy that
--   must never run still waits (a new task of that id would be dropped instead, or that
--   copy would run). A scheduled task's id goes into the voided set, so that its copy
--   no longer counts against MAX_QUEUE_LENGTH.
-- * running: only the cancel flag is set; the worker running it sees the flag, asks the
--   handler to stop, and records the cancelled outcome itself.
-- KEYS[1]  state hash (task id -> "<status> <session id>")
-- KEYS[2]  cancel hash (task id -> 1 while the cancel waits to be carried out)
-- KEYS[3]  the task's result key
-- KEYS[4]  the task's idempotency marker (kept, as 'cancelled', until drop.lua)
-- KEYS[5]  voided set (ids of cancelled tasks whose copy waits in the scheduled set)
-- ARGV[1]  task id
-- ARGV[2]  the state value the caller read (the result was built for its session)
-- ARGV[3]  the cancelled result JSON
-- ARGV[4]  RESULT_TTL in seconds
-- ARGV[5]  the session's result channel
-- Returns 1 cancelled before it ran (also when this same call did it already: a repeat
-- after a lost reply finds its own result), 2 asked to stop while running, 0 not live
-- (unknown, ended, or cancelled already: nothing written), -1 its state changed to
-- another session since the caller read it (nothing written: read it again).
local function done_before()
  return redis.call('GET', KEYS[3]) == ARGV[3] and 1 or 0
end
local state = redis.call('HGET', KEYS[1], ARGV[1])
if not state then
  return done_before()
end
local word, session = string.match(state, '^(%S*) (.*)$')
if not word then
  word, session = state, ''
end
if word == 'running' then
  redis.call('HSET', KEYS[2], ARGV[1], 1)
  return 2
end
if word ~= 'pending' and word ~= 'scheduled' then
  return 0
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return done_before() -- cancelled already: its copy waits to be dropped (promoted, say)
end
local _, seen_session = string.match(ARGV[2], '^(%S*) (.*)$')
if session ~= (seen_session or '') then
  return -1
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', tonumber(ARGV[4]))
redis.call('HSET', KEYS[2], ARGV[1], 1)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], 'cancelled')
if word == 'scheduled' then
  redis.call('SADD', KEYS[5], ARGV[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[3])
return 1
