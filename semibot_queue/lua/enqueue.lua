-- enqueue: put one or more tasks on the queue, all or none, within the limit: onto the
-- pending list, or, with a delay, into the scheduled set (due at Redis time + delay).
-- Each task id gets an idempotency marker for IDEMPOTENCY_TTL holding this call's token:
-- the library repeating this same call after a lost reply finds its own token and
-- writes nothing again, while another call for an id still live is refused.
-- A marker '~<token>' is a tombstone a final outcome may leave instead of deleting the
-- marker: its own call's repeat is still a no-op, any other call may use the id again.
-- An id whose cancelled copy still waits to be dropped by a worker (in the cancel hash)
-- is live too: a new task of that id would otherwise be dropped in its place.
-- Each new task's state becomes "pending <session>" (or "scheduled <session>"), and a
-- result left by an earlier task of the same id is deleted (it is not this task's).
-- Backpressure: pending + scheduled (delayed tasks and retries) + new <= MAX_QUEUE_LENGTH.
-- KEYS[1]     pending list
-- KEYS[2]     scheduled sorted set (score: due time in ms, Redis clock)
-- KEYS[3]     state hash (task id -> "<status> <session id>")
-- KEYS[4]     cancel hash (task id -> 1 while its cancel waits to be carried out)
-- KEYS[5..]   per task, two keys: its idempotency marker, its result key
-- ARGV[1]     MAX_QUEUE_LENGTH
-- ARGV[2]     seconds a marker lasts (IDEMPOTENCY_TTL)
-- ARGV[3]     this call's token
-- ARGV[4]     delay in ms, or '' to make the tasks pending at once
-- ARGV[5..]   per task, three values, oldest task first: encoded task, task id, session id
-- Returns {new pending length, scheduled length}, {-1} when the new tasks do not fit, or
-- {-2, positions} (1-based) of the tasks whose id is live; nothing is written in the
-- last two cases.
local token = ARGV[3]
local fresh, live, seen = {}, {}, {}
local cancels = redis.call('EXISTS', KEYS[4]) == 1
local n = (#KEYS - 4) / 2
for t = 1, n do
  local key = KEYS[3 + 2 * t]
  local marker = redis.call('GET', key)
  local mine = marker == token or marker == '~' .. token
  if seen[key] or (marker and not mine and string.sub(marker, 1, 1) ~= '~') then
    live[#live + 1] = t
  elseif not mine then
    if cancels and redis.call('HEXISTS', KEYS[4], ARGV[3 + 3 * t]) == 1 then
      live[#live + 1] = t
    else
      fresh[#fresh + 1] = t
    end
  end
  seen[key] = true
end
if #live > 0 then
  return {-2, unpack(live)}
end
local scheduled = redis.call('ZCARD', KEYS[2])
if redis.call('LLEN', KEYS[1]) + scheduled + #fresh > tonumber(ARGV[1]) then
  return {-1}
end
local word, due = 'pending ', nil
if ARGV[4] ~= '' then
  local now = redis.call('TIME')
  due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4])
  word = 'scheduled '
end
for _, t in ipairs(fresh) do
  local body, id = ARGV[2 + 3 * t], ARGV[3 + 3 * t]
  redis.call('SET', KEYS[3 + 2 * t], token, 'EX', tonumber(ARGV[2]))
  redis.call('DEL', KEYS[4 + 2 * t])
  redis.call('HSET', KEYS[3], id, word .. ARGV[4 + 3 * t])
  if due then
    redis.call('ZADD', KEYS[2], due, body)
  else
    redis.call('LPUSH', KEYS[1], body)
  end
end
return {redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[2])}
