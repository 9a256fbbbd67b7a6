-- enqueue: put one or more tasks on the queue, all or none, within the limit: onto the
-- pending list, or, with a delay, into the scheduled set (due at Redis time + delay).
-- Each task id gets an idempotency marker for IDEMPOTENCY_TTL holding this call's token:
-- the library repeating this same call after a lost reply finds its own token and
-- writes nothing again, while another call for an id still live is refused. (A task
-- cancelled before it ran keeps a marker, without expiry, until a worker drops it.)
-- A marker '~<token>' is a tombstone a final outcome may leave instead of deleting the
-- marker: its own call's repeat is still a no-op, any other call may use the id again.
-- Each new task's state is set ("pending <session>" or "scheduled <session>"), and a
-- result left by an earlier task of the same id is deleted (it is not this task's).
-- Backpressure: pending + scheduled (delayed tasks and retries) + new <= MAX_QUEUE_LENGTH,
-- where a scheduled copy of a task cancelled meanwhile (in the voided set) does not count:
-- its task has ended. The set is only read when the tasks would not fit otherwise.
-- The usual call, one new task, takes the fast path: its marker first (SET NX), given
-- back if the task turns out not to fit; every other call takes the general path.
-- KEYS[1]     pending list
-- KEYS[2]     scheduled sorted set (score: due time in ms, Redis clock)
-- KEYS[3]     state hash (task id -> "<status> <session id>")
-- KEYS[4]     voided set (ids of cancelled tasks whose copy waits in the scheduled set)
-- KEYS[5]     the first task's idempotency marker; then its result key, and so on: from
--             KEYS[5] on, per task, two keys: its idempotency marker, its result key
-- ARGV[1]     MAX_QUEUE_LENGTH
-- ARGV[2]     seconds a marker lasts (IDEMPOTENCY_TTL)
-- ARGV[3]     this call's token
-- ARGV[4]     delay in ms, or '' to make the tasks pending at once
-- ARGV[5..]   per task, three values, oldest task first: encoded task, task id, its state
--             value ("pending <session id>", or "scheduled <session id>" with a delay)
-- Returns {new pending length, scheduled length}, {-1} when the new tasks do not fit, or
-- {-2, positions} (1-based) of the tasks whose id is live; nothing is written in the
-- last two cases.
local n = (#KEYS - 4) / 2

-- fits(pending, scheduled, new): whether new tasks fit beside the live ones.
local function fits(pending, scheduled, new)
  local limit = tonumber(ARGV[1])
  return pending + scheduled + new <= limit
    or pending + scheduled - redis.call('SCARD', KEYS[4]) + new <= limit
end

-- write(t, pending, scheduled): task t, whose marker is set, goes on the queue.
local function write(t, pending, scheduled)
  redis.call('DEL', KEYS[4 + 2 * t])
  redis.call('HSET', KEYS[3], ARGV[3 + 3 * t], ARGV[4 + 3 * t])
  if ARGV[4] == '' then
    redis.call('LPUSH', KEYS[1], ARGV[2 + 3 * t])
    return pending + 1, scheduled
  end
  local now = redis.call('TIME')
  local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4])
  redis.call('ZADD', KEYS[2], due, ARGV[2 + 3 * t])
  return pending, scheduled + 1
end

if n == 1 and redis.call('SET', KEYS[5], ARGV[3], 'NX', 'EX', ARGV[2]) then
  local pending, scheduled = redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[2])
  if not fits(pending, scheduled, 1) then
    redis.call('DEL', KEYS[5]) -- give the marker back: nothing stays written
    return {-1}
  end
  return {write(1, pending, scheduled)}
end

-- The general path: check every marker first, then write all or none.
local token = ARGV[3]
local fresh, live, seen = {}, {}, {}
for t = 1, n do
  local key = KEYS[3 + 2 * t]
  local marker = redis.call('GET', key)
  local mine = marker == token or marker == '~' .. token
  if seen[key] or (marker and not mine and string.sub(marker, 1, 1) ~= '~') then
    live[#live + 1] = t
  elseif not mine then
    fresh[#fresh + 1] = t -- no marker, or another call's tombstone
  end
  seen[key] = true
end
if #live > 0 then
  return {-2, unpack(live)}
end
local pending, scheduled = redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[2])
if #fresh > 0 and not fits(pending, scheduled, #fresh) then
  return {-1}
end
for _, t in ipairs(fresh) do
  redis.call('SET', KEYS[3 + 2 * t], token, 'EX', ARGV[2])
  pending, scheduled = write(t, pending, scheduled)
end
return {pending, scheduled}
