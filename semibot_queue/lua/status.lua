-- status: where a task is, in one round trip, without looking at the pending list.
-- In this order: a stored result gives its status ("succeeded", "failed", "cancelled"),
-- except that a failed task with a dead-letter record is "dead"; else the state hash
-- gives the live status ("pending", "scheduled", "running"); else a dead-letter record
-- (its result expired) gives "dead"; else the task is unknown.
-- KEYS[1]  the task's result key
-- KEYS[2]  state hash (task id -> "<status> <session id>")
-- KEYS[3]  dead-letter ids (sorted set, all scored 0: '<task id>#<n>' in lex order)
-- KEYS[4]  dead-letter hash (a record kept before records had ids is under the task id)
-- ARGV[1]  task id
-- ARGV[2]  the record id separator ('#'); ids of one task run from '<id>#' up to '<id>$'
-- Returns the status word, or false for an unknown task.
local function dead()
  local from = '[' .. ARGV[1] .. ARGV[2]
  local to = '(' .. ARGV[1] .. string.char(string.byte(ARGV[2]) + 1)
  return #redis.call('ZRANGEBYLEX', KEYS[3], from, to, 'LIMIT', 0, 1) > 0
    or redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1
end
local result = redis.call('GET', KEYS[1])
if result then
  -- The status key follows task_id and session_id in every result we write; escaped
  -- quotes inside those strings cannot match this pattern.
  local status = string.match(result, '"status"%s*:%s*"(%a+)"')
  if status == 'failed' and dead() then
    return 'dead'
  end
  if status then
    return status
  end
end
local state = redis.call('HGET', KEYS[2], ARGV[1])
if state then
  return string.match(state, '^(%S*)')
end
if dead() then
  return 'dead'
end
return false
